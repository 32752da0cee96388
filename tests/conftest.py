"""Shared fixtures: the real datasets beside the repository, and a small synthetic one that the
tiny student learns in seconds (each class has its own vocabulary)."""
from __future__ import annotations

import contextlib
import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PGKD_DATA_DIR", REPO.parent / "shared" / "data"))

# Scheduling only, no test depends on it: the files that take longest (seen with --durations) start
# first, so that no long file starts last on a worker (pytest-xdist's --dist loadfile, run by `make test`
# with --no-loadscope-reorder, hands the files out in this order; by default it would hand out the files
# with the most tests first, which puts the few long tests over a broker or Triton at the end).
SLOWEST_FIRST = [
    "tests/services/test_service_replicas_tansu.py", "tests/services/test_services_tansu.py",
    "tests/loop/test_minilm_run.py", "tests/services/test_demo_services.py", "tests/teachers/test_triton.py",
    "tests/services/test_stream_storage_tansu.py", "tests/services/test_stream_drift_tansu.py", "tests/test_api.py",
    "tests/services/test_ingest_tansu.py", "tests/services/test_services_kafka.py",
    "tests/services/test_prometheus_stop.py", "tests/serving/test_promotion_tansu.py",
    "tests/serving/test_cascade_served.py",
    "tests/teachers/test_teacher_serve_processes.py", "tests/bench/test_bench.py", "tests/serving/test_serving.py",
    "tests/distributed/test_run_state.py", "tests/test_taxonomy.py", "tests/loop/test_guidance.py",
    "tests/services/test_kafka_security.py", "tests/services/test_service_start.py",
]


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable: the rest as found


TOY_CLASSES = {
    "card_lost": ["card", "lost", "stolen", "missing", "wallet"],
    "refund": ["refund", "money", "back", "return", "reimburse"],
    "transfer": ["transfer", "send", "account", "wire", "payee"],
    "pin_change": ["pin", "change", "code", "reset", "digits"],
}
FILLER = ["please", "i", "my", "the", "need", "help", "with", "today", "now", "can", "you", "a"]


@pytest.fixture(autouse=True)
def _pgkd_variables_left_as_found():
    """A test that sets a PGKD_ variable and leaves it set changes what the next test on its worker reads
    (`pgkd settings --check` notes it): its variables are put back, and the test fails, naming them.
    Set them with monkeypatch.setenv."""
    before = {k: v for k, v in os.environ.items() if k.startswith("PGKD_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("PGKD_")}
    if after != before:
        for name in after.keys() - before.keys():
            del os.environ[name]
        os.environ.update(before)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        pytest.fail(f"the test left PGKD_ variables changed: {', '.join(changed)} (use monkeypatch.setenv)")


def toy_text(rng: random.Random, label: str) -> str:
    words = rng.sample(TOY_CLASSES[label], 3) + rng.sample(FILLER, 4)
    rng.shuffle(words)
    return " ".join(words)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_toy_dataset(folder: Path, train_per_class: int = 60, test_per_class: int = 15, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def rows(per_class: int) -> list[dict]:
        out = []
        for label in TOY_CLASSES:
            while sum(r["label"] == label for r in out) < per_class:
                text = toy_text(rng, label)
                if text not in seen:
                    seen.add(text)
                    out.append({"text": text, "label": label})
        return out

    write_jsonl(folder / "train.jsonl", rows(train_per_class))
    write_jsonl(folder / "test.jsonl", rows(test_per_class))
    return folder


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return make_toy_dataset(tmp_path / "toy")


def bag_of_words_embed(texts: list[str]) -> np.ndarray:
    """A cheap stand-in for the sentence encoder: hashed word counts, unit length."""
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, zlib.crc32(w.encode()) % 256] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture
def banking77() -> Path:
    path = DATA / "banking77"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the datasets live in ../shared/data beside the repository")
    return path


def prometheus_query(url: str, promql: str) -> list[dict]:
    """The result of an instant PromQL query to the Prometheus at `url`."""
    import urllib.parse
    import urllib.request
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})) as r:
        return json.loads(r.read())["data"]["result"]


@contextlib.contextmanager
def tansu_broker(folder: Path):
    """`kafka://127.0.0.1:PORT` of a real Kafka-protocol broker on a free loopback port for the with-block:
    Tansu (Kafka-compatible, not Apache Kafka), started by the project's LocalCluster, with in-memory
    storage (nothing to keep when it stops). Its log: folder/broker/tansu.log."""
    from pgkd_services.local import LocalCluster
    with LocalCluster(folder / "broker", quiet=True, topics=False, prometheus=False) as cluster:
        yield cluster.broker_url


@pytest.fixture
def kafka_url(tmp_path):
    """A Tansu broker for one test (tansu_broker)."""
    with tansu_broker(tmp_path) as url:
        yield url


@pytest.fixture
def services_over_kafka(kafka_url, tmp_path):
    """The services as OS processes over the real broker, its topics created (3 partitions each);
    started by the test with `.start(name)`, killed at the end if still running."""
    from service_processes import ServiceProcesses
    processes = ServiceProcesses(kafka_url, tmp_path)
    created = processes.pgkd("topics", "create")
    assert created.returncode == 0, created.stderr
    yield processes
    processes.kill_all()
