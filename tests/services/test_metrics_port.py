"""A service whose HTTP port (/metrics, /healthz, /readyz) another process holds: one line naming
PGKD_METRICS_PORT and exit 1 (the environment's failure, as a broker out of reach is), at once, before
the broker is tried. A PGKD_METRICS_PORT that is no port at all is the user's: exit 2 (test_service_start.py)."""
import os
import socket
import subprocess
import sys

from pgkd.net import free_port


def test_a_metrics_port_in_use_is_one_line_naming_pgkd_metrics_port_and_exit_1(tmp_path):
    host = "0.0.0.0"     # every address: the port held on loopback is taken for it too
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PGKD_METRICS_PORT": str(port), "PGKD_HTTP_HOST": host,
               "PGKD_BROKER_URL": f"kafka://127.0.0.1:{free_port()}", "PGKD_CONNECT_TIMEOUT": "30",
               "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts", "PGKD_CACHE": str(tmp_path / "cache")}
        result = subprocess.run([sys.executable, "-m", "pgkd.cli", "service", "trainer"], env=env,
                                capture_output=True, text=True, timeout=25)   # not the 30 s the broker gets
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("pgkd:")]
    assert errors == [f"pgkd: trainer: PGKD_METRICS_PORT={port}: port {port} on {host} is in use by another "
                      "process; set PGKD_METRICS_PORT to a free port"], result.stderr
    assert result.stderr.splitlines()[-1] == errors[0] and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 2, result.stderr     # the start line, then that one
