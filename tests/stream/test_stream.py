"""A stream of labeled samples, in the engine (pgkd.stream): validation, deduplication, routing,
the count and drift triggers, the warm-started run on the grown dataset and the decision."""
import json

import numpy as np
import pytest
from pgkd.artifacts import ArtifactStore
from pgkd.data import normalize_text, read_samples
from pgkd.errors import UserError
from pgkd.students.finetuned import FineTunedStudent
from pgkd.distributed.steps import run_through_steps
from pgkd.distributed.steps import run_context
from pgkd.stream import Rejected, Stream, StreamSettings, parse_sample, route, text_key
from pgkd.students import load_student
from stream_fixtures import LABELS, REMAP, base_run, body, new_samples

SETTINGS = StreamSettings(max_chars=200)


@pytest.mark.parametrize("message, reason", [
    (b"not json at all", "not_json"),
    (b"", "not_json"),
    (b'["a list"]', "not_json"),
    (b'{"text": "lost my card"}', "invalid_fields"),
    (b'{"text": 7, "label": "card_lost"}', "invalid_fields"),
    (b'{"text": "lost my card", "label": "  "}', "invalid_fields"),
    (b'{"text": "  \\n ", "label": "card_lost"}', "empty_text"),
    (json.dumps({"text": "card " * 50, "label": "card_lost"}).encode(), "oversized"),
    (b"x" * 10_000, "oversized"),
])
def test_a_bad_message_is_rejected_with_its_reason(message, reason):
    with pytest.raises(Rejected) as caught:
        parse_sample(message, SETTINGS)
    assert caught.value.reason == reason and str(caught.value).startswith(f"{reason}: ")


def test_a_good_message_is_read_with_its_text_tidied_and_extra_fields_ignored():
    sample = parse_sample(b'{"text": "  lost   my card ", "label": "card_lost", "source": "agent-7", "id": "t1", '
                          b'"ticket_url": "https://x"}', SETTINGS)
    assert (sample.text, sample.label, sample.source, sample.id) == ("lost my card", "card_lost", "agent-7", "t1")
    with pytest.raises(Rejected, match="too_short"):
        parse_sample(b'{"text": "hi", "label": "card_lost"}', StreamSettings(min_chars=3))


def test_routing_is_a_stable_function_of_the_normalised_text():
    texts = [f"sample number {i} about cards" for i in range(3000)]
    held_out = [route(t, 20) == "validation" for t in texts]
    assert 0.17 < np.mean(held_out) < 0.23
    assert [route(t.upper().replace(" ", "  "), 20) == "validation" for t in texts] == held_out
    assert {route(t, 0) for t in texts} == {"train"} and {route(t, 100) for t in texts} == {"validation"}


def test_each_new_text_is_stored_once_and_the_stream_reads_back_after_a_restart(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, _ = base_run(tmp_path, store)
    settings = StreamSettings(base_run="base", trigger_count=1000, drift_window=1000)
    stream = Stream(store, settings)
    stream.open()
    rows = new_samples(data, 30)
    assert [stream.ingest(body(r)) for r in rows] == ["accepted"] * 30
    splits = run_context(store, "base").splits
    again = {"text": "  " + rows[3]["text"].upper() + " ", "label": rows[3]["label"]}
    for sample in (splits.train[0], splits.validation[0], splits.test[0], again):
        assert stream.ingest(body(dict(sample))) == "duplicate"
    # The pool is labeled data the student never saw: new to it, so stored.
    assert stream.ingest(body(dict(splits.pool[0]))) == "accepted"
    rows.append(dict(splits.pool[0]))
    stored = [json.loads(line) for key in store.list("streams/default/segments") if key.endswith(".jsonl")
              for line in store.get_bytes(key).splitlines()]
    assert [s["text"] for s in stored] == [r["text"] for r in rows]
    assert [s["seq"] for s in stored] == list(range(1, 32))
    assert all(s["split"] == route(s["text"], 20) for s in stored)

    restarted = Stream(store, settings)     # a new process: everything comes back from the store
    restarted.open()
    assert [s.text for s in restarted.log.read()] == [r["text"] for r in rows]
    assert restarted.ingest(body(rows[0])) == "duplicate"
    assert restarted.ingest(body(new_samples(data, 31)[30])) == "accepted"
    assert list(restarted.log.read())[-1].seq == 32


def test_enough_new_samples_start_one_warm_started_run_on_the_grown_dataset_and_record_its_decision(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, base = base_run(tmp_path, store)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=20, drift_window=1000))
    stream.open()
    assert stream.state.current.run_id == "base" and stream.state.current.checkpoint == base.best_checkpoint
    [first_student] = stream.unpublished()          # the base run's student goes to serving first
    assert (first_student.kind, first_student.run_id, first_student.checkpoint) == \
        ("student-promoted", "base", base.best_checkpoint)
    stream.promotion_published("base")
    rows = new_samples(data, 45)
    for row in rows[:19]:
        stream.ingest(body(row))
    assert stream.due_trigger() is None
    stream.ingest(body(rows[19]))
    trigger = stream.due_trigger()
    assert trigger.kind == "count" and trigger.detail.startswith("20 new samples")

    request = stream.start_run(trigger)
    assert request.run_id == "default-0001" and request.start_from == base.best_checkpoint
    splits = store.get_json(request.dataset)["splits"]
    streamed = {"train": [], "validation": []}
    for s in stream.log.read():
        streamed[s.split].append(s.text)
    base_train = [json.loads(line)["text"] for line in store.get_bytes(stream.state.current.train_set).splitlines()]
    assert [r["text"] for r in splits["train"]] == base_train + streamed["train"]
    assert [r["text"] for r in splits["validation"]][-len(streamed["validation"]):] == streamed["validation"]
    assert not {normalize_text(r["text"]) for r in splits["pool"]} & {normalize_text(r["text"]) for r in rows}
    assert [r["text"] for r in splits["test"]] == [s.text for s in read_samples(data / "test.jsonl")]
    assert stream.unpublished() == [request]
    stream.published(request.run_id)
    assert stream.unpublished() == [] and stream.new_samples() == 0

    for row in rows[20:45]:    # enough for another run, but one runs at a time
        stream.ingest(body(row))
    assert stream.due_trigger() is None

    completed = run_through_steps(request, store)
    assert completed.status == "completed"
    decision = stream.run_completed(completed)
    assert store.get_json("streams/default/decisions/default-0001.json") == decision.model_dump(mode="json")
    assert decision.validation_size == len(stream.validation_set()) > len(splits["validation"])
    assert decision.replaced == (decision.new_score > decision.current_score)
    assert stream.state.current.run_id == ("default-0001" if decision.replaced else "base")
    promoted = [m for m in stream.unpublished() if m.kind == "student-promoted"]
    assert [(m.run_id, m.checkpoint, m.source, m.decision) for m in promoted] == \
        ([("default-0001", completed.best_checkpoint, "stream", decision.reason)] if decision.replaced else [])
    assert stream.run_completed(completed) is None      # redelivered: decided once
    assert str(stream.due_trigger()).startswith("count: 25 new samples")


def test_a_stream_whose_labels_were_remapped_triggers_a_run_and_one_from_the_same_distribution_does_not(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, _ = base_run(tmp_path, store)
    same = Stream(store, StreamSettings(stream="same", base_run="base", trigger_count=1000, drift_window=40,
                                        drift_margin=0.2))
    same.open()
    assert same.state.current.validation_accuracy > 0.9
    for row in new_samples(data, 80, seed=1):
        same.ingest(body(row))
        same.check_drift()
    assert [c.drifted for c in same.state.drift_checks] == [False, False]
    assert min(c.accuracy for c in same.state.drift_checks) > 0.9 and same.due_trigger() is None

    remapped = Stream(store, StreamSettings(stream="remapped", base_run="base", trigger_count=1000, drift_window=40,
                                            drift_margin=0.2))
    remapped.open()
    for row in new_samples(data, 40, seed=2, remap=REMAP):
        remapped.ingest(body(row))
        remapped.check_drift()
    (check,) = remapped.state.drift_checks
    assert check.drifted and check.accuracy < 0.1
    assert remapped.due_trigger().kind == "drift" and remapped.due_trigger().detail.startswith("accuracy")
    assert remapped.start_run(remapped.due_trigger()).run_id == "remapped-0001"


def test_a_new_label_is_rejected_unless_the_stream_extends_its_taxonomy_and_then_the_next_student_has_it(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, base = base_run(tmp_path, store, student="tiny", epochs=2, learning_rate=1e-2, head_learning_rate=1e-2)
    closing = [{"text": f"please close my account number {i} for good", "label": "close_account"} for i in range(12)]
    strict = Stream(store, StreamSettings(stream="strict", base_run="base"))
    strict.open()
    with pytest.raises(Rejected, match="unknown_label"):
        strict.ingest(body(closing[0]))

    growing = Stream(store, StreamSettings(stream="growing", base_run="base", new_labels="extend", trigger_count=12,
                                           validation_percent=30))
    growing.open()
    assert [growing.ingest(body(r)) for r in closing] == ["accepted"] * 12
    assert growing.state.labels == sorted(LABELS + ["close_account"])
    request = growing.start_run(growing.due_trigger())
    completed = run_through_steps(request, store)
    student = load_student(store.get_folder(completed.best_checkpoint, tmp_path / "cache"))
    assert student.labels == growing.state.labels and student.model.classifier.out_features == 5
    decision = growing.run_completed(completed)
    assert decision.current_accuracy is not None    # the old student, scored on labels it does not know


def test_a_grown_head_keeps_what_the_student_knew_of_the_old_labels():
    student = FineTunedStudent.create("tiny", LABELS, seed=3)
    texts = ["lost my card", "send money to my account"]
    before = student.predict_proba(texts)
    student.with_labels(["aaa_new"] + LABELS)
    after = student.predict_proba(texts)
    logits_ratio = np.log(after[:, 1:]) - np.log(after[:, 1:]).mean(axis=1, keepdims=True)
    assert np.allclose(logits_ratio, np.log(before) - np.log(before).mean(axis=1, keepdims=True), atol=1e-4)
    assert student.labels[0] == "aaa_new" and student.model.config.id2label[0] == "aaa_new"
    with pytest.raises(ValueError, match="added, not removed"):
        student.with_labels(LABELS[1:])


def test_a_stream_needs_its_base_run_and_sane_settings(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    with pytest.raises(UserError, match="set PGKD_STREAM_BASE_RUN"):
        Stream(store, StreamSettings()).open()
    with pytest.raises(UserError, match="PGKD_STREAM_BASE_RUN=nope: no such run"):
        Stream(store, StreamSettings(base_run="nope")).open()
    with pytest.raises(UserError, match="PGKD_STREAM_DRIFT_MARGIN='lots'"):
        StreamSettings.from_env({"PGKD_STREAM_DRIFT_MARGIN": "lots"})
    with pytest.raises(UserError, match="PGKD_STREAM_NEW_LABELS='maybe'"):
        StreamSettings.from_env({"PGKD_STREAM_NEW_LABELS": "maybe"})
    assert StreamSettings.from_env({"PGKD_STREAM_TRIGGER_COUNT": "7"}).trigger_count == 7
    assert StreamSettings.from_env({"PGKD_STREAM_RUN": '{"max_cycles": 2}'}).run == {"max_cycles": 2}
    with pytest.raises(UserError, match="PGKD_STREAM_RUN='max_cycles=2': not a JSON object"):
        StreamSettings.from_env({"PGKD_STREAM_RUN": "max_cycles=2"})
    with pytest.raises(UserError, match="PGKD_STREAM_RUN=.*not options of a run: cycles"):
        StreamSettings.from_env({"PGKD_STREAM_RUN": '{"cycles": 2}'})


def test_text_keys_ignore_case_and_spacing():
    assert text_key("Lost  my CARD") == text_key("lost my card ") != text_key("lost my cards")


def test_take_says_what_to_do_with_each_message_and_finished_what_follows_a_run(tmp_path):
    """The one entry point per incoming sample, as ingest and `pgkd bench stream` use it: store it,
    dead-letter it (with the reason), or start a run (with a typed trigger) and publish it."""
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, base = base_run(tmp_path, store)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=3, drift_window=1000))
    stream.open()
    assert [(m.kind, m.run_id) for m in stream.resume().publish] == [("student-promoted", "base")]
    stream.promotion_published("base")
    rows = new_samples(data, 4)
    first = stream.take(body(rows[0]))
    assert (first.outcome, first.rejected, first.started, first.publish) == ("accepted", None, None, [])
    assert stream.take(body(rows[0])).outcome == "duplicate"
    bad = stream.take(b'{"text": "lost my card", "label": "pizza"}')
    assert bad.outcome == "rejected" and bad.rejected.reason == "unknown_label" and bad.publish == []
    stream.take(body(rows[1]))
    third = stream.take(body(rows[2]))
    assert third.outcome == "accepted" and third.started.kind == "count" and str(third.started) == \
        "count: 3 new samples >= 3"
    assert [r.run_id for r in third.publish] == ["default-0001"]
    assert [r.run_id for r in stream.resume().publish] == ["default-0001"]      # not published yet: again
    stream.published("default-0001")
    assert stream.take(body(rows[3])).publish == []                           # one run at a time
    after = stream.finished(run_through_steps(third.publish[0], store))
    assert after.outcome == "decided" and after.decision.run_id == "default-0001"
    assert stream.finished(run_through_steps(third.publish[0], store)).outcome == "ignored"   # decided once


@pytest.mark.parametrize("selection", ["validation", "out-of-fold"])
def test_the_drift_reference_is_a_score_the_teacher_never_aimed_at(tmp_path, selection):
    """Validation that guided the teacher and then selected flatters the kept student: the reference is
    then cycle 0's validation accuracy, before any teacher sample; with out-of-fold selection, the
    scores that selected."""
    from pgkd.loop.state import RunState
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    _, completed = base_run(tmp_path, store, selection_source=selection, guidance_folds=3)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=1000, drift_window=1000))
    stream.open()
    state = store.get_model(completed.state, RunState)
    best = state.best
    assert best.cycle == completed.best_cycle
    expected = state.baseline.validation.accuracy if selection == "validation" else best.selection.accuracy
    assert stream.state.current.validation_accuracy == expected
    assert (best.selection is not None) == (selection == "out-of-fold")
