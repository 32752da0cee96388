"""A stream's storage (pgkd.stream.segments): batches committed by the manifest across segment
files, what a crash leaves behind, a segment cut short on disk, a lost key file; and the Stream on
top of it: batches, per-stream settings read while it runs, the drift reference, old streams moved in."""
import json
import logging

import pytest
from pgkd.artifacts import ArtifactStore
from pgkd.errors import UserError
from pgkd.stream import SegmentDamaged, SegmentLog, Stream, StreamSettings
from pgkd.stream.samples import StoredSample
from pgkd.stream.segments import index_key
from stream_fixtures import LABELS, REMAP, base_run, body, new_samples, stored

PREFIX = "streams/s/segments"


def samples(first: int, last: int) -> list[StoredSample]:
    return [StoredSample(text=f"sample text number {i}", label=LABELS[i % 4], split="validation" if i % 5 == 0
                         else "train", seq=i, arrived_at=0.0) for i in range(first, last + 1)]


def opened(store, segment_samples: int = 7) -> SegmentLog:
    log = SegmentLog(store, PREFIX, segment_samples)
    log.open()
    return log


def test_batches_fill_segments_in_order_and_come_back_whole_after_a_restart(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    log = opened(store)
    for first, last in ((1, 3), (4, 19), (20, 20)):
        log.append(samples(first, last))
    assert [(s.name, s.first_seq, s.last_seq) for s in log.manifest.segments] == \
        [("00000001", 1, 7), ("00000002", 8, 14), ("00000003", 15, 20)]
    again = opened(store)
    assert [s.seq for s in again.read()] == list(range(1, 21)) and again.count == 20 and again.last_seq == 20
    assert again.split_count("validation") == 4 and again.keys == log.keys and len(again.keys) == 20
    assert [s.seq for s in again.read(after_seq=16)] == [17, 18, 19, 20]
    again.append(samples(21, 23))     # the open segment takes one more, then a new one starts
    assert [(s.name, s.samples) for s in again.manifest.segments][-2:] == [("00000003", 7), ("00000004", 2)]
    assert [s.text for s in opened(store).read()] == [s.text for s in samples(1, 23)]


def test_a_second_writer_of_one_stream_is_stopped_before_it_overwrites_the_firsts_samples(tmp_path):
    """Two ingest replicas of one stream (a reviewer's): each overwrote the other's open segment, and 204
    acknowledged samples were gone. The first to see the other's commit now writes nothing."""
    from pgkd.errors import EnvironmentFailure
    from pgkd.stream import AnotherWriter
    store = ArtifactStore(f"file://{tmp_path}")
    first, second = opened(store), opened(store)       # both read the same (empty) stream
    first.append(samples(1, 5))
    with pytest.raises(AnotherWriter, match="another process committed to this stream") as e:
        second.append(samples(1, 3))                   # its own seqs 1..3: it never saw the first's
    assert isinstance(e.value, EnvironmentFailure)     # exit 1 from a service: restarted, not a bad message
    assert [s.text for s in opened(store).read()] == [s.text for s in samples(1, 5)]
    first.append(samples(6, 9))                        # the one writer goes on
    assert opened(store).count == 9


def test_a_batch_a_crash_interrupted_before_its_manifest_is_not_stored_and_its_redelivery_is(tmp_path, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}")
    log = opened(store)
    log.append(samples(1, 5))
    put_json = store.put_json

    def crash_at_the_manifest(key, data):
        if key.endswith("manifest.json"):
            raise SystemExit("killed")
        return put_json(key, data)
    monkeypatch.setattr(store, "put_json", crash_at_the_manifest)
    with pytest.raises(SystemExit):
        log.append(samples(6, 12))      # the open segment rewritten, a new one written; no manifest
    monkeypatch.setattr(store, "put_json", put_json)
    assert store.size(f"{PREFIX}/00000001.jsonl") > log.manifest.segments[0].bytes

    restarted = opened(store)          # the uncommitted lines are cut off; the batch was never acknowledged
    assert restarted.count == 5 and store.size(f"{PREFIX}/00000001.jsonl") == restarted.manifest.segments[0].bytes
    restarted.append(samples(6, 12))   # the bus delivers it again
    assert [s.seq for s in opened(store).read()] == list(range(1, 13))


def test_a_segment_cut_short_on_disk_is_refused_with_its_name_then_repaired_with_the_loss_recorded(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    opened(store).append(samples(1, 20))
    path = tmp_path / PREFIX / "00000002.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 25])     # the disk lost the end of a committed segment
    with pytest.raises(SegmentDamaged, match=r"00000002\.jsonl: cut short: \d+ of its \d+ bytes.*pgkd stream repair s"):
        opened(store)

    (repair,) = SegmentLog(store, PREFIX, 7).repair()
    assert (repair.segment, repair.kept, repair.lost) == ("00000002", 6, 1)
    log = opened(store)
    assert [s.seq for s in log.read()] == [*range(1, 14), *range(15, 21)] and log.count == 19
    assert log.manifest.repairs == [repair] and log.last_seq == 20    # seq 14 is gone; numbering goes on
    assert index_key(samples(14, 14)[0].text) not in log.keys and len(log.keys) == 19   # sent again, it is new
    assert SegmentLog(store, PREFIX, 7).repair() == []               # nothing left to repair


def test_a_committed_segment_with_other_bytes_is_refused_when_read(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    opened(store).append(samples(1, 10))
    path = tmp_path / PREFIX / "00000001.jsonl"
    path.write_bytes(path.read_bytes().replace(b"sample text number 3", b"sample text number X"))
    log = opened(store)                # same size: opening checks sizes only, reading checks the bytes
    with pytest.raises(SegmentDamaged, match="00000001.jsonl: its bytes are not those the manifest committed"):
        list(log.read())


def test_a_manifest_damaged_by_something_else_is_one_line_not_a_traceback(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    opened(store).append(samples(1, 3))
    path = tmp_path / PREFIX / "manifest.json"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SegmentDamaged, match=r"manifest.json: not the manifest pgkd wrote .*restore it"):
        opened(store)


def test_a_lost_key_file_is_rebuilt_from_its_segment(tmp_path, caplog):
    store = ArtifactStore(f"file://{tmp_path}")
    opened(store).append(samples(1, 10))
    keys = opened(store).keys
    (tmp_path / PREFIX / "00000001.keys").unlink()
    (tmp_path / PREFIX / "00000002.keys").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="pgkd.stream"):
        assert opened(store).keys == keys
    assert caplog.text.count("rebuilt from the segment") == 2
    assert opened(store).keys == keys and (tmp_path / PREFIX / "00000001.keys").stat().st_size == 7 * 16


# -- the stream over its storage -------------------------------------------------------------------------------

def test_a_batch_stores_its_new_samples_in_one_commit_and_says_what_became_of_each_message(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, _ = base_run(tmp_path, store)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=1000, drift_window=1000))
    stream.open()
    rows = new_samples(data, 6)
    batch = [body(rows[0]), b"not json", body(rows[1]), body(rows[0]), body({"text": "x", "label": "pizza"}),
             body(rows[2])]
    step = stream.take_batch(batch)
    assert [(t.outcome, t.rejected.reason if t.rejected else None) for t in step.taken] == [
        ("accepted", None), ("rejected", "not_json"), ("accepted", None), ("duplicate", None),
        ("rejected", "unknown_label"), ("accepted", None)]
    assert len(stream.log.manifest.segments) == 1 and [s.seq for s in stored(store)] == [1, 2, 3]
    assert [t.outcome for t in stream.take_batch([body(r) for r in rows[2:]]).taken] == \
        ["duplicate", "accepted", "accepted", "accepted"]
    assert [s.text for s in stored(store)] == [r["text"] for r in rows]


def test_the_settings_file_changes_triggers_and_run_options_without_a_restart_and_runs_record_them(tmp_path, caplog):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, _ = base_run(tmp_path, store)
    path = tmp_path / "stream.yaml"
    path.write_text("trigger_count: 1000\ndrift_window: 1000\n")
    stream = Stream(store, StreamSettings(base_run="base", settings_file=str(path)))
    stream.open()
    assert (stream.settings.trigger_count, stream.settings.drift_window) == (1000, 1000)
    rows = new_samples(data, 12)
    assert stream.take_batch([body(r) for r in rows[:5]]).started is None

    path.write_text("trigger_count: 6\nrun: {max_cycles: 2, samples_per_cycle: 8}\n")      # ingest goes on
    step = stream.take_batch([body(rows[5])])
    assert str(step.started) == "count: 6 new samples >= 6"
    (run,) = stream.state.runs
    assert run.settings["trigger_count"] == 6 and run.settings["run"] == {"max_cycles": 2, "samples_per_cycle": 8}
    assert run.settings_sha256 == stream.settings_file.sha256
    assert run.cut_from == [{"segment": "00000001", "samples": 6, "bytes": stream.log.manifest.segments[0].bytes,
                             "sha256": stream.log.manifest.segments[0].sha256}]     # what its dataset was cut from
    config = next(m for m in step.publish if m.kind == "run-requested").config
    assert (config["max_cycles"], config["samples_per_cycle"], config["student"]) == (2, 8, "minilm-frozen")

    for bad in ("trigger_count: -3\n", "run: {student: 7}\n", "base_run: other\n", "[1, 2]\n", "run: {data: x}\n"):
        path.write_text(bad)
        with caplog.at_level(logging.ERROR, logger="pgkd.stream"):
            caplog.clear()
            stream.take_batch([])
        assert f"{path}: " in caplog.text and "the settings in force stay" in caplog.text, bad
        assert stream.settings.trigger_count == 6
    with pytest.raises(UserError, match=r"stream.yaml: run: data: a stream run's data is the stream's"):
        Stream(store, StreamSettings(base_run="base", settings_file=str(path))).open()
    path.write_text("segment_samples: 5\n")
    with pytest.raises(UserError, match="segment_samples: not settings this file holds"):
        Stream(store, StreamSettings(base_run="base", settings_file=str(path))).open()


def test_the_drift_reference_is_the_students_accuracy_on_its_first_windows_then_a_remapped_stream_drifts(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, _ = base_run(tmp_path, store)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=10_000, drift_window=40, drift_margin=0.2,
                                          drift_reference_windows=2))
    stream.open()
    same = new_samples(data, 120, seed=1)
    stream.take_batch([body(r) for r in same])
    first, second, third = stream.state.drift_checks
    assert (first.role, second.role, third.role) == ("reference", "reference", "check")
    assert first.reference == stream.state.current.reference_floor == stream.state.current.validation_accuracy
    assert stream.state.current.drift_reference == third.reference      # the same number, carried
    assert stream.state.current.drift_reference == pytest.approx((first.accuracy + second.accuracy) / 2)
    assert not any(c.drifted for c in stream.state.drift_checks) and stream.due_trigger() is None

    rows = new_samples(data, 40, seed=2, remap=REMAP)
    step = stream.take_batch([body(r) for r in rows])
    assert stream.state.drift_checks[-1].drifted and step.started.kind == "drift"
    assert "< reference" in step.started.detail and stream.state.runs[-1].trigger == step.started

    restarted = Stream(store, StreamSettings(base_run="base", drift_window=40, drift_reference_windows=2))
    restarted.open()                    # the reference is remembered, not made again
    assert restarted.state.current.drift_reference == stream.state.current.drift_reference
