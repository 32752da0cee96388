"""The services as separate OS processes (`pgkd service NAME`) over a real Kafka-protocol broker
(Tansu: Kafka-compatible, not Apache Kafka), for the tests that run, kill and restart them: the
project's LocalCluster, and what the tests read of it (each start's log lines, the broker's records)."""
import re
import subprocess
import sys
import time

import pytest
from pgkd.artifacts import ArtifactStore
from pgkd.net import free_port

import pgkd_services as services
from pgkd_services.local import LocalCluster

# seconds a read of a topic waits for its first record (then `quiet` seconds after the last)
FIRST_FETCH = 5.0


def cli_options(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


class ServiceProcesses(LocalCluster):
    """A LocalCluster of service processes by label (`trainer`, or `trainer-2` for a second replica:
    `.start(service, label)`) on the broker `broker_url`, with no Prometheus (`.start_prometheus()`)
    and no topics (`.pgkd("topics", "create")`); its logs in folder/services, its artifacts and cache in
    `folder`. The services stop as they are configured to (PGKD_GRACEFUL_TIMEOUT not shortened)."""

    def __init__(self, broker_url: str, folder):
        super().__init__(folder / "services", quiet=True, broker_url=broker_url, topics=False, prometheus=False,
                         env={"PGKD_ARTIFACTS": f"file://{folder}/artifacts", "PGKD_CACHE": str(folder / "cache"),
                              "PGKD_GRACEFUL_TIMEOUT": None})
        self.store = ArtifactStore(self.env["PGKD_ARTIFACTS"])
        # One port per service up front, so a Prometheus can be pointed at them before they start.
        for name in services.ALL:
            self.metrics_ports.setdefault(name, free_port())
        self.open()

    def pgkd(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command run to its end, its output captured (not LocalCluster.pgkd's, to the terminal)."""
        return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    # -- what a process is doing, from the log lines the services write (log_text: one start's) ------------
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
            # Before the first record, more than `quiet`: the consumer's first fetch waits on metadata, which
            # on a loaded machine took over a second (CI read no dead letter of forty).
            while time.monotonic() - last < (quiet if received else max(quiet, FIRST_FETCH)) \
                    and time.monotonic() < deadline:
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
        return "\n".join(f"--- {label} (start {k})\n{self.log_text(label, k)[-3000:]}"
                         for label, starts in self.log_starts.items() for k in range(len(starts)))

    def stop(self) -> dict[str, int]:
        """SIGTERM every service: each one stops cleanly (exit 0; SIGKILL after 60 s)."""
        return super().stop(timeout=60)

    def kill_all(self) -> None:
        super().stop(timeout=0)
