"""The architecture holds: import-linter's contracts (pyproject.toml) pass on the tree, and fail on a
copy where the engine imports the services, or the loop imports the bus contracts."""
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
    ("shared/pgkd/data.py", "import redis", "The engine imports nothing of the services"),
    ("shared/pgkd/loop/screening.py", "from pgkd.distributed import messages",
     "The loop's parts, the students and the teachers never import the bus contracts"),
])
def test_a_forbidden_import_breaks_a_contract(copy, module, line, broken):
    path = copy / module
    path.write_text(path.read_text() + f"\n{line}  # deliberately broken\n")
    result = lint(copy)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout, result.stdout
