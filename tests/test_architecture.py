"""The architecture holds: import-linter's contracts (pyproject.toml) pass on the tree, and fail on a
copy where the engine imports the services, or the loop imports the bus contracts; and every child
process is started and stopped by pgkd.processes."""
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
    assert "Contracts: 2 kept, 0 broken." in result.stdout


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
    assert "[pgkd.commands]\nservices = pgkd_services.cli:register" in entry_points


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
