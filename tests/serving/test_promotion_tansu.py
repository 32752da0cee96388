"""Promotion reaches serving, over the real broker (Tansu: Kafka-compatible, not Apache Kafka): a client
sends a steady stream of requests to `pgkd serve` while StudentPromoted messages reach the deployer.
Two promotions that cannot be deployed leave the old version serving (a dead letter with the reason,
a log line, the failure metric); the good one replaces it with no failed request."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import make_toy_dataset
from pgkd.data import load_dataset
from pgkd.distributed.messages import DeadLetter, StudentPromoted
from pgkd.distributed.steps import store_checkpoint
from pgkd.net import free_ports
from pgkd.processes import spawn, stop
from pgkd.serving.client import StudentClient
from pgkd.students import create_student

PROBES = ["my card was stolen from my wallet", "please send money to my payee account", "reset my pin code now",
          "i want a refund of my money back"]


def _students(tmp_path):
    """Two students that answer the probes differently: the second is the first with its head's
    bias moved towards one label (training is not what this test is about)."""
    import copy

    import torch
    from pgkd.students.finetuned import FineTunedStudent
    data = load_dataset(make_toy_dataset(tmp_path / "toy", train_per_class=2, test_per_class=1))
    old = create_student("tiny", data.labels, seed=3)
    new = FineTunedStudent(copy.deepcopy(old.model), old.tokenizer, old.labels, old.spec)
    with torch.no_grad():
        new.model.classifier.bias[0] += 2.0
    return old, new


def _wait_ready(url: str, process: subprocess.Popen, log, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"not ready: {url}\n{log.read_text()[-3000:]}")


class SteadyClient(threading.Thread):
    """One request after another (the four probes each), recording each answer's version and
    probabilities, or its error."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.answers, self.errors = url, [], []
        self.done = threading.Event()

    def run(self) -> None:
        with StudentClient(self.url, timeout=30) as client:
            while not self.done.is_set():
                try:
                    result = client.infer(PROBES)
                    self.answers.append((result["version"], result["probabilities"]))
                except Exception as e:  # noqa: BLE001 -- every failure is counted: the test wants none
                    self.errors.append(repr(e))

    def count(self, version: str) -> int:
        return sum(v == version for v, _ in self.answers)


def _metric(port: int, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def test_a_promotion_swaps_the_served_student_with_no_failed_request(services_over_kafka, tmp_path):
    from kafka import KafkaProducer
    processes = services_over_kafka
    old, new = _students(tmp_path)
    expected = {"1": old.predict_proba(PROBES), "2": new.predict_proba(PROBES)}
    assert np.abs(expected["1"] - expected["2"]).max() > 0.05     # the versions are told apart by their answers

    repository = tmp_path / "models"      # `pgkd serve` exports the student folder into it as version 1
    old.save(tmp_path / "old")
    http, grpc, metrics = free_ports(3)
    server_log = tmp_path / "serve.log"
    with server_log.open("w") as log:
        server = spawn([sys.executable, "-m", "pgkd.cli", "serve", "--model", str(tmp_path / "old"),
                        "--repository", str(repository),
                        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                       log=log, env=processes.env)
    try:
        _wait_ready(f"http://127.0.0.1:{http}/v2/models/student/ready", server, server_log)
        processes.start("deployer", PGKD_SERVING_REPOSITORY=str(repository), PGKD_SERVING_URL=f"127.0.0.1:{http}",
                        PGKD_SERVING_REPLICA="test")
        store = processes.store
        good = store_checkpoint(store, "promotion-test/new", new)
        unreadable = store.put_files("promotion-test/broken", {"config.json": b"{}", "model.safetensors": b"junk"})
        promotions = [
            StudentPromoted(run_id="wrong-sha", cycle=1, checkpoint=good.model_copy(update={"sha256": "0" * 64}),
                            scores={"validation_accuracy": 0.9}, decision="test: a checkpoint not as referenced",
                            source="run"),
            StudentPromoted(run_id="unreadable", cycle=1, checkpoint=unreadable, scores={}, source="run",
                            decision="test: a checkpoint that is no student"),
            StudentPromoted(run_id="good", cycle=2, checkpoint=good, scores={"validation_accuracy": 0.95},
                            decision="test: the better student", source="run"),
        ]
        client = SteadyClient(f"grpc://127.0.0.1:{grpc}")
        client.start()
        producer = KafkaProducer(bootstrap_servers=processes.broker_url.removeprefix("kafka://"))

        def publish(promoted: StudentPromoted) -> None:
            producer.send("pgkd.student-promoted", promoted.model_dump_json().encode(), key=promoted.run_id.encode())
            producer.flush()

        for promoted in promotions[:2]:
            publish(promoted)
        deadline = time.monotonic() + 120
        while processes.log_text("deployer").count("not deployed") < 2:
            assert time.monotonic() < deadline and processes.processes["deployer"].poll() is None, \
                processes.log_tails()
            time.sleep(0.2)
        assert client.count("2") == 0 and client.count("1") > 0
        publish(promotions[2])
        while client.count("2") < 300 or len(client.answers) < 1000:
            assert time.monotonic() < deadline + 120, (len(client.answers), processes.log_tails())
            assert not client.errors, client.errors[:3]
            time.sleep(0.1)
        client.done.set()
        client.join(30)
        producer.close()

        # No request failed; the answers came from the old student, then from the new one, never back.
        assert client.errors == []
        versions = [v for v, _ in client.answers]
        assert len(versions) >= 1000 and versions == sorted(versions) and set(versions) == {"1", "2"}
        for version, probs in client.answers:
            assert np.allclose(probs, expected[version], atol=1e-3), version

        letters = [DeadLetter.model_validate_json(b) for b in processes.bodies("dead-letter")]
        reasons = {letter.run_id: letter.reason for letter in letters}
        assert set(reasons) == {"wrong-sha", "unreadable"}
        assert "is not the referenced" in reasons["wrong-sha"] and "not a readable saved student" in reasons["unreadable"]
        assert all("not deployed" in r for r in reasons.values())
        counts = _metric(processes.metrics_ports["deployer"], "pgkd_serving_promotions_total")
        assert counts['pgkd_serving_promotions_total{model="student",outcome="failed"}'] == 2
        assert counts['pgkd_serving_promotions_total{model="student",outcome="deployed"}'] == 1
        assert _metric(processes.metrics_ports["deployer"], "pgkd_serving_version")[
            'pgkd_serving_version{model="student"}'] == 2
        manifest = (repository / "student" / "2" / "pgkd-version.json").read_text()
        assert good.sha256 in manifest and "test: the better student" in manifest
        # Triton's own count agrees: every inference it was asked for succeeded
        triton = _metric(metrics, "nv_inference_request_failure")
        assert triton and all(value == 0 for value in triton.values()), triton
    finally:
        stop(server, timeout=30)
        assert server.returncode == 0, server_log.read_text()[-3000:]
