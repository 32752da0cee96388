"""The stream's drift check with ingest as an OS process over the real Kafka-protocol broker (Tansu:
Kafka-compatible, not Apache Kafka): 5,000 samples of the same distribution start no run, a stream with
30% of its labels remapped does. A file of its own, so that pytest-xdist can run it beside the storage tests."""
import json

from pgkd.distributed.messages import RunRequested
from stream_fixtures import REMAP, base_run, new_samples, stored_count
from test_ingest_tansu import wait_until


def test_same_distribution_samples_start_no_drift_run_and_a_stream_with_30_percent_of_labels_remapped_does(
        services_over_kafka, tmp_path):
    processes, store = services_over_kafka, services_over_kafka.store
    data, _ = base_run(tmp_path, store)                 # MiniLM frozen: it knows the toy classes
    rows = new_samples(data, 6000, seed=11)
    same, later = rows[:5000], rows[5000:]
    remapped = [{**r, "label": REMAP[r["label"]]} if i % 10 < 3 else r for i, r in enumerate(later)]
    settings = dict(PGKD_STREAM_BASE_RUN="base", PGKD_STREAM_TRIGGER_COUNT="1000000")   # the default drift check
    (tmp_path / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    assert processes.pgkd("send", str(tmp_path / "same.jsonl"), "--no-progress").returncode == 0
    processes.start("ingest", **settings)
    wait_until(lambda: stored_count(store) >= 5000 and
               store.get_json("streams/default/state.json")["drift_checked_through"] >= 5000,
               "5,000 samples stored and checked", processes)
    state = store.get_json("streams/default/state.json")
    assert state["runs"] == [] and state["pending_trigger"] is None
    assert state["current"]["drift_reference"] > 0.9 and not any(c["drifted"] for c in state["drift_checks"])
    assert len(state["drift_checks"]) == 20         # the latest 20 of the 25 windows are kept

    (tmp_path / "remapped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in remapped))
    assert processes.pgkd("send", str(tmp_path / "remapped.jsonl"), "--no-progress").returncode == 0
    wait_until(lambda: store.get_json("streams/default/state.json")["runs"], "a drift run", processes)
    (run,) = store.get_json("streams/default/state.json")["runs"]
    assert run["trigger"]["kind"] == "drift" and "< reference" in run["trigger"]["detail"]
    assert run["settings"]["drift_window"] == 200 and run["settings"]["drift_margin"] == 0.1
    wait_until(lambda: any(RunRequested.model_validate_json(b).run_id == "default-0001"
                           for b in processes.bodies("run-requested")), "the run published", processes)
    assert processes.stop()["ingest"] == 0
