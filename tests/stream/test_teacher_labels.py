"""Teacher labels in a stream: a sample marked `source: teacher` (an LLM's answer on a text the served
student deferred) is told apart from a human label everywhere. It always goes to train, never to
validation (so it never selects or promotes a student) nor to a drift window; a run's training set
holds at most `max_teacher_label_share` of them, the newest; duplicates and poison go where they go
for human labels; the status, the manifest, the runs and ingest's metrics count the two apart."""
import asyncio
import json
from fractions import Fraction

import pytest
from faststream import Context
from faststream.kafka import TestKafkaBroker
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client import CollectorRegistry
from pgkd.artifacts import ArtifactStore
from pgkd.cli import main
from pgkd.data import normalize_text
from pgkd.distributed.messages import LabeledSample, source_kind
from pgkd.distributed.metrics import LoopMetrics
from pgkd.errors import UserError
from pgkd.stream import StoredSample, Stream, StreamSettings, Trigger, parse_sample, split_for
from pgkd.stream.settings import RELOADABLE
from pgkd.stream.teacher_share import bound_teacher_share, teacher_labels_allowed
from pgkd.types import Sample
from stream_fixtures import LABELS, REMAP, base_run, body, new_samples, stored

import pgkd_services as services
from pgkd_services.runtime import Settings, make_broker, send

# texts a producer may send: anything with a visible character (whitespace is tidied, never all of it)
TEXTS = st.text(min_size=1, max_size=60).filter(lambda t: t.split())


def teacher(row: dict, model: str = "llama-3.1-70b") -> dict:
    return {**row, "source": "teacher", "model": model}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One completed base run for the module's streams (each test names its own stream)."""
    folder = tmp_path_factory.mktemp("teacher-labels")
    store = ArtifactStore(f"file://{folder}/artifacts")
    data, _ = base_run(folder, store)
    return store, data


def opened(store, **options) -> Stream:
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=100_000, drift_window=100_000, **options))
    stream.open()
    return stream


# -- the rule, and routing ---------------------------------------------------------------------------------------

def test_only_the_source_teacher_is_a_teacher_label_and_the_message_keeps_its_model():
    assert [source_kind(s) for s in ("teacher", None, "pool", "agent-7", "Teacher", "teacher ")] == \
        ["teacher", "human", "human", "human", "human", "human"]
    sample = parse_sample(body(teacher({"text": " lost  my card ", "label": "card_lost"}, model=" gpt-4o ")),
                          StreamSettings())
    assert sample.is_teacher and (sample.text, sample.source, sample.model) == ("lost my card", "teacher", "gpt-4o")
    assert not LabeledSample(text="x", label="y", source="agent-7").is_teacher


@given(TEXTS)
def test_a_teacher_label_is_routed_to_train_even_where_its_text_hashes_to_validation(text):
    human = LabeledSample(text=text, label="refund", source="agent-7")
    machine = LabeledSample(text=text, label="refund", source="teacher", model="m")
    assert split_for(human, 100) == "validation" and split_for(machine, 100) == "train"
    assert split_for(human, 0) == split_for(machine, 0) == "train"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, min_size=1, max_size=5))
def test_a_teacher_label_never_reaches_validation_through_the_stream(base, texts):
    """Every text would go to validation (100%); the teacher's go to train, with source and model
    kept, and neither the validation set nor a run's dataset ever holds one."""
    store, _ = base
    stream = opened(store, stream="never-validation", validation_percent=100)
    rows = [teacher({"text": t, "label": LABELS[i % len(LABELS)]}) for i, t in enumerate(texts)]
    stream.take_batch([body(r) for r in rows])
    teacher_texts = {normalize_text(s.text) for s in stream.log.read() if s.is_teacher}
    assert all(s.split == "train" and s.model == "llama-3.1-70b" for s in stream.log.read() if s.is_teacher)
    assert {normalize_text(t) for t in texts} <= teacher_texts | stream.known   # stored, or a base run's text
    assert not teacher_texts & {normalize_text(s.text) for s in stream.validation_set()}
    splits, _ = stream.cut()
    assert not teacher_texts & {normalize_text(s.text) for s in splits.validation}
    assert stream.log.teacher_count == len(teacher_texts) == stream.log.split_count("train")


def test_a_teacher_label_stored_in_validation_before_is_still_kept_out_of_it(base):
    """A stream written before teacher labels were told apart may hold one routed by its hash: it is
    read as train, never as validation."""
    store, data = base
    stream = opened(store, stream="legacy", validation_percent=100)
    row = teacher(new_samples(data, 1, seed=11)[0])
    stream.log.append([StoredSample(text=row["text"], label=row["label"], split="validation", seq=1,
                                    source="teacher", arrived_at=0.0)])
    assert row["text"] not in {s.text for s in stream.validation_set()}
    splits, share = stream.cut()
    assert row["text"] in {s.text for s in splits.train} and share.kept == 1


# -- duplicates, poison, drift -----------------------------------------------------------------------------------

def test_duplicates_and_poison_go_where_they_go_for_human_labels(base):
    store, data = base
    stream = opened(store, stream="dupes")
    rows = new_samples(data, 3, seed=12)
    step = stream.take_batch([
        body(rows[0]),                                                          # a human label
        body(teacher({**rows[0], "text": rows[0]["text"].upper() + "  "})),     # the teacher on the same text
        body(teacher(rows[1])), body(teacher(rows[1])),                         # twice in the batch
        body(teacher({"text": "please close my account", "label": "close_account"})),
        body(teacher({"text": "   ", "label": "refund"})),
        body(teacher({"text": rows[2]["text"]})),
    ])
    assert [(t.outcome, t.source, t.rejected and t.rejected.reason) for t in step.taken] == [
        ("accepted", "human", None), ("duplicate", "teacher", None), ("accepted", "teacher", None),
        ("duplicate", "teacher", None), ("rejected", None, "unknown_label"), ("rejected", None, "empty_text"),
        ("rejected", None, "invalid_fields")]


def test_a_persons_label_corrects_the_teachers_once_and_replaces_it_in_the_runs_cut_after(base):
    """A human label after a teacher label of the same text was a duplicate: a person could not correct
    the LLM. Now it is stored once, and the cut trains (or validates) on it, never on the teacher's."""
    store, data = base
    stream = opened(store, stream="corrections", validation_percent=0)
    rows = new_samples(data, 3, seed=21)
    wrong = [teacher({**r, "label": next(label for label in LABELS if label != r["label"])}) for r in rows]
    stream.take_batch([body(w) for w in wrong])
    step = stream.take_batch([body({**rows[0], "text": rows[0]["text"].upper()}), body(rows[1])])
    assert [(t.outcome, t.source) for t in step.taken] == [("accepted", "human"), ("accepted", "human")]
    again = stream.take_batch([body(rows[0]), body(teacher(rows[1])), body({**rows[1], "label": wrong[1]["label"]})])
    assert [t.outcome for t in again.taken] == ["duplicate"] * 3          # corrected once; then as before
    def labels_in(samples):
        return {normalize_text(s.text): s.label for s in samples if normalize_text(s.text) in wanted}
    wanted = {normalize_text(r["text"]) for r in rows}
    splits, share = stream.cut()
    assert labels_in(splits.train) == {normalize_text(rows[0]["text"]): rows[0]["label"],
                                       normalize_text(rows[1]["text"]): rows[1]["label"],
                                       normalize_text(rows[2]["text"]): wrong[2]["label"]}
    assert share.kept == 1                                                # the uncorrected teacher label alone
    reopened = opened(store, stream="corrections", validation_percent=0)  # what is corrected survives a restart
    assert reopened.log.corrected == stream.log.corrected and len(stream.log.corrected) == 2
    assert [t.outcome for t in reopened.take_batch([body(rows[1]), body(rows[2])]).taken] == ["duplicate", "accepted"]


def test_teacher_labels_never_enter_a_drift_window(base):
    """Remapped (wrong) teacher labels would drift at once if they counted; only human labels make windows."""
    store, data = base
    stream = Stream(store, StreamSettings(stream="drift", base_run="base", trigger_count=100_000, drift_window=5,
                                          drift_margin=0.2))
    stream.open()
    stream.take_batch([body(teacher(r)) for r in new_samples(data, 12, seed=13, remap=REMAP)])
    assert stream.state.drift_checks == [] and stream.pending == []
    stream.take_batch([body(r) for r in new_samples(data, 5, seed=14)])
    (check,) = stream.state.drift_checks
    assert (check.first, check.through, check.window, check.drifted) == (13, 17, 5, False)


# -- the share bound -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("others, available, share, allowed", [
    (10, 30, 0.5, 10),      # half: as many as the others
    (10, 30, 0.25, 3),      # 3 of 13 = 0.23; 4 of 14 = 0.29 > 0.25
    (7, 30, 0.3, 3),        # 3 of 10 = 0.3 exactly: allowed (no rounding at the bound)
    (1_000_000, 10**7, 0.3, 428_571),
    (10, 4, 0.5, 4),        # fewer than allowed: all
    (10, 30, 1.0, 30),
    (10, 30, 0.0, 0),
    (0, 30, 0.9, 0),        # no other sample: no run of teacher labels only
])
def test_the_share_bound_in_figures(others, available, share, allowed):
    assert teacher_labels_allowed(others, available, share) == allowed
    if 0 < allowed < available:       # the most the share allows: one more would pass it
        assert Fraction(allowed, others + allowed) <= Fraction(str(share)) < Fraction(allowed + 1, others + allowed + 1)


def test_the_newest_teacher_labels_are_kept():
    others = [Sample(text=f"human {i}", label="refund") for i in range(10)]
    machine = [Sample(text=f"teacher {i}", label="refund") for i in range(30)]   # oldest first
    cut = bound_teacher_share(others, machine, 0.25)
    assert (cut.kept, cut.left_out) == (3, 27)
    assert [s.text for s in cut.train] == [s.text for s in others] + ["teacher 27", "teacher 28", "teacher 29"]


def test_a_run_takes_the_newest_teacher_labels_up_to_the_share_and_the_setting_reloads(base, tmp_path):
    store, data = base
    file = tmp_path / "stream.yaml"
    file.write_text("max_teacher_label_share: 0.2\n")
    stream = Stream(store, StreamSettings(stream="share", base_run="base", trigger_count=100_000,
                                          drift_window=100_000, validation_percent=0, settings_file=str(file)))
    stream.open()
    rows = new_samples(data, 48, seed=15)
    humans, machine = rows[:8], [teacher(r) for r in rows[8:]]
    stream.take_batch([body(r) for r in humans + machine])
    trained = sum(1 for _ in store.get_bytes(stream.state.current.train_set).splitlines())
    others = trained + len(humans)
    allowed = others // 4                       # k <= 0.2 (others + k)
    assert 0 < allowed < 40

    request = stream.start_run(Trigger(kind="count", detail="48 new samples"))
    (run,) = stream.state.runs
    assert (run.teacher_labels, run.teacher_labels_left_out, run.train_size) == (allowed, 40 - allowed,
                                                                                 others + allowed)
    assert run.settings["max_teacher_label_share"] == 0.2
    train = [r["text"] for r in store.get_json(request.dataset)["splits"]["train"]]
    assert train[-allowed:] == [r["text"] for r in machine[-allowed:]]          # the newest
    assert not {r["text"] for r in machine[:-allowed]} & set(train)

    file.write_text("max_teacher_label_share: 1\n")      # read again before the next batch
    stream.refresh_settings()
    splits, share = stream.cut()
    assert (share.kept, share.left_out, len(splits.train)) == (40, 0, others + 40)


def test_the_setting_is_declared_once_with_its_default_and_checked():
    assert StreamSettings().max_teacher_label_share == 0.5 and "max_teacher_label_share" in RELOADABLE
    assert StreamSettings.variable("max_teacher_label_share") == "PGKD_STREAM_MAX_TEACHER_LABEL_SHARE"
    assert StreamSettings.from_env({"PGKD_STREAM_MAX_TEACHER_LABEL_SHARE": "0.1"}).max_teacher_label_share == 0.1
    with pytest.raises(UserError, match="PGKD_STREAM_MAX_TEACHER_LABEL_SHARE='1.5'"):
        StreamSettings.from_env({"PGKD_STREAM_MAX_TEACHER_LABEL_SHARE": "1.5"})


# -- told apart: status, metrics, the ingest service ---------------------------------------------------------------

def test_stream_status_counts_human_and_teacher_labels_apart(base, monkeypatch, capsys):
    store, data = base
    stream = opened(store, stream="status", validation_percent=100, max_teacher_label_share=0.0)
    rows = new_samples(data, 7, seed=16)
    stream.take_batch([body(r) for r in rows[:4]] + [body(teacher(r)) for r in rows[4:]])
    assert [(s.train, s.validation, s.teacher) for s in stream.log.manifest.segments] == [(3, 4, 3)]
    stream.start_run(Trigger(kind="count", detail="7 new samples"))
    monkeypatch.setenv("PGKD_ARTIFACTS", store.url)
    assert main(["stream", "status", "status"]) == 0
    out = capsys.readouterr().out
    assert "7 samples stored in 1 segment(s), 0 since the last run: 4 human labels (0 train, 4 validation), " \
           "3 teacher labels (train only)" in out, out
    assert "(count: 7 new samples; train " in out and "(0 teacher labels, 3 left out), validation" in out, out


def test_ingest_metrics_count_accepted_samples_by_source_kind_with_two_label_values():
    metrics = LoopMetrics(CollectorRegistry())
    for outcome, reason, source in [("accepted", None, "human"), ("accepted", None, "teacher"),
                                    ("accepted", None, "teacher"), ("duplicate", None, "teacher"),
                                    ("rejected", "not_json", None)]:
        metrics.ingested(outcome, reason, source)
    assert {k: metrics.ingest_accepted.labels(k)._value.get() for k in ("human", "teacher")} == \
        {"human": 1, "teacher": 2}
    assert metrics.ingest_messages.labels("accepted")._value.get() == 3
    with pytest.raises(AssertionError):
        metrics.ingested("accepted", None, "agent-7")     # never a free-text source as a label value


def test_through_the_ingest_service(base, tmp_path):
    """The real handler on an in-memory broker: teacher labels stored in train with their model,
    counted apart in the metrics (two label values, whatever the sources), poison dead-lettered."""
    store, data = base
    bus = Settings(broker_url="kafka://localhost:9092", artifacts=store.url)
    broker = make_broker(bus.broker_url)
    metrics = LoopMetrics(CollectorRegistry())
    ingest = services.build("ingest", settings=bus, broker=broker, store=store, metrics=metrics,
                            stream_settings=StreamSettings(stream="service", base_run="base", trigger_count=100_000,
                                                           drift_window=100_000, validation_percent=100))
    ingest.prepare()                       # `pgkd service ingest` does this before serving
    letters = []

    @broker.subscriber("pgkd.dead-letter", group_id="test-listener")
    async def listen(message=Context("message")):
        letters.append(json.loads(message.body))

    rows = new_samples(data, 6, seed=17)
    bodies = [body({**r, "source": f"agent-{i}"}) for i, r in enumerate(rows[:3])] + \
        [body(teacher(r)) for r in rows[3:]] + \
        [body(teacher(rows[0])), body(teacher({"text": "close it", "label": "close_account"}))]

    async def scenario():
        async with TestKafkaBroker(broker) as b:
            await ingest.started()
            for x in bodies:
                await send(b, x, "pgkd.labeled-samples")
    asyncio.run(scenario())

    samples = stored(store, "service")
    assert [(s.split, s.source, s.model) for s in samples] == \
        [("validation", f"agent-{i}", None) for i in range(3)] + [("train", "teacher", "llama-3.1-70b")] * 3
    assert [letter["reason"].split(":")[0] for letter in letters] == ["unknown_label"]
    series = {s.labels["source"]: s.value for family in metrics.registry.collect()
              if family.name == "pgkd_ingest_accepted" for s in family.samples if s.name.endswith("_total")}
    assert series == {"human": 3, "teacher": 3}
    assert metrics.ingest_messages.labels("duplicate")._value.get() == 1
    assert metrics.stream_teacher_samples.labels("service")._value.get() == 3
    assert metrics.stream_samples.labels("service", "validation")._value.get() == 3
