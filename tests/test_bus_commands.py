"""`pgkd topics create`, `pgkd submit` and `pgkd status` where they meet the outside world."""
import subprocess
import sys

import pytest
import redis
from conftest import make_toy_dataset
from kafka.errors import TopicAlreadyExistsError
from pgkd.messages import TOPICS

from services.cli import create_kafka_topics


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
    groups = {stream: [g["name"].decode() for g in client.xinfo_groups(stream)]
              for stream in (f"pgkd.{t}" for t in ("run-requested", "model-trained", "cycle-evaluated",
                                                    "negatives-mined", "samples-generated"))}
    assert groups == {"pgkd.run-requested": ["pgkd.trainer"], "pgkd.samples-generated": ["pgkd.trainer"],
                      "pgkd.model-trained": ["pgkd.evaluator"], "pgkd.cycle-evaluated": ["pgkd.miner"],
                      "pgkd.negatives-mined": ["pgkd.generator"]}


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
    assert all(p == 6 and r == 3 for _, p, r in admin.created) and len(topics) == 7


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
