"""The architecture holds: import-linter's contracts (pyproject.toml) pass on the tree, and fail on a
copy where the engine imports the services, the loop imports the bus contracts, a layer imports one
above it, the students import the teachers, or a module is added without a layer; no package or
module of pgkd imports itself back through others (no import cycles); and every child process is
started and stopped by pgkd.processes."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the packages under `root` (shared/pgkd as pgkd, services as pgkd_services)."""
    packages = root / "site"
    packages.mkdir(exist_ok=True)
    for name, source in (("pgkd", root / "shared" / "pgkd"), ("pgkd_services", root / "services")):
        if not (packages / name).exists():
            (packages / name).symlink_to(source)
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(packages)}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def copy(tmp_path) -> Path:
    root = tmp_path / "repo"
    for part in ("shared/pgkd", "services"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_tree(copy):
    result = lint(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 4 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("shared/pgkd/loop/cycle.py", "import pgkd_services.runtime", "The engine imports nothing of the services"),
    ("shared/pgkd/data.py", "import aiokafka", "The engine imports nothing of the services"),
    ("shared/pgkd/loop/screening.py", "from pgkd.distributed import messages",
     "The loop's parts, the students and the teachers never import the bus contracts"),
])
def test_a_forbidden_import_breaks_a_contract(copy, module, line, broken):
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # deliberately broken\n")
    result = lint(copy)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout


LAYERS = "Layers: the engine's packages import only downwards"
INDEPENDENT = "The students and the teachers are independent"


@pytest.mark.parametrize("module, line, broken", [
    ("shared/pgkd/data.py", "from pgkd.teachers.simulated import TEACHERS", LAYERS),        # the old data -> teachers
    ("shared/pgkd/loop/state.py", "from pgkd.distributed.runs import RunRecord", LAYERS),   # the old loop -> distributed
    ("shared/pgkd/students/frozen.py", "from pgkd.loop.evaluation import evaluate", LAYERS),  # the old students -> loop
    ("shared/pgkd/teachers/prompt.py", "from pgkd.loop.mining import mine", LAYERS),         # the old teachers -> loop
    ("shared/pgkd/types.py", "from pgkd.errors import UserError", LAYERS),                  # the leaf imports nothing
    ("shared/pgkd/files.py", "import pgkd.settings", LAYERS),
    ("shared/pgkd/teachers/simulated.py", "from pgkd.students.frozen import fit_linear_head", INDEPENDENT),
])
def test_an_upward_or_sideways_import_breaks_the_layers(copy, module, line, broken):
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # deliberately broken\n")
    result = lint(copy)
    assert result.returncode != 0
    broken_part = result.stdout.split("Broken contracts", 1)[-1]
    assert "BROKEN" in result.stdout and broken in broken_part, result.stdout
    assert f"{line.split()[1]}" in broken_part, result.stdout          # the report names the offending import


def test_a_module_without_a_layer_breaks_the_layers(copy):
    (copy / "shared" / "pgkd" / "helpers.py").write_text('"""A new module that no layer names."""\n')
    result = lint(copy)
    assert result.returncode != 0
    assert LAYERS in result.stdout and "pgkd.helpers" in result.stdout, result.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "d": {"a"}}) == []


def test_no_module_and_no_package_of_pgkd_imports_itself_back():
    """No cycles: among all modules, nor among the children of any package (a package stands for every
    module below it). A cycle is what layers forbid; this says where one is if a contract is ever relaxed."""
    import grimp
    graph = grimp.build_graph("pgkd")
    imports = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(imports) == []
    packages = {m for m in graph.modules if graph.find_children(m)}
    assert {"pgkd", "pgkd.loop", "pgkd.students", "pgkd.teachers", "pgkd.distributed"} <= packages
    for package in sorted(packages):
        def child(module: str) -> str | None:
            if not module.startswith(package + "."):
                return None
            return package + "." + module[len(package) + 1:].split(".")[0]
        edges: dict[str, set[str]] = {}
        for module, targets in imports.items():
            source = child(module)
            for target in filter(None, map(child, targets)):
                if source and target != source:
                    edges.setdefault(source, set()).add(target)
        assert _cycles(edges) == [], f"children of {package} import each other in a cycle"


def test_the_wheel_ships_pgkd_and_pgkd_services_and_no_top_level_services(tmp_path):
    """`services` is a name other projects use too; installed, the services are `pgkd_services`, and
    they add their commands to `pgkd` through an entry point (the engine's CLI imports none of them)."""
    import zipfile
    source = tmp_path / "source"          # built from a copy: the build leaves its metadata beside the sources
    for part in ("shared/pgkd", "services"):
        shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                            "-w", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("pgkd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"pgkd", "pgkd_services"}
    # Every package of the source tree is in it (pyproject.toml lists them: a new one must be added there).
    in_tree = {f"pgkd/{p.parent.relative_to(REPO / 'shared' / 'pgkd').as_posix()}".rstrip("/.")
               for p in (REPO / "shared" / "pgkd").rglob("__init__.py")} | \
              {f"pgkd_services/{p.parent.relative_to(REPO / 'services').as_posix()}".rstrip("/.")
               for p in (REPO / "services").rglob("__init__.py")}
    assert {n.rsplit("/", 1)[0] for n in names if n.endswith("__init__.py")} == in_tree
    assert "[pgkd.commands]\ncascade = pgkd_services.cascade:register\nservices = pgkd_services.cli:register" in entry_points


# Child processes are started with pgkd.processes.spawn (a session of their own, SIGTERM when their parent
# dies) and stopped with pgkd.processes.stop (SIGTERM to the group, SIGKILL after a timeout, reaped); no
# other Popen or killpg, in the code or the tests. subprocess.run, which waits, is fine.
OWN_PROCESS_CODE = re.compile(r"\b(Popen|killpg)\s*\(")
SUPERVISOR = ("shared/pgkd/processes.py", "tests/test_processes.py")   # the supervisor, and its tests
NOT_SPAWNED = {   # path -> why it starts or signals a process itself
    "tests/services/test_demo_services.py": "runs `make demo-services` as a terminal does, stdout and stderr "
                                            "apart and SIGINT at its default, and sends Ctrl-C to its group",
    "tests/process_tools.py": "Pgkd runs a `pgkd` command as a terminal does, SIGINT at its default, for the "
                              "tests that send it Ctrl-C",
}


def test_child_processes_are_started_and_stopped_by_pgkd_processes_only():
    found = set()
    for part in ("shared", "services", "tests"):
        for path in (REPO / part).rglob("*.py"):
            if OWN_PROCESS_CODE.search(path.read_text(errors="replace")):
                found.add(path.relative_to(REPO).as_posix())
    found -= set(SUPERVISOR)
    assert not found - set(NOT_SPAWNED), f"use pgkd.processes.spawn and stop in: {sorted(found - set(NOT_SPAWNED))}"
    assert found == set(NOT_SPAWNED), f"no longer needed: {sorted(set(NOT_SPAWNED) - found)}"
