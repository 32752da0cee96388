"""How a service starts: its settings' ports and URLs checked (one line, exit 2), its HTTP side
(/metrics, /healthz, /readyz) on loopback unless PGKD_HTTP_HOST says otherwise, and a broker it cannot
reach an exit (one line, exit 1) for Compose or Kubernetes to restart it, never a process that is alive
and deaf."""
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pgkd import processes
from pgkd.errors import UserError
from pgkd.net import free_port, free_ports

from pgkd_services.runtime import Settings, bootstrap_servers


def one_line(call, *args) -> str:
    with pytest.raises(UserError) as error:
        call(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("value", ["abc", "0", "70000", "99999", "-1", "9100.0", "٣"])
def test_a_metrics_port_that_is_not_a_port_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("PGKD_METRICS_PORT", value)
    assert one_line(Settings.from_env) == f"PGKD_METRICS_PORT={value!r}: not a port (a whole number from 1 to 65535)"


def test_the_http_host_is_loopback_unless_pgkd_http_host_says_otherwise(monkeypatch):
    monkeypatch.delenv("PGKD_HTTP_HOST", raising=False)
    assert Settings.from_env().http_host == "127.0.0.1"
    monkeypatch.setenv("PGKD_HTTP_HOST", "0.0.0.0")
    assert Settings.from_env().http_host == "0.0.0.0"
    monkeypatch.setenv("PGKD_HTTP_HOST", "not a host")
    assert one_line(Settings.from_env).startswith("PGKD_HTTP_HOST='not a host': not a host")


@pytest.mark.parametrize("url", ["http://prometheus:99999", "http://prometheus:0", "http://prometheus:x",
                                 "prometheus:9090", "ftp://prometheus:9090", "http://:9090"])
def test_a_prometheus_url_with_a_bad_port_or_shape_is_refused(monkeypatch, url):
    monkeypatch.setenv("PGKD_PROMETHEUS_URL", url)
    assert one_line(Settings.from_env).startswith(f"PGKD_PROMETHEUS_URL={url!r}")


@pytest.mark.parametrize("url", ["http://prometheus:9090", "https://prometheus.monitoring.svc", "http://[::1]:9090/"])
def test_a_prometheus_url_is_taken_as_it_is(monkeypatch, url):
    monkeypatch.setenv("PGKD_PROMETHEUS_URL", url)
    assert Settings.from_env().prometheus_url == url


@pytest.mark.parametrize("url", ["kafka://h:99999", "kafka://h:0", "kafka://h:٣", "kafka://a:9092,h:65536",
                                 "kafka://h:+80"])
def test_a_broker_url_with_a_port_outside_1_to_65535_is_one_line(url):
    assert one_line(bootstrap_servers, url).startswith(f"PGKD_BROKER_URL={url}")
    assert bootstrap_servers("kafka://[::1]:9092,kafka-0.kafka:9093") == ["[::1]:9092", "kafka-0.kafka:9093"]


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "http://student-server:70000", "h:٣"])
def test_the_deployers_server_url_with_a_bad_port_is_one_line(address):
    from pgkd_services.deployer import ServingSettings
    env = {"PGKD_SERVING_REPOSITORY": "/models", "PGKD_SERVING_URL": address}
    assert one_line(ServingSettings.from_env, env).startswith("PGKD_SERVING_URL=")
    assert ServingSettings.from_env({**env, "PGKD_SERVING_URL": "http://student-server:8000/"}).http_address == \
        "student-server:8000"


# -- the service as a process ---------------------------------------------------------------------------

def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket LISTENs on at `port` (/proc/net/tcp: little-endian hex, state 0A)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status == 200
    except OSError:     # HTTPError (503) included
        return False


def start_trainer(broker_url: str, folder: Path, metrics_port: int, **env: str) -> subprocess.Popen:
    """`pgkd service trainer`, its output to trainer_output(folder)."""
    env = {**os.environ, "PGKD_BROKER_URL": broker_url, "PGKD_ARTIFACTS": f"file://{folder}/artifacts",
           "PGKD_CACHE": str(folder / "cache"), "PGKD_METRICS_PORT": str(metrics_port), **env}
    with (folder / "trainer.log").open("w") as log:
        return processes.spawn([sys.executable, "-m", "pgkd.cli", "service", "trainer"], log=log, env=env)


def trainer_output(folder: Path) -> str:
    return (folder / "trainer.log").read_text(errors="replace")


@pytest.mark.parametrize("host_env, expected", [(None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")])
def test_the_http_side_listens_on_loopback_unless_told(kafka_url, tmp_path, host_env, expected):
    topics = subprocess.run([sys.executable, "-m", "pgkd.cli", "topics", "create"], capture_output=True, text=True,
                            env={**os.environ, "PGKD_BROKER_URL": kafka_url}, timeout=120)
    assert topics.returncode == 0, topics.stderr
    port = free_port()
    process = start_trainer(kafka_url, tmp_path, port, **({"PGKD_HTTP_HOST": host_env} if host_env else {}))
    try:
        deadline = time.monotonic() + 120
        while not listening_addresses(port):
            assert process.poll() is None and time.monotonic() < deadline, trainer_output(tmp_path)
            time.sleep(0.1)
        assert listening_addresses(port) == {expected}
        while not healthy(port):     # alive once its consumer has started
            assert process.poll() is None and time.monotonic() < deadline, trainer_output(tmp_path)
            time.sleep(0.1)
    finally:
        processes.stop(process, timeout=60)
    assert f"HTTP on {expected}:{port}" in trainer_output(tmp_path)


def test_a_service_that_cannot_reach_the_broker_exits_with_one_line(tmp_path):
    """Nothing listens at the broker's port: the service tries for PGKD_CONNECT_TIMEOUT seconds, then
    exits 1 with one line (no traceback) and never served /healthz."""
    broker_port, metrics_port = free_ports(2)
    process = start_trainer(f"kafka://127.0.0.1:{broker_port}", tmp_path, metrics_port, PGKD_CONNECT_TIMEOUT="3")
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        serving = listening_addresses(metrics_port)
        processes.stop(process, timeout=10)
        pytest.fail(f"the service did not exit (HTTP listening on {serving or 'nothing'}):\n"
                    f"{trainer_output(tmp_path)[-3000:]}")
    err = trainer_output(tmp_path)
    assert process.returncode == 1, err
    assert "Traceback" not in err and "Unclosed" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("pgkd:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"pgkd: trainer: cannot reach the broker at PGKD_BROKER_URL=kafka://127.0.0.1:"
                                f"{broker_port} within 3 s"), err


def test_a_service_started_before_its_broker_connects_once_the_broker_is_up(tmp_path):
    """The broker comes up within PGKD_CONNECT_TIMEOUT: the service connects and is alive; until then it
    said so once a second and did not serve /healthz."""
    from pgkd_services.local import LocalCluster
    broker_port, metrics_port = free_ports(2)
    process = start_trainer(f"kafka://127.0.0.1:{broker_port}", tmp_path, metrics_port, PGKD_CONNECT_TIMEOUT="120")
    broker = LocalCluster(tmp_path / "broker", quiet=True, broker_port=broker_port, topics=False, prometheus=False)
    try:
        # The service warms its engine first (torch: seconds on a loaded machine), then tries the broker.
        deadline = time.monotonic() + 90
        while "the broker is not reachable yet" not in trainer_output(tmp_path):
            assert process.poll() is None and time.monotonic() < deadline, trainer_output(tmp_path)
            time.sleep(0.2)
        assert process.poll() is None and not listening_addresses(metrics_port)
        broker.open()    # Tansu, as the kafka_url fixture starts it, on the service's port
        deadline = time.monotonic() + 120
        while not healthy(metrics_port):
            assert process.poll() is None and time.monotonic() < deadline, trainer_output(tmp_path)
            time.sleep(0.2)
    finally:
        processes.stop(process, timeout=60)
        broker.stop(timeout=10)
    err = trainer_output(tmp_path)
    assert "the broker is not reachable yet" in err and "Traceback" not in err, err
    assert process.returncode == 0, err
