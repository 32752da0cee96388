"""The services as separate OS processes (`pgkd service NAME`) over a real broker (Redis, or the
Kafka-protocol broker Tansu), for the tests that run, kill and restart them."""
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from conftest import free_port
from pgkd.distributed.artifacts import ArtifactStore

import pgkd_services as services


def cli_options(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


class ServiceProcesses:
    def __init__(self, broker_url: str, folder):
        self.folder = folder
        self.env = {**os.environ, "PGKD_BROKER_URL": broker_url, "PGKD_ARTIFACTS": f"file://{folder}/artifacts",
                    "PGKD_CACHE": str(folder / "cache"), "PGKD_CLAIM_IDLE_MS": "1000"}
        self.store = ArtifactStore(self.env["PGKD_ARTIFACTS"])
        self.redis = redis.Redis.from_url(broker_url) if broker_url.startswith("redis") else None
        self.processes: dict[str, subprocess.Popen] = {}
        self.metrics_ports = {name: free_port() for name in services.ALL}
        self.logs: list = []

    def start(self, name: str, **env: str) -> None:
        log = (self.folder / f"{name}-{len(self.logs)}.log").open("w")
        self.logs.append(log)
        env = {**self.env, **env, "PGKD_METRICS_PORT": str(self.metrics_ports[name])}
        self.processes[name] = subprocess.Popen([sys.executable, "-m", "pgkd.cli", "service", name], env=env,
                                                stdout=log, stderr=subprocess.STDOUT)

    def pgkd(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def pending(self, topic: str, service: str, pid: int | None = None) -> int:
        """Messages the consumers of `service` (of one process, with `pid`) read and did not acknowledge."""
        try:
            summary = self.redis.xpending(f"pgkd.{topic}", f"pgkd.{service}")
        except redis.ResponseError:
            return 0
        return sum(c["pending"] for c in summary["consumers"] if pid is None or f"-{pid}" in c["name"].decode())

    def wait_busy(self, name: str, topic: str, timeout: float = 120) -> None:
        """Until the running service process holds a message from `topic` it has not finished."""
        deadline = time.monotonic() + timeout
        while self.pending(topic, name, self.processes[name].pid) == 0:
            assert time.monotonic() < deadline, f"{name} never took a message from {topic}"
            time.sleep(0.02)

    def kill_while_busy(self, name: str, topic: str, timeout: float = 120) -> None:
        self.wait_busy(name, topic, timeout)
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(10)

    def wait_completed(self, run_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while not self.store.exists(f"runs/{run_id}/completed.json"):
            if time.monotonic() > deadline:
                pytest.fail(f"run {run_id} did not complete; logs:\n{self.log_tails()}")
            time.sleep(0.2)
        return self.store.get_json(f"runs/{run_id}/completed.json")

    def bodies(self, topic: str) -> list[bytes]:
        """The messages of a topic (a Redis stream), as the services published them."""
        from faststream.redis.parser.binary import BinaryMessageFormatV1
        return [BinaryMessageFormatV1.parse(fields[b"__data__"])[0]
                for _, fields in self.redis.xrange(f"pgkd.{topic}")]

    def log_tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{open(log.name).read()[-3000:]}" for log in self.logs)

    def stop(self) -> dict[str, int]:
        """SIGTERM every service: each one stops cleanly (exit 0)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {name: process.wait(30) for name, process in self.processes.items()}
        for log in self.logs:
            log.close()
        return codes
