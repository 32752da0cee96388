"""The ingest service as an OS process over the real Kafka-protocol broker (Tansu: Kafka-compatible,
not Apache Kafka), fed by `pgkd send`: a stream with bad messages in it and a run it triggers through
the four loop services (a SIGKILL mid-batch and restarts at scale: test_stream_storage_tansu.py)."""
import json
import time

import pytest
from pgkd.distributed.messages import DeadLetter
from stream_fixtures import base_run, new_samples, stored
from test_services_kafka import CONFIG

import pgkd_services as services

BASE = {**CONFIG, "max_cycles": 1}   # the tiny student: the test is about the stream, not the student


def bad_rows(n: int) -> list[tuple[str, str]]:
    """`n` bad lines of a JSON Lines file and the reason ingest must give for each, in turn."""
    kinds = [('{"text": "   ", "label": "refund"}', "empty_text"),
             ('{"text": "please close my account %d", "label": "close_account"}', "unknown_label"),
             (json.dumps({"text": "refund my money " * 200 + "%d", "label": "refund"}), "oversized"),
             ('{"text": "cut off mid-line %d", "label": ', "not_json")]
    rows = []
    for i in range(n):
        line, reason = kinds[i % len(kinds)]
        rows.append((line.replace("%d", str(i)) if "%d" in line else line + " " * i, reason))
    return rows


def stream_file(path, good: list[dict], bad: list[tuple[str, str]]) -> dict[str, str]:
    """Good and bad lines interleaved (a bad one every 20 lines); returns each bad line's reason."""
    lines, reasons = [], {}
    bad = list(bad)
    for i, row in enumerate(good):
        lines.append(json.dumps(row))
        if i % 19 == 18 and bad:
            line, reason = bad.pop(0)
            lines.append(line)
            reasons[line] = reason
    for line, reason in bad:
        lines.append(line)
        reasons[line] = reason
    path.write_text("\n".join(lines) + "\n")
    return reasons


def wait_until(condition, what: str, processes, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s; logs:\n{processes.log_tails()}")
        time.sleep(0.25)


def stored_texts(store) -> list[str]:
    return [s.text for s in stored(store)]


def test_a_thousand_streamed_samples_five_percent_bad_are_stored_once_dead_lettered_and_trigger_a_run(
        services_over_kafka, tmp_path):
    processes, store = services_over_kafka, services_over_kafka.store
    data, _ = base_run(tmp_path, store, **BASE)
    good = new_samples(data, 950)
    reasons = stream_file(tmp_path / "stream.jsonl", good, bad_rows(50))
    for name in services.NAMES:
        processes.start(name)
    processes.start("ingest", PGKD_STREAM_BASE_RUN="base", PGKD_STREAM_TRIGGER_COUNT="500",
                    PGKD_STREAM_DRIFT_WINDOW="100000")
    sent = processes.pgkd("send", str(tmp_path / "stream.jsonl"), "--no-progress")
    assert sent.returncode == 0, sent.stderr
    assert "sent 1000 sample(s)" in sent.stdout

    wait_until(lambda: len(processes.bodies("dead-letter")) >= 50 and len(stored_texts(store)) >= 950,
               "all 1000 samples handled", processes)
    letters = [DeadLetter.model_validate_json(b) for b in processes.bodies("dead-letter")]
    assert sorted((d.payload, d.reason.split(":")[0]) for d in letters) == sorted(reasons.items())
    assert {d.service for d in letters} == {"ingest"}
    texts = stored_texts(store)
    assert sorted(texts) == sorted(r["text"] for r in good)          # every good one, once

    wait_until(lambda: store.exists("streams/default/decisions/default-0001.json"), "the triggered run decided",
               processes, timeout=300)
    state = store.get_json("streams/default/state.json")
    (run,) = state["runs"]
    # The trigger is looked at after each batch: the run holds the whole batch that crossed 500
    through = run["samples_through"]
    assert run["trigger"] == {"kind": "count", "detail": f"{through} new samples >= 500"} and 500 <= through <= 950
    completed = store.get_json("runs/default-0001/completed.json")
    assert completed["status"] == "completed"
    decision = run["decision"]
    assert decision["replaced"] == (decision["new_score"] > decision["current_score"])
    assert state["current"]["run_id"] == ("default-0001" if decision["replaced"] else "base")
    status = processes.pgkd("stream", "status")
    assert status.returncode == 0, status.stderr
    assert "950 samples stored" in status.stdout and f"run default-0001 (count: {through}" in status.stdout
    assert processes.stop() == {name: 0 for name in (*services.NAMES, "ingest")}
