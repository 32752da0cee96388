"""`pgkd teacher serve` (PyTriton) as a process: loopback unless told otherwise, and SIGHUP (a closed
terminal) or a SIGKILL of pgkd leaves no tritonserver behind."""
import re
import signal

import pytest
from conftest import make_toy_dataset
from pgkd.net import free_ports
from pgkd.teachers.classifier import UNKNOWN_TEXTS
from process_tools import Pgkd, descendants, gone


@pytest.fixture
def teacher(tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    started = []

    def start(*extra: str, env: dict | None = None) -> tuple[Pgkd, list[str]]:
        http, grpc, metrics = free_ports(3)
        ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
        started.append(Pgkd(tmp_path, "teacher", "serve", "--kind", "pool-random", "--data", str(data),
                            "--labeled", "40", "--seed", "1", *ports, *extra, env=env))
        started[-1].wait_for("pgkd: serving the simulated teacher")
        return started[-1], ports
    yield start
    for command in started:
        command.kill()


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_the_teacher_listens_on_loopback_unless_told_otherwise_and_sighup_stops_it(teacher, host):
    server, ports = teacher(*(["--host", host] if host else []))
    triton = server.tritonserver()
    # every interface: HTTP and metrics on 0.0.0.0, gRPC on :: (both IPv4 and IPv6, as gRPC binds 0.0.0.0)
    assert server.listening_on(ports[1::2]) == ({"127.0.0.1"} if host is None else {"0.0.0.0", "::"})
    assert f"--teacher triton://127.0.0.1:{ports[1]}/teacher" in server.log()
    assert UNKNOWN_TEXTS in server.log()     # a user's own text gets a random class, and it says so at start
    # tritonserver's own log (some 60 lines, a CUDA error among them) goes to a file, not to the terminal
    assert not re.search(r"^[IWE]\d{4} |CUDA|NVML", server.log(), re.M), server.log()
    assert server.stop(signal.SIGHUP) == 0, server.log()
    assert server.log().rstrip().endswith("pgkd: stopped serving the simulated teacher"), server.log()[-2000:]
    assert gone([triton]), "tritonserver outlived pgkd teacher serve"
    assert server.left_in_tmp() == []     # PyTriton's workspace removed


def test_a_sigkilled_teacher_serve_takes_its_tritonserver_with_it_and_the_next_removes_what_it_left(teacher):
    """PyTriton starts tritonserver with SIGTERM as its parent-death signal. What a SIGKILL leaves on disk
    (PyTriton's workspace, in pgkd's server folder rather than in ~/.cache) the next server removes."""
    server, _ = teacher()
    triton = server.tritonserver()
    stubs = list(descendants(triton))
    server.stop(signal.SIGKILL)
    assert gone([triton, *stubs]), "tritonserver (or a stub) outlived a SIGKILLed pgkd teacher serve"
    left = [name for name in server.left_in_tmp() if name.startswith(("pgkd-server-", "pgkd-log-"))]
    assert len(left) == 2 and any((server.tmp / name / "pytriton").is_dir() for name in left), server.left_in_tmp()
    assert not [name for name in server.left_in_tmp() if name.startswith("workspace_")], server.left_in_tmp()
    following, _ = teacher(env={"TMPDIR": str(server.tmp), "PYTRITON_HOME": str(server.tmp)})
    assert not [name for name in left if (server.tmp / name).exists()], server.left_in_tmp()
    assert following.stop(signal.SIGTERM) == 0, following.log()
    assert not [name for name in server.left_in_tmp() if name.startswith(("pgkd-server-", "pgkd-log-"))], \
        server.left_in_tmp()


def test_a_teacher_on_a_taken_port_is_one_line_and_exit_2(tmp_path):
    """Not PyTriton's traceback and `pgkd: timed out` a minute after tritonserver failed: one line, at once."""
    import socket
    import subprocess
    import sys
    data = make_toy_dataset(tmp_path / "toy")
    grpc, metrics = free_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        http = held.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pgkd.cli", "teacher", "serve", "--kind", "pool-random",
                               "--data", str(data), "--labeled", "40", "--http-port", str(http),
                               "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                              capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("pgkd: error: ") and f"--http-port {http}" in lines[0], done.stderr


@pytest.mark.parametrize("option, value, says", [
    ("--latency", "-1", "--latency -1.0: Input should be greater than or equal to 0"),
    ("--latency", "nan", "--latency nan: Input should be a finite number"),
    ("--latency", "inf", "--latency inf: Input should be a finite number"),
    ("--llm-accuracy", "1.5", "--llm-accuracy 1.5: Input should be less than or equal to 1"),
    ("--llm-accuracy", "nan", "--llm-accuracy nan: Input should be a finite number"),
    ("--label-noise", "-0.1", "--label-noise -0.1: Input should be greater than or equal to 0"),
    ("--label-noise", "nan", "--label-noise nan: Input should be a finite number"),
    ("--seed", "-1", "--seed -1: Input should be greater than or equal to 0"),      # as pgkd distill's --seed
    ("--labeled", "0", "--labeled 0: Input should be greater than 0"),
    ("--validation-fraction", "1", "--validation-fraction 1.0: Input should be less than 1"),
])
def test_a_bad_number_is_one_line_and_exit_2_before_anything_loads(option, value, says, capsys):
    """Refused before the data is read (there is none at `d`) and before any port is taken."""
    from pgkd.cli import main
    code = main(["teacher", "serve", "--data", "d", option, value])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("pgkd: error: ") and says in err, err
