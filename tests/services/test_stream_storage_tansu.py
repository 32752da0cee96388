"""The stream at scale, with ingest as an OS process over the real Kafka-protocol broker (Tansu:
Kafka-compatible, not Apache Kafka): a restart at 100,000 stored samples, a SIGKILL in the middle of
a batch, a segment cut short on disk (the drift check: test_stream_drift_tansu.py)."""
import json
import signal
import time

from pgkd.distributed.messages import DeadLetter
from pgkd.stream import Stream, StreamSettings
from stream_fixtures import LABELS, base_run, body, stored, stored_count
from test_ingest_tansu import BASE, bad_rows, stream_file, wait_until

QUIET = dict(PGKD_STREAM_BASE_RUN="base", PGKD_STREAM_TRIGGER_COUNT="1000000000",
             PGKD_STREAM_DRIFT_WINDOW="1000000")   # no run, no drift check: these tests are about storage


def synthetic(n: int, start: int = 0) -> list[dict]:
    """`n` distinct labeled texts in the toy taxonomy (the scale tests need many, not realistic ones)."""
    return [{"text": f"ticket {i} please help with my {LABELS[i % 4].replace('_', ' ')} issue", "label": LABELS[i % 4]}
            for i in range(start, start + n)]


def counts(log_text: str) -> tuple[int, int]:
    """Batches ingest received, and batches it finished, by its log lines."""
    return log_text.count("sample message(s) received"), log_text.count(" stored, ")


def test_ingest_restarted_at_100k_stored_samples_reloads_its_index_and_refuses_a_segment_cut_short(
        services_over_kafka, tmp_path):
    processes, store = services_over_kafka, services_over_kafka.store
    base_run(tmp_path, store, **BASE)
    rows = synthetic(100_000)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=10**9, drift_window=10**6))
    stream.open()
    for i in range(0, len(rows), 5000):      # 100,000 stored, as an earlier ingest would have left them
        stream.take_batch([body(r) for r in rows[i:i + 5000]])
    assert stream.log.count == 100_000 and len(stream.log.manifest.segments) == 10
    segments = tmp_path / "artifacts/streams/default/segments"
    (segments / "00000004.keys").unlink()    # a lost index file: rebuilt, nothing lost with it

    fresh = synthetic(300, start=100_000)
    reasons = stream_file(tmp_path / "more.jsonl", rows[-300:] + fresh, bad_rows(20))   # 300 already stored
    assert processes.pgkd("send", str(tmp_path / "more.jsonl"), "--no-progress").returncode == 0
    processes.start("ingest", **QUIET)
    wait_until(lambda: stored_count(store) >= 100_300 and len(processes.bodies("dead-letter")) >= 20,
               "the replay and the new samples handled", processes)
    log = processes.log_text("ingest")
    assert "100000 samples stored in 10 segment(s)" in log and "00000004 does not match" in log
    texts = [s.text for s in stored(store)]
    # three partitions: arrival order across them is the broker's
    assert len(texts) == len(set(texts)) == 100_300 and set(texts[-300:]) == {r["text"] for r in fresh}
    assert [s.seq for s in stored(store)] == list(range(1, 100_301))
    letters = [DeadLetter.model_validate_json(b) for b in processes.bodies("dead-letter")]
    assert {(d.payload, d.reason.split(":")[0]) for d in letters} == set(reasons.items())
    assert processes.stop()["ingest"] == 0

    # The disk loses the end of a committed segment: ingest refuses to start, one line, exit 2.
    before = {s.text for s in stored(store)}
    path = segments / "00000005.jsonl"
    path.write_bytes(path.read_bytes()[:-500])
    processes.start("ingest", **QUIET)
    assert processes.processes["ingest"].wait(120) == 2
    log = processes.log_text("ingest")
    assert "00000005.jsonl: cut short" in log and "pgkd stream repair default" in log and "Traceback" not in log
    status = processes.pgkd("stream", "status")
    assert "DAMAGED: segment 00000005: cut short" in status.stdout, status.stdout + status.stderr
    repaired = processes.pgkd("stream", "repair")
    assert repaired.returncode == 0 and "segment 00000005 (cut short" in repaired.stdout, repaired.stderr
    lost = before - {s.text for s in stored(store)}
    assert 1 <= len(lost) <= 6 and f"{len(lost)} lost" in repaired.stdout

    # Ingest starts again; the lost samples, sent again, are stored again.
    resend = [r for r in rows if r["text"] in lost]
    (tmp_path / "lost.jsonl").write_text("".join(json.dumps(r) + "\n" for r in resend))
    assert processes.pgkd("send", str(tmp_path / "lost.jsonl"), "--no-progress").returncode == 0
    processes.start("ingest", **QUIET)
    wait_until(lambda: stored_count(store) >= 100_300, "the lost samples stored again", processes)
    assert {s.text for s in stored(store)} == before and stored_count(store) == 100_300
    assert processes.stop()["ingest"] == 0


def test_ingest_killed_in_the_middle_of_a_batch_loses_and_duplicates_nothing(services_over_kafka, tmp_path):
    processes, store = services_over_kafka, services_over_kafka.store
    base_run(tmp_path, store, **BASE)
    good = synthetic(10_000)
    reasons = stream_file(tmp_path / "stream.jsonl", good, bad_rows(40))   # bad ones inside the batches
    assert processes.pgkd("send", str(tmp_path / "stream.jsonl"), "--no-progress").returncode == 0
    settings = {**QUIET, "PGKD_STREAM_BATCH_MAX": "1000"}
    processes.start("ingest", **settings)
    ingest = processes.processes["ingest"]
    deadline, killed = time.monotonic() + 180, None
    while killed is None and time.monotonic() < deadline:
        received, finished = counts(processes.log_text("ingest"))
        if received > finished:
            ingest.send_signal(signal.SIGSTOP)         # frozen: is it still in the middle of that batch?
            received, finished = counts(processes.log_text("ingest"))
            if received > finished:
                killed = received
                processes.kill("ingest")
            else:
                ingest.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    assert killed is not None, f"never caught ingest in the middle of a batch:\n{processes.log_tails()}"
    assert stored_count(store) < 10_000

    processes.start("ingest", **settings)
    wait_until(lambda: stored_count(store) >= 10_000 and len(processes.bodies("dead-letter")) >= 40,
               "the rest of the stream handled", processes)
    time.sleep(2)      # anything left to redeliver would show up now
    texts = [s.text for s in stored(store)]
    assert len(texts) == len(set(texts)) == 10_000 and set(texts) == {r["text"] for r in good}
    assert [s.seq for s in stored(store)] == list(range(1, 10_001))
    letters = [DeadLetter.model_validate_json(b) for b in processes.bodies("dead-letter")]
    # Dead letters are at least once: those of the batch in hand when the process died may be sent twice.
    assert {(d.payload, d.reason.split(":")[0]) for d in letters} == set(reasons.items())
    assert processes.uncommitted("labeled-samples", "ingest") == 0
    assert processes.stop()["ingest"] == 0
