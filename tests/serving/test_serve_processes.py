"""`pgkd export` and `pgkd serve` as processes, as a user runs them: relative paths from a working folder
(the README's commands), the server's own files outside the model repository (a stock tritonserver
takes the repository as it is), loopback unless told otherwise, and every way of stopping them
(SIGTERM, SIGHUP, Ctrl-C, a SIGKILL of pgkd itself, an interrupted export) leaves no process and no
temporary or staging folder or shared memory behind."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOY_CLASSES, make_toy_dataset
from process_tools import Pgkd, descendants, gone
from pgkd.net import free_ports
from pgkd.serving.client import classify
from pgkd.serving.tritonserver import run_tritonserver


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """A tiny trained student, saved as a folder."""
    from pgkd.data import load_dataset
    from pgkd.students import create_student
    from pgkd.types import TrainConfig
    folder = tmp_path_factory.mktemp("student")
    data = load_dataset(make_toy_dataset(folder / "toy"))
    model = create_student("tiny", data.labels, seed=3)
    model.train(data.train, [], TrainConfig(epochs=3, seed=3), progress=False)
    model.save(folder / "best")
    return folder / "best"


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> Path:
    """A model repository written by `pgkd export`."""
    repository = tmp_path_factory.mktemp("exported") / "models"
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "export", str(student), "--out", str(repository)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return repository


def listing(folder: Path) -> dict[str, int]:
    """Every file and folder under `folder`: relative path -> size (0 for a folder). But for the bytecode
    of model.py, N/__pycache__/: the Python-backend stub's embedded interpreter writes it when it imports
    model.py (it ignores PYTHONDONTWRITEBYTECODE), and it is no model folder to Triton."""
    return {str(p.relative_to(folder)): (0 if p.is_dir() else p.stat().st_size) for p in sorted(folder.rglob("*"))
            if "__pycache__" not in p.parts}


@pytest.fixture
def pgkd(tmp_path):
    started = []

    def start(*args: str, cwd: Path | None = None, env: dict | None = None) -> Pgkd:
        started.append(Pgkd(tmp_path, *args, cwd=cwd, env=env))
        return started[-1]
    yield start
    for command in started:
        command.kill()


def shared_memory(triton: int) -> list[Path]:
    """The Python backend's shared-memory segments of the tritonserver `triton`: /dev/shm/PREFIX*, the prefix
    pgkd gave it on its command line."""
    args = Path(f"/proc/{triton}/cmdline").read_bytes().decode().split("\0")
    (prefix,) = [a.split("shm-region-prefix-name=", 1)[1] for a in args if "shm-region-prefix-name=" in a]
    assert prefix.startswith("pgkd"), prefix
    return list(Path("/dev/shm").glob(f"{prefix}*"))


def ports() -> list[str]:
    http, grpc, metrics = free_ports(3)
    return ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]


REPO = Path(__file__).resolve().parents[2]


def readme_commands(containing: str, page: str = "README.md") -> list[str]:
    """The commands of the bash block of `page` (the README, or a page of docs/) that holds `containing`, one
    per line, comments cut."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / page).read_text(encoding="utf-8"), flags=re.S)
    block = next(b for b in blocks if containing in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def on_ports(argv: list[str], http: int, grpc: int, metrics: int) -> list[str]:
    """A README command on free ports instead of 8000-8002 (which another program may hold here)."""
    swap = {"8000": str(http), "8001": str(grpc), "8002": str(metrics)}
    out = [re.sub(r":(800[012])\b", lambda m: ":" + swap[m.group(1)], a) for a in argv]
    out = [swap.get(a, a) if i and out[i - 1] in ("--http-port", "--grpc-port", "--metrics-port") else a
           for i, a in enumerate(out)]
    if out[1] == "serve" and "--http-port" not in out:
        out += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    return out


def test_the_readmes_two_serving_blocks_are_the_same_commands():
    """docs/serving.md repeats the README's block with the default ports spelled out: what the test below
    runs covers both."""
    front = readme_commands("# in another terminal")[:3]
    serving = readme_commands("--format torch, --int8", page="docs/serving.md")[:3]
    assert front[0] == serving[0] and front[2] == serving[2]
    assert serving[1] == front[1] + " --http-port 8000 --grpc-port 8001 --metrics-port 8002"


def test_the_readmes_serving_commands_work_as_written_from_the_repository_root(student, tmp_path, pgkd):
    """The README's serving block, run as written (relative paths, `.venv/bin/pgkd`) from a folder laid
    out as the repository's root after `make demo`: only the ports are free ones instead of 8000-8002."""
    commands = [shlex.split(c) for c in readme_commands("# in another terminal")]
    assert [c[1] for c in commands[:3]] == ["export", "serve", "classify"], commands
    work = tmp_path / "root"
    shutil.copytree(student, work / "runs" / "demo" / "best")
    (work / ".venv").symlink_to(REPO / ".venv")
    http, grpc, metrics = free_ports(3)
    export = subprocess.run(on_ports(commands[0], http, grpc, metrics), cwd=work, capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr
    written = listing(work / "models")
    server = pgkd(*on_ports(commands[1], http, grpc, metrics)[1:], cwd=work)   # as .venv/bin/pgkd runs it
    server.wait_for("pgkd: serving")
    done = subprocess.run(on_ports(commands[2], http, grpc, metrics), cwd=work, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["label"] in TOY_CLASSES
    triton = server.tritonserver()
    segments = shared_memory(triton)
    assert segments
    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert "pgkd: stopped serving" in server.log()
    assert gone([triton]) and server.left_in_tmp() == []
    assert [s for s in segments if s.exists()] == []     # the Python backend's shared memory unlinked
    assert listing(work / "models") == written


def test_the_repository_is_left_as_export_wrote_it_and_a_stock_tritonserver_loads_it(exported, pgkd):
    """After `pgkd serve` (stopped with Ctrl-C), the repository holds the models only: a tritonserver in its
    default model control mode, which loads every folder of the repository, serves it."""
    written = listing(exported)
    server = pgkd("serve", "--model", str(exported), *ports())
    server.wait_for("pgkd: serving")
    segments = shared_memory(server.tritonserver())
    assert segments
    assert server.stop(signal.SIGINT) == 0, server.log()
    assert listing(exported) == written
    assert [s for s in segments if s.exists()] == []
    with run_tritonserver(exported) as triton:     # no model control arguments: Triton's default
        (answer,) = classify(f"http://{triton.http_url}", ["please send money to my payee account"])
        assert answer["label"] in TOY_CLASSES


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_a_served_model_listens_on_loopback_unless_told_otherwise_and_sighup_stops_it(exported, pgkd, host):
    """A closed terminal (SIGHUP) stops `pgkd serve` and its tritonserver, and removes its work folder."""
    options = ports()
    server = pgkd("serve", "--model", str(exported), *options, *(["--host", host] if host else []))
    server.wait_for("pgkd: serving")
    triton = server.tritonserver()
    # every interface: HTTP and metrics on 0.0.0.0, gRPC on :: (both IPv4 and IPv6, as gRPC binds 0.0.0.0)
    assert server.listening_on(options[1::2]) == ({"127.0.0.1"} if host is None else {"0.0.0.0", "::"})
    assert f"pgkd classify --url http://127.0.0.1:{options[1]} TEXT" in server.log()
    segments = shared_memory(triton)
    assert server.stop(signal.SIGHUP) == 0, server.log()
    assert gone([triton]), "tritonserver outlived pgkd serve"
    assert server.left_in_tmp() == [] and [s for s in segments if s.exists()] == []


def test_a_sigkilled_serve_takes_its_tritonserver_with_it_and_the_next_removes_what_it_left(exported, pgkd):
    server = pgkd("serve", "--model", str(exported), *ports())
    server.wait_for("pgkd: serving")
    triton = server.tritonserver()
    stubs = [p for p in descendants(triton)]
    server.stop(signal.SIGKILL)
    assert gone([triton, *stubs]), "tritonserver (or a stub) outlived a SIGKILLed pgkd serve"
    left = [name for name in server.left_in_tmp() if name.startswith("tritonserver-")]   # its work folder
    assert len(left) == 1, server.left_in_tmp()
    following = pgkd("serve", "--model", str(exported), *ports(), env={"TMPDIR": str(server.tmp)})
    following.wait_for("pgkd: serving")
    assert not (server.tmp / left[0]).exists(), server.left_in_tmp()
    assert following.stop(signal.SIGTERM) == 0 and server.left_in_tmp() == [], server.left_in_tmp()


def test_an_interrupted_serve_of_a_student_folder_leaves_no_temporary_repository(student, pgkd):
    """SIGTERM while `pgkd serve --model STUDENT_FOLDER` exports the student into its temporary repository."""
    server = pgkd("serve", "--model", str(student), *ports())
    deadline = time.monotonic() + 120
    while not list(server.tmp.glob("pgkd-serve-*/student/.staging-*")):   # the export has begun
        assert server.process.poll() is None and time.monotonic() < deadline, server.log()
        time.sleep(0.02)
    code = server.stop(signal.SIGTERM)
    assert server.left_in_tmp() == []
    assert code == 128 + signal.SIGTERM and "Traceback" not in server.log(), server.log()
    assert "pgkd: interrupted" in server.log() and "output folder" not in server.log()    # serve has none


def test_an_interrupted_export_leaves_no_staging_folder(student, tmp_path, pgkd):
    repository = tmp_path / "models"
    export = pgkd("export", str(student), "--out", str(repository))
    deadline = time.monotonic() + 120
    while not list(repository.glob("student/.staging-*")):
        assert export.process.poll() is None and time.monotonic() < deadline, export.log()
        time.sleep(0.02)
    code = export.stop(signal.SIGTERM)
    assert not list(repository.rglob(".staging-*")) and not list(repository.glob("student/[0-9]*"))
    assert code == 128 + signal.SIGTERM, export.log()
    assert "interrupted; nothing was written" in export.log() and "Traceback" not in export.log()


@pytest.mark.parametrize("args, says", [
    (["serve", "--model", "models", "--host", "no host!"], "argument --host: 'no host!' is not a host"),
    (["serve", "--model", "models", "--http-port", "70000"], "argument --http-port: '70000' is not a port"),
    (["teacher", "serve", "--data", "d", "--host", "a/b"], "argument --host: 'a/b' is not a host"),
    (["teacher", "serve", "--data", "d", "--metrics-port", "0"], "argument --metrics-port: '0' is not a port"),
])
def test_a_bad_host_or_port_is_one_line_and_exit_2(args, says, capsys):
    from pgkd.cli import main
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


@pytest.fixture
def held_port():
    """A port another program listens on, on 127.0.0.1, for as long as the test runs."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def test_a_taken_or_repeated_port_is_refused_before_anything_starts(held_port):
    from pgkd.errors import UserError
    from pgkd.net import require_free_ports
    free, other = free_ports(2)
    require_free_ports("127.0.0.1", {"--http-port": free, "--grpc-port": other})   # free ones pass
    with pytest.raises(UserError, match=rf"--grpc-port {held_port}\b"):
        require_free_ports("127.0.0.1", {"--http-port": free, "--grpc-port": held_port})
    with pytest.raises(UserError, match=rf"--grpc-port {free}\b.*--http-port"):
        require_free_ports("127.0.0.1", {"--http-port": free, "--grpc-port": free})
    with pytest.raises(UserError, match=rf"--http-port {held_port}\b"):   # 0.0.0.0 takes 127.0.0.1's port too
        require_free_ports("0.0.0.0", {"--http-port": held_port})


@pytest.mark.parametrize("case", ["http port held", "grpc port held", "http port = grpc port"])
def test_serve_on_a_taken_port_is_one_line_and_exit_2(exported, held_port, case):
    """Not the exit 1 and the dump of Triton's log: one line naming the option, at once."""
    http, grpc, metrics = free_ports(3)
    if case == "http port held":
        http, option = held_port, "--http-port"
    elif case == "grpc port held":
        grpc, option = held_port, "--grpc-port"
    else:
        grpc, option = http, "--grpc-port"
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "serve", "--model", str(exported), "--http-port",
                           str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                          capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("pgkd: error: ") and option in lines[0] and str(held_port if "held" in case else http) \
        in lines[0], done.stderr


def test_a_port_taken_as_tritonserver_starts_is_recognised_in_its_log_and_retried(exported, held_port, monkeypatch):
    """Between the check and Triton's own bind a port may still be taken: Triton 2.51 then says
    `Socket '127.0.0.1:PORT' already in use`, which is known for what it is, and on ports chosen by
    run_tritonserver a new set is tried."""
    from pgkd.serving import tritonserver
    from pgkd.serving.tritonserver import TritonServerError
    grpc, metrics = free_ports(2)
    with pytest.raises(TritonServerError) as failed:
        with run_tritonserver(exported, ports=(held_port, grpc, metrics), attempts=1):
            pass
    assert f"Socket '127.0.0.1:{held_port}' already in use" in str(failed.value), str(failed.value)
    chosen = iter([[held_port, grpc, metrics]])
    monkeypatch.setattr(tritonserver, "free_ports", lambda count: next(chosen, None) or free_ports(count))
    with run_tritonserver(exported, attempts=2) as triton:
        assert triton.http_port != held_port and triton.is_ready()


def test_a_tritonserver_killed_at_the_stop_leaves_no_shared_memory(exported, pgkd):
    """A tritonserver that does not stop (stopped here with SIGSTOP; a hung or a starved one) is killed after
    the stop's timeout, before it unlinks its Python backend's shared memory: pgkd unlinks it."""
    server = pgkd("serve", "--model", str(exported), *ports())
    server.wait_for("pgkd: serving")
    triton = server.tritonserver()
    segments, stubs = shared_memory(triton), list(descendants(triton))
    assert segments
    os.kill(triton, signal.SIGSTOP)
    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert gone([triton, *stubs]) and server.left_in_tmp() == []
    assert [s for s in segments if s.exists()] == []
