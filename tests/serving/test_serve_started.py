"""`pgkd serve` says `serving` only once the tritonserver it started is ready and is the one answering: it
holds its HTTP, gRPC and metrics ports itself. A port taken as Triton starts (the metrics port, bound after
HTTP answers; or the HTTP port, where another server answers the readiness check) is one line naming the
option, exit 2, and no `serving` line before it."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest
from pgkd.net import free_ports
from pgkd.serving.repository import write_version
from pgkd.serving.tritonserver import listening_ports
from pgkd.students import create_student

# `pgkd serve` as a user runs it, but for the check that the ports are free before the start: it sees the
# ports free, and they are taken by the time Triton binds them (the race it cannot close).
SERVE_THROUGH_THE_RACE = ("import sys, pgkd.serving.server as server; server.require_free_ports = lambda *a, **k: None; "
                          "from pgkd.cli import main; sys.exit(main())")


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    models = tmp_path_factory.mktemp("serve-started") / "models"
    write_version(models, create_student("tiny", ["a", "b"], seed=1), {"test": "serve started"})
    return models


def _serve(repository, ports: list[int], through_the_race: bool) -> subprocess.CompletedProcess:
    command = ["-c", SERVE_THROUGH_THE_RACE] if through_the_race else ["-m", "pgkd.cli"]
    options = [a for option, port in zip(("--http-port", "--grpc-port", "--metrics-port"), ports)
               for a in (option, str(port))]
    return subprocess.run([sys.executable, *command, "serve", "--model", str(repository), *options],
                          capture_output=True, text=True, timeout=120)


class _Ready(http.server.BaseHTTPRequestHandler):
    """A server left running on the port: it answers every readiness check with 200."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _refused_in_one_line(done: subprocess.CompletedProcess, says: str) -> None:
    assert "serving" not in done.stdout, done.stdout
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines == [f"pgkd: error: {says}"], (done.returncode, done.stderr)


@pytest.mark.parametrize("through_the_race", [False, True], ids=["taken before", "taken as triton starts"])
def test_a_taken_metrics_port_is_one_line_exit_2_and_nothing_said_served(repository, through_the_race):
    ports = free_ports(3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[2]))
        held.listen()
        done = _serve(repository, ports, through_the_race)
    _refused_in_one_line(done, f"--metrics-port {ports[2]}: the port is already in use on 127.0.0.1")


def test_another_server_answering_ready_on_the_http_port_is_not_taken_for_ours(repository):
    ports = free_ports(3)
    other = http.server.ThreadingHTTPServer(("127.0.0.1", ports[0]), _Ready)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        done = _serve(repository, ports, through_the_race=True)
    finally:
        other.shutdown()
        other.server_close()
    _refused_in_one_line(done, f"--http-port {ports[0]}: the port is already in use on 127.0.0.1")


def test_the_ports_a_process_listens_on_are_read_from_proc():
    with socket.socket() as listening, socket.socket() as bound_only:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))
        ports = listening_ports(os.getpid())
        assert listening.getsockname()[1] in ports and bound_only.getsockname()[1] not in ports
    assert listening_ports(2 ** 22 + 1) == set()     # no such process: it listens on nothing
