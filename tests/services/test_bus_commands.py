"""`pgkd topics create`, `pgkd submit`, `pgkd status`, `pgkd send` and `pgkd service ingest` where they
meet the outside world."""
import subprocess
import sys

import pytest
import redis
from conftest import make_toy_dataset
from kafka.errors import TopicAlreadyExistsError
from pgkd.distributed.messages import TOPICS

from pgkd_services.cli import create_kafka_topics


def pgkd(*args, env):
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def env(tmp_path, redis_url):
    import os
    return {**os.environ, "PGKD_BROKER_URL": redis_url, "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts"}


def test_topics_create_on_redis_makes_every_consumer_group_once(env, redis_url):
    for _ in range(2):      # idempotent
        result = pgkd("topics", "create", env=env)
        assert result.returncode == 0, result.stderr
    client = redis.Redis.from_url(redis_url)
    groups = {stream: sorted(g["name"].decode() for g in client.xinfo_groups(stream))
              for stream in (f"pgkd.{t}" for t in ("run-requested", "model-trained", "cycle-evaluated",
                                                    "negatives-mined", "samples-generated", "labeled-samples",
                                                    "run-completed"))}
    assert groups == {"pgkd.run-requested": ["pgkd.trainer"], "pgkd.samples-generated": ["pgkd.trainer"],
                      "pgkd.model-trained": ["pgkd.evaluator"], "pgkd.cycle-evaluated": ["pgkd.miner"],
                      "pgkd.negatives-mined": ["pgkd.generator"], "pgkd.labeled-samples": ["pgkd.ingest"],
                      "pgkd.run-completed": ["pgkd.ingest"]}


class RecordingAdmin:
    """Stands in for kafka-python's KafkaAdminClient (no Kafka broker runs here): one topic exists,
    and another creator wins the race for a second one."""

    def __init__(self):
        self.topics = {"pgkd.run-requested"}
        self.created = []

    def list_topics(self):
        return list(self.topics)

    def create_topics(self, new_topics):
        (topic,) = new_topics
        if topic.name == "pgkd.model-trained":
            raise TopicAlreadyExistsError()
        self.created.append((topic.name, topic.num_partitions, topic.replication_factor))


def test_kafka_topics_are_created_once_with_the_asked_partitions():
    admin = RecordingAdmin()
    topics = [f"pgkd.{t}" for t in TOPICS]
    created = create_kafka_topics(["k:9092"], topics, partitions=6, replication_factor=3, admin=admin)
    assert created == [t for t in topics if t not in ("pgkd.run-requested", "pgkd.model-trained")]
    assert all(p == 6 and r == 3 for _, p, r in admin.created) and len(topics) == 8


def test_submit_checks_its_input_before_publishing_anything(env, tmp_path, redis_url):
    bad = pgkd("submit", "--data", str(tmp_path / "missing"), env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such file" in bad.stderr
    data = make_toy_dataset(tmp_path / "toy")
    too_many = pgkd("submit", "--data", str(data), "--labeled", "100000", env=env)
    assert too_many.returncode == 2 and "--labeled 100000" in too_many.stderr
    wrong_bus = pgkd("submit", "--data", str(data), "--labeled", "40", env={**env, "PGKD_BROKER_URL": "amqp://x"})
    assert wrong_bus.returncode == 2 and "PGKD_BROKER_URL=amqp://x" in wrong_bus.stderr
    assert redis.Redis.from_url(redis_url).exists("pgkd.run-requested") == 0   # nothing was published


def test_submit_without_wait_publishes_one_request_and_status_follows_it(env, tmp_path, redis_url):
    data = make_toy_dataset(tmp_path / "toy")
    result = pgkd("submit", "--data", str(data), "--labeled", "40", "--run-id", "queued", env=env)
    assert result.returncode == 0 and "submitted run queued" in result.stdout
    assert redis.Redis.from_url(redis_url).xlen("pgkd.run-requested") == 1
    status = pgkd("status", "queued", env=env)
    assert status.returncode == 0 and "no cycle evaluated yet" in status.stdout and "running" in status.stdout
    missing = pgkd("status", "nope", env=env)
    assert missing.returncode == 2 and "run nope: not found" in missing.stderr
    waited = pgkd("submit", "--data", str(data), "--labeled", "40", "--wait", "--timeout", "1", env=env)
    assert waited.returncode == 1 and "not completed after 1 s" in waited.stderr


class Delivery:
    """What kafka-python's send returns, as far as `pgkd send` uses it."""

    def __init__(self, error=None):
        self.error = error

    def get(self, timeout):
        if self.error:
            raise self.error


class RecordingProducer:
    """Stands in for kafka-python's KafkaProducer: keeps what was sent; refuses a topic when told to."""

    def __init__(self, refuse: bool = False):
        self.sent, self.refuse, self.flushed, self.closed = [], refuse, False, False

    def send(self, topic, value):
        from kafka.errors import KafkaTimeoutError
        self.sent.append((topic, value))
        return Delivery(KafkaTimeoutError("topic not available") if self.refuse else None)

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


def test_send_reads_json_lines_and_csv_and_hands_every_row_to_the_producer(tmp_path, monkeypatch, capsys):
    from pgkd.errors import UserError

    from pgkd_services.cli import send_samples
    monkeypatch.setenv("PGKD_BROKER_URL", "kafka://k1:9092,k2:9092")
    lines = tmp_path / "corrections.jsonl"
    lines.write_text('{"text": "lost my card", "label": "card_lost", "id": "t1"}\n\nnot json\n')
    producer = RecordingProducer()
    assert send_samples(str(lines), progress=False, producer=producer) == 0
    assert producer.sent == [("pgkd.labeled-samples", b'{"text": "lost my card", "label": "card_lost", "id": "t1"}'),
                             ("pgkd.labeled-samples", b"not json")]     # ingest rejects it, with the reason
    assert producer.flushed and producer.closed
    assert "sent 2 sample(s)" in capsys.readouterr().out

    table = tmp_path / "tickets.csv"
    # Saved by Excel as "CSV UTF-8": a byte-order mark before the header.
    table.write_bytes("body,intent,agent\n\"refund, please\",refund,ann\nempty one,,\n".encode("utf-8-sig"))
    producer = RecordingProducer()
    send_samples(str(table), text_column="body", label_column="intent", source="support", progress=False,
                 producer=producer)
    import json
    assert [json.loads(value) for _, value in producer.sent] == [
        {"text": "refund, please", "label": "refund", "agent": "ann", "source": "support"},
        {"text": "empty one", "label": "", "source": "support"}]

    with pytest.raises(UserError, match=r"cannot send to pgkd.labeled-samples \(KafkaTimeoutError"):
        send_samples(str(lines), progress=False, producer=RecordingProducer(refuse=True))
    with pytest.raises(UserError, match="missing column"):
        send_samples(str(table), progress=False, producer=RecordingProducer())


def test_send_over_redis_and_the_bad_inputs_of_send_and_ingest(env, tmp_path, redis_url):
    rows = tmp_path / "samples.jsonl"
    rows.write_text("".join(f'{{"text": "sample {i}", "label": "refund"}}\n' for i in range(25)))
    sent = pgkd("send", str(rows), env=env)
    assert sent.returncode == 0 and "sent 25 sample(s)" in sent.stdout and "25/25" in sent.stderr
    client = redis.Redis.from_url(redis_url)
    assert client.xlen("pgkd.labeled-samples") == 25
    assert [g["name"].decode() for g in client.xinfo_groups("pgkd.labeled-samples")] == ["pgkd.ingest"]

    missing = pgkd("send", str(tmp_path / "nope.jsonl"), env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr
    no_base = pgkd("service", "ingest", env=env)
    assert no_base.returncode == 2 and no_base.stderr.count("\n") == 1
    assert "set PGKD_STREAM_BASE_RUN" in no_base.stderr
    bad_setting = pgkd("service", "ingest", env={**env, "PGKD_STREAM_TRIGGER_COUNT": "-3"})
    assert bad_setting.returncode == 2 and "PGKD_STREAM_TRIGGER_COUNT='-3'" in bad_setting.stderr
    status = pgkd("stream", "status", "nope", env=env)
    assert status.returncode == 2 and "stream nope: not found" in status.stderr


@pytest.mark.parametrize("scheme", ["redis", "kafka"])
def test_an_unreachable_broker_is_one_line_and_leaves_no_run_behind(tmp_path, scheme):
    """Nothing listens on the port: submit, send and topics create each say so in one line, exit 2,
    close their clients, and submit records no run that `status` would then call running."""
    import os

    from conftest import free_port
    data = make_toy_dataset(tmp_path / "toy")
    env = {**os.environ, "PGKD_BROKER_URL": f"{scheme}://127.0.0.1:{free_port()}",
           "PGKD_ARTIFACTS": f"file://{tmp_path}/artifacts"}
    (tmp_path / "s.jsonl").write_text('{"text": "lost my card", "label": "card_lost"}\n')
    for args in (["submit", "--data", str(data), "--labeled", "40", "--student", "tiny", "--run-id", "never"],
                 ["send", str(tmp_path / "s.jsonl"), "--no-progress"], ["topics", "create"]):
        result = pgkd(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert "127.0.0.1" in result.stderr and ("cannot reach" in result.stderr or "bootstrap" in result.stderr)
    status = pgkd("status", "never", env=env)
    assert status.returncode == 2 and "run never: not found" in status.stderr


def test_a_publish_that_fails_after_the_run_was_recorded_marks_it_not_submitted(tmp_path, redis_url, monkeypatch,
                                                                                capsys):
    """The broker answered, then the publish failed: the run is recorded as not submitted, and
    `status` says so instead of `running` forever."""
    import pgkd_services.cli
    from pgkd.cli import main
    data = make_toy_dataset(tmp_path / "toy")
    monkeypatch.setenv("PGKD_BROKER_URL", redis_url)
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/artifacts")

    async def broken_send(*args, **kwargs):
        raise ConnectionError("connection reset by peer")
    monkeypatch.setattr(pgkd_services.cli, "send", broken_send)
    assert main(["submit", "--data", str(data), "--labeled", "40", "--student", "tiny", "--run-id", "lost"]) == 2
    err = capsys.readouterr().err
    assert "cannot publish run lost" in err and "recorded as not submitted" in err
    assert main(["status", "lost"]) == 1
    captured = capsys.readouterr()
    assert "run lost: not submitted" in captured.err and "running" not in captured.out
