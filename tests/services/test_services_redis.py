"""The four services as separate OS processes over a real Redis server (Redis Streams, consumer
groups), driven by `pgkd submit`, and killed with SIGKILL in the middle of a run."""
import json
import signal
import subprocess
import sys
import time

from conftest import make_toy_dataset
from pgkd.distributed.artifacts import ArtifactStore
from pgkd.data import normalize_text
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from service_processes import ServiceProcesses, cli_options
from test_services_kafka import CONFIG, comparable

import pgkd_services as services

OPTIONS = {k: str(v) for k, v in CONFIG.items()}


def check_run_integrity(store: ArtifactStore, run_id: str, report: dict) -> None:
    """Every accepted sample is in the final training set exactly once, and every cycle counted once."""
    cycles = report["cycles"]
    assert [c["cycle"] for c in cycles] == list(range(len(cycles)))
    assert len(store.list(f"runs/{run_id}/cycles")) == len(cycles)
    versions = [store.get_bytes(f"runs/{run_id}/train/v{c['cycle']:04d}.jsonl").decode().splitlines()
                for c in cycles]
    for before, after, cycle in zip(versions, versions[1:], cycles[1:]):
        assert after[:len(before)] == before and len(after) - len(before) == cycle["accepted"] > 0
    final = [normalize_text(json.loads(line)["text"]) for line in versions[-1]]
    assert len(final) == len(set(final)) == report["dataset"]["sizes"]["train"] + sum(c["accepted"] for c in cycles)


def test_a_submitted_run_completes_over_redis_and_matches_the_embedded_run(services_over_redis, tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    # Submitted before any service runs: the request waits in its stream for the trainer.
    submit = subprocess.Popen([sys.executable, "-m", "pgkd.cli", "submit", "--data", str(data), "--run-id",
                               "redis-run", "--wait", "--timeout", "240", *cli_options(OPTIONS)],
                              env=services_over_redis.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name in services.NAMES:
        services_over_redis.start(name)
    out, err = submit.communicate(timeout=300)
    assert submit.returncode == 0, f"{err}\n{services_over_redis.log_tails()}"
    assert "submitted run redis-run" in out and "report: file://" in out and "stopped: max_cycles" in out
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("cycle")] == \
        ["cycle  0", "cycle  1", "cycle  2", "cycle  3"]

    store = services_over_redis.store
    report = store.get_json("runs/redis-run/report.json")
    embedded = run(DistillConfig(data=str(data), **CONFIG), tmp_path / "embedded", progress=False).report
    assert comparable(report) == comparable(embedded.model_dump(mode="json"))
    check_run_integrity(store, "redis-run", report)
    status = services_over_redis.pgkd("status", "redis-run")
    assert status.returncode == 0 and "cycle  3:" in status.stdout and "report:" in status.stdout
    assert services_over_redis.stop() == {name: 0 for name in services.NAMES}     # SIGTERM: clean exits


CRASH_CONFIG = {**CONFIG, "labeled": 200, "max_cycles": 4, "cycle_epochs": 4}


def submit_and_start(processes: ServiceProcesses, data, run_id: str, options: dict) -> None:
    submitted = processes.pgkd("submit", "--data", str(data), "--run-id", run_id, *cli_options(options))
    assert submitted.returncode == 0, submitted.stderr
    for name in services.NAMES:
        processes.start(name)


def test_the_trainer_killed_mid_round_is_restarted_and_the_run_is_unchanged(services_over_redis, tmp_path):
    data = make_toy_dataset(tmp_path / "toy", train_per_class=300)
    submit_and_start(services_over_redis, data, "trainer-crash", CRASH_CONFIG)
    store = services_over_redis.store
    while not store.exists("runs/trainer-crash/cycles/0001.json"):
        time.sleep(0.05)
    services_over_redis.kill_while_busy("trainer", "samples-generated")
    assert services_over_redis.pending("samples-generated", "trainer") == 1   # held by the dead trainer
    services_over_redis.start("trainer")                                      # a new one takes it over

    # SIGTERM while busy: the trainer finishes the round it holds, acknowledges it, and exits cleanly.
    services_over_redis.wait_busy("trainer", "samples-generated")
    trainer = services_over_redis.processes["trainer"]
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(120) == 0
    assert services_over_redis.pending("samples-generated", "trainer") == 0
    services_over_redis.start("trainer")

    assert services_over_redis.wait_completed("trainer-crash")["status"] == "completed"
    report = store.get_json("runs/trainer-crash/report.json")
    check_run_integrity(store, "trainer-crash", report)
    assert report["stop_reason"].startswith("max_cycles") and len(report["cycles"]) == 5
    embedded = run(DistillConfig(data=str(data), **CRASH_CONFIG), tmp_path / "embedded", progress=False).report
    assert comparable(report) == comparable(embedded.model_dump(mode="json"))
    assert services_over_redis.pending("samples-generated", "trainer") == 0


def test_the_generator_killed_mid_answer_is_restarted_and_no_sample_is_lost_or_doubled(services_over_redis,
                                                                                      tmp_path):
    data = make_toy_dataset(tmp_path / "toy", train_per_class=300)
    # The guided simulation loads MiniLM and embeds the pool on its first request: seconds to kill it in.
    submit_and_start(services_over_redis, data, "generator-crash", {**CRASH_CONFIG, "teacher": "pool-guided"})
    services_over_redis.kill_while_busy("generator", "negatives-mined")
    services_over_redis.start("generator")

    assert services_over_redis.wait_completed("generator-crash")["status"] == "completed"
    store = services_over_redis.store
    report = store.get_json("runs/generator-crash/report.json")
    check_run_integrity(store, "generator-crash", report)
    assert report["teacher"]["name"] == "pool-guided" and len(report["cycles"]) == 5
    assert services_over_redis.pending("negatives-mined", "generator") == 0
