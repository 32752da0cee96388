"""The stop decision taken from Prometheus: the services export the loop's metrics, a real
Prometheus server scrapes them, and the evaluator's stop policy reads them back with PromQL."""
import json
import os
import time


from conftest import make_toy_dataset, prometheus_query
from pgkd.distributed import steps
from pgkd.artifacts import ArtifactStore
from pgkd.loop.config import DistillConfig
from pgkd.distributed.messages import (CycleEvaluated, ModelTrained, NegativesMined, RunCompleted, RunRequested,
                           SamplesGenerated)
from pgkd.distributed.metrics_readers import PrometheusReader
from test_services_kafka import CONFIG
from service_processes import cli_options

import pgkd_services as services

# min_delta 1.0: no macro-F1 (in [0, 1]) can improve on another by more, so cycle 0 stays the best on
# any CPU and patience ends the run at cycle 2, whatever the scores.
PATIENCE = {**CONFIG, "patience": 2, "max_cycles": 6, "min_delta": 1.0}


def test_the_run_stops_on_patience_read_from_prometheus(services_over_kafka, tmp_path):
    processes = services_over_kafka
    url = processes.start_prometheus()    # scraping the services' ports; PGKD_PROMETHEUS_URL for them
    processes.ready()
    data = make_toy_dataset(tmp_path / "toy")
    submitted = processes.pgkd("submit", "--data", str(data), "--run-id", "watched", *cli_options(PATIENCE))
    assert submitted.returncode == 0, submitted.stderr
    for name in services.NAMES:
        processes.start(name)
    completed = RunCompleted.model_validate(processes.wait_completed("watched"))
    assert completed.status == "completed", processes.log_tails()
    report = processes.store.get_json(completed.report)
    scores = [c["validation"]["macro_f1"] for c in report["cycles"]]
    # Stopped by patience, two cycles past the best, on figures from Prometheus.
    assert completed.reason == "patience: no macro_f1 improvement for 2 cycles"
    assert completed.best_cycle == 0 and completed.cycle == 2 == len(scores) - 1
    assert completed.decided_from == "prometheus"
    # What the policy read is there for anyone to query, and the decision is a metric too.
    series = prometheus_query(url, 'pgkd_validation_score{run="watched",metric="macro_f1"}')
    assert sorted((int(s["metric"]["cycle"]), float(s["value"][1])) for s in series) == list(enumerate(scores))
    assert {s["metric"]["service"] for s in series} == {"evaluator"}
    for _ in range(50):  # set as the run ended: wait for the next scrape
        stopped = prometheus_query(url, 'pgkd_run_stopped{run="watched"}')
        if stopped:
            break
        time.sleep(0.2)
    assert [(s["metric"]["reason"], s["value"][1]) for s in stopped] == [("patience", "1")]
    assert prometheus_query(url, 'sum(faststream_received_messages_total{service="trainer"})')
    # The reader the evaluator used, asked again: the same history, and the generator's spend gauges.
    figures = PrometheusReader(url, wait=5).read("watched", "macro_f1", completed.cycle)
    assert figures.history == scores and figures.source == "prometheus" and figures.tokens == 0
    spend = prometheus_query(url, 'pgkd_run_teacher_tokens{run="watched"}')
    assert {(s["metric"]["kind"], s["metric"]["service"]) for s in spend} == {("prompt", "generator"),
                                                                              ("completion", "generator")}


def test_without_prometheus_the_evaluator_says_it_decided_on_the_run_records(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **{**CONFIG, "max_cycles": 1})
    reader = PrometheusReader("http://127.0.0.1:9", wait=1, timeout=1)   # nothing listens there
    message = steps.submit(config, store, run_id="blind")
    route = {RunRequested: steps.train, SamplesGenerated: steps.train, CycleEvaluated: steps.mine,
             NegativesMined: steps.generate,
             ModelTrained: lambda m, s: steps.evaluate(m, s, reader=reader)}
    while not isinstance(message, RunCompleted):
        message = route[type(message)](message, store)
    assert message.reason.startswith("max_cycles")
    assert message.decided_from.startswith("run records, because Prometheus at http://127.0.0.1:9 cannot be queried")
    assert os.path.exists(tmp_path / "artifacts" / "runs" / "blind" / "report.json") and json
