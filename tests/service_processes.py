"""The services as separate OS processes (`pgkd service NAME`) over a real Kafka-protocol broker
(Tansu: Kafka-compatible, not Apache Kafka), for the tests that run, kill and restart them."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port
from pgkd.distributed.artifacts import ArtifactStore
from pgkd.processes import spawn, stop

import pgkd_services as services


def cli_options(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


class ServiceProcesses:
    """Service processes by label (`trainer`, or `trainer-2` for a second replica), each with its own
    log file per start and its own metrics port."""

    def __init__(self, broker_url: str, folder):
        self.folder = folder
        self.broker_url = broker_url
        self.env = {**os.environ, "PGKD_BROKER_URL": broker_url, "PGKD_ARTIFACTS": f"file://{folder}/artifacts",
                    "PGKD_CACHE": str(folder / "cache")}
        self.store = ArtifactStore(self.env["PGKD_ARTIFACTS"])
        self.processes: dict[str, subprocess.Popen] = {}
        # One port per service up front, so a Prometheus can be pointed at them before they start.
        self.metrics_ports: dict[str, int] = {name: free_port() for name in services.ALL}
        self.log_paths: dict[str, list] = {}     # label -> one log file per start, in order
        self._logs: list = []

    def start(self, service: str, label: str | None = None, **env: str) -> None:
        label = label or service
        port = self.metrics_ports.setdefault(label, free_port())
        path = self.folder / f"{label}-{len(self.log_paths.get(label, []))}.log"
        self.log_paths.setdefault(label, []).append(path)
        log = path.open("w")
        self._logs.append(log)
        env = {**self.env, **env, "PGKD_METRICS_PORT": str(port)}
        self.processes[label] = spawn([sys.executable, "-m", "pgkd.cli", "service", service], log=log, env=env)

    def pgkd(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    # -- what a process is doing, from the log lines the services write ------------------------------------
    def log_text(self, label: str, start: int = -1) -> str:
        return self.log_paths[label][start].read_text(errors="replace")

    def handled(self, label: str, kind: str, start: int = -1) -> list[tuple[str, int]]:
        """(run, cycle) of each `kind` message that process start finished (computed or found done)."""
        pattern = rf"run (\S+) cycle (\d+): {re.escape(kind)} (?:->|already handled)"
        return [(run, int(cycle)) for run, cycle in re.findall(pattern, self.log_text(label, start))]

    def received(self, label: str, kind: str, start: int = -1) -> list[tuple[str, int]]:
        pattern = rf"run (\S+) cycle (\d+): {re.escape(kind)} received"
        return [(run, int(cycle)) for run, cycle in re.findall(pattern, self.log_text(label, start))]

    def wait_busy(self, label: str, kind: str, timeout: float = 180) -> tuple[str, int]:
        """Until the running process has received a `kind` message it has not finished; returns its
        (run, cycle)."""
        deadline = time.monotonic() + timeout
        while True:
            unfinished = [m for m in self.received(label, kind) if m not in self.handled(label, kind)]
            if unfinished:
                return unfinished[0]
            if time.monotonic() > deadline or self.processes[label].poll() is not None:
                pytest.fail(f"{label} never took a {kind} message; logs:\n{self.log_tails()}")
            time.sleep(0.002)

    def kill(self, label: str) -> None:
        self.processes[label].send_signal(signal.SIGKILL)
        self.processes[label].wait(10)

    def wait_completed(self, run_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while not self.store.exists(f"runs/{run_id}/completed.json"):
            if time.monotonic() > deadline:
                pytest.fail(f"run {run_id} did not complete; logs:\n{self.log_tails()}")
            time.sleep(0.2)
        return self.store.get_json(f"runs/{run_id}/completed.json")

    # -- the broker ------------------------------------------------------------------------------------------
    def records(self, topic: str, quiet: float = 1.0, timeout: float = 30) -> list:
        """Every record of topic `pgkd.<topic>`, read without a consumer group (partitions assigned by
        hand, from the beginning) until none came for `quiet` seconds. Not up to the end offsets:
        Tansu's ListOffsets answers a wrong high watermark (1 per partition, whatever they hold)."""
        from kafka import KafkaConsumer, TopicPartition
        consumer = KafkaConsumer(bootstrap_servers=self.broker_url.removeprefix("kafka://"))
        try:
            partitions = [TopicPartition(f"pgkd.{topic}", p) for p in consumer.partitions_for_topic(f"pgkd.{topic}")]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            received, last, deadline = [], time.monotonic(), time.monotonic() + timeout
            while time.monotonic() - last < quiet and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=200).values():
                    received += batch
                    last = time.monotonic()
            return received
        finally:
            consumer.close()

    def bodies(self, topic: str) -> list[bytes]:
        return [record.value for record in self.records(topic)]

    def uncommitted(self, topic: str, service: str) -> int:
        """Records of `pgkd.<topic>` past the offsets the consumer group of `service` committed."""
        from kafka import KafkaAdminClient, TopicPartition
        ends: dict = {}
        for record in self.records(topic):
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        admin = KafkaAdminClient(bootstrap_servers=self.broker_url.removeprefix("kafka://"))
        try:
            committed = admin.list_group_offsets({f"pgkd.{service}": [TopicPartition(f"pgkd.{topic}", p)
                                                                      for p in ends]})[f"pgkd.{service}"]
        finally:
            admin.close()
        done = {tp.partition: max(meta.offset, 0) for tp, meta in committed.items()}
        return sum(end - done.get(partition, 0) for partition, end in ends.items())

    def log_tails(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                         for paths in self.log_paths.values() for path in paths)

    def stop(self) -> dict[str, int]:
        """SIGTERM every service: each one stops cleanly (exit 0; SIGKILL after 60 s)."""
        stop(self.processes.values(), timeout=60)
        return {label: process.returncode for label, process in self.processes.items()}

    def kill_all(self) -> None:
        stop(self.processes.values(), timeout=0)
        for log in self._logs:
            log.close()
