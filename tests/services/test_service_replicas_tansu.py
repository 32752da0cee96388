"""Two replicas of every loop service over the real broker (Tansu, Kafka-compatible, not Apache Kafka),
one of them killed holding a round: a file of its own, so that pytest-xdist can run it beside
test_services_tansu.py's other long tests rather than after them."""
import sys

from conftest import make_toy_dataset
from pgkd.loop.report import without_times
from pgkd.processes import spawn, stop
from service_processes import cli_options
from test_services_kafka import CONFIG
from test_services_tansu import check_run_integrity, embedded_report, kill_in_flight

import pgkd_services as services


def one_run_per_partition(partitions: int = 3) -> list[str]:
    """Run ids whose messages land on different partitions (Kafka's default partitioner: murmur2 of
    the key), so every replica has a run to work on."""
    from kafka.partitioner.default import murmur2
    chosen: dict[int, str] = {}
    for i in range(100):
        run_id = f"replica-{i}"
        chosen.setdefault((murmur2(run_id.encode()) & 0x7FFFFFFF) % partitions, run_id)
    return [chosen[p] for p in range(partitions)]


def test_two_replicas_of_every_service_complete_three_runs_at_once_and_survive_a_dead_trainer(
        services_over_kafka, tmp_path):
    """Two processes of each loop service in its consumer group, three runs submitted at once, one on
    each partition. One trainer replica is killed holding a round: the group gives its partitions to
    the other, which is delivered that round, and all three runs equal their embedded runs."""
    processes = services_over_kafka
    runs = dict(zip(one_run_per_partition(), (1, 2, 3)))       # run id -> seed
    data = make_toy_dataset(tmp_path / "toy")
    submits = {}
    for run_id, seed in runs.items():      # at once
        options = cli_options({**CONFIG, "max_cycles": 3, "seed": seed})
        with (tmp_path / f"submit-{run_id}.log").open("w") as log:
            submits[run_id] = spawn([sys.executable, "-m", "pgkd.cli", "submit", "--data", str(data),
                                     "--run-id", run_id, *options], log=log, env=processes.env)
    try:
        for run_id, submit in submits.items():
            assert submit.wait(120) == 0, (tmp_path / f"submit-{run_id}.log").read_text()
    finally:
        stop(submits.values())
    for name in services.NAMES:
        for label in (name, f"{name}-2"):
            processes.start(name, label)

    held = kill_in_flight(processes, "trainer-2", "samples-generated")
    for run_id in runs:
        assert processes.wait_completed(run_id)["status"] == "completed"
    assert held in processes.received("trainer", "samples-generated"), "the round trainer-2 held went nowhere"
    for name in ("evaluator", "miner", "generator"):      # both replicas of each took part
        kind = {"evaluator": "model-trained", "miner": "cycle-evaluated", "generator": "negatives-mined"}[name]
        assert processes.handled(name, kind) and processes.handled(f"{name}-2", kind), name
    for run_id, seed in runs.items():
        report = processes.store.get_json(f"runs/{run_id}/report.json")
        check_run_integrity(processes.store, run_id, report)
        config = {**CONFIG, "max_cycles": 3, "seed": seed}
        assert without_times(report) == embedded_report(data, config, tmp_path / f"embedded-{run_id}"), run_id
