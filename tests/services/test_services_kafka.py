"""The four services over Kafka, with FastStream's in-memory TestKafkaBroker (no Kafka broker can
run on these machines): their real handlers, the real engine steps, a real artifact store."""
import asyncio
import json
from pathlib import Path

import pytest
from conftest import make_toy_dataset
from faststream import Context
from faststream.kafka import TestKafkaBroker
from pgkd.distributed import steps
from pgkd.artifacts import ArtifactRef, ArtifactStore
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.loop.report import without_times
from pgkd.loop.state import RunState
from pgkd.distributed.messages import CycleEvaluated, DeadLetter, ModelTrained, RunCompleted, SamplesGenerated

import pgkd_services as services
from pgkd_services.runtime import Settings, make_broker, send

CONFIG = dict(labeled=40, student="tiny", teacher="pool-random", samples_per_cycle=16, max_cycles=3, patience=5,
              epochs=8, cycle_epochs=2, learning_rate=1e-2, head_learning_rate=1e-2, batch_size=16, seed=1)


class Bus:
    """The four services on one in-memory Kafka broker, plus a listener on the outcome topics."""

    def __init__(self, artifacts):
        self.settings = Settings(broker_url="kafka://localhost:9092", artifacts=f"file://{artifacts}")
        self.broker = make_broker(self.settings.broker_url)
        self.store = ArtifactStore(self.settings.artifacts)
        self.services = [services.build(name, settings=self.settings, broker=self.broker, store=self.store)
                         for name in services.NAMES]
        self.seen: dict[str, list[dict]] = {}
        for topic in ("run-completed", "dead-letter", "model-trained", "samples-generated", "teacher-stopped",
                      "student-promoted"):
            self._listen(topic)

    def _listen(self, topic: str) -> None:
        @self.broker.subscriber(f"pgkd.{topic}", group_id="test-listener")
        async def listener(message=Context("message")):
            try:
                self.seen.setdefault(topic, []).append(json.loads(message.body))
            except ValueError:  # the bad messages the dead-letter test sends
                pass

    async def publish(self, body: bytes, topic: str) -> None:
        async with TestKafkaBroker(self.broker) as broker:
            await send(broker, body, f"pgkd.{topic}")


@pytest.fixture
def bus(tmp_path):
    return Bus(tmp_path / "artifacts")


@pytest.mark.parametrize("guidance, selection", [("validation", "validation"), ("out-of-fold", "validation"),
                                                 ("validation", "out-of-fold")])
def test_a_run_through_the_four_services_computes_what_the_embedded_run_computes(bus, tmp_path, guidance, selection):
    # The out-of-fold variants train fold students every cycle: two cycles and two folds are enough to
    # show that the miner's guidance and the evaluator's selection are the embedded run's.
    fold_options = {} if guidance == selection else {"max_cycles": 2, "guidance_folds": 2}
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")),
                           **{**CONFIG, **fold_options, "guidance_source": guidance, "selection_source": selection})
    request = steps.submit(config, bus.store, run_id="kafka-run")
    asyncio.run(bus.publish(request.model_dump_json().encode(), "run-requested"))

    (completed,) = [RunCompleted.model_validate(m) for m in bus.seen["run-completed"]]
    assert completed.status == "completed" and completed.reason.startswith("max_cycles")
    assert sorted(m["cycle"] for m in bus.seen["model-trained"]) == list(range(config.max_cycles + 1))   # any order
    assert "dead-letter" not in bus.seen and "student-promoted" not in bus.seen   # not submitted with --promote
    distributed = bus.store.get_json(completed.report)
    embedded = run(config, tmp_path / "embedded", progress=False).report.model_dump(mode="json")
    assert without_times(distributed) == without_times(embedded)
    assert bus.store.exists("runs/kafka-run/history.png")


def test_a_run_submitted_with_promote_ends_with_its_best_student_promoted_once(bus, tmp_path):
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **{**CONFIG, "max_cycles": 1})
    request = steps.prepare_request(config, bus.store, run_id="promoted").model_copy(update={"promote": True})
    steps.record_request(bus.store, request)        # as `pgkd submit --promote` does
    asyncio.run(bus.publish(request.model_dump_json().encode(), "run-requested"))
    (completed,) = [RunCompleted.model_validate(m) for m in bus.seen["run-completed"]]
    promoted = completed.promotion          # one message: the deployers take the promotion from it
    assert "student-promoted" not in bus.seen
    assert (promoted.run_id, promoted.cycle, promoted.checkpoint, promoted.source, promoted.model) == \
        ("promoted", completed.best_cycle, completed.best_checkpoint, "run", "student")
    assert promoted.scores["test_accuracy"] == completed.test["accuracy"] and "validation_macro_f1" in promoted.scores
    assert steps.latest_promotion(bus.store, "student") == promoted     # what a new server replica starts from
    last = max(bus.seen["model-trained"], key=lambda m: m["cycle"])
    asyncio.run(bus.publish(json.dumps(last).encode(), "model-trained"))    # redelivered: nothing again
    assert len(bus.seen["run-completed"]) == 1 and "student-promoted" not in bus.seen


def test_a_redelivered_message_repeats_no_work_and_a_lost_publish_is_repeated(bus, tmp_path):
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **{**CONFIG, "max_cycles": 2})
    request = steps.submit(config, bus.store, run_id="redelivered")
    asyncio.run(bus.publish(request.model_dump_json().encode(), "run-requested"))
    report_before = bus.store.get_bytes("runs/redelivered/report.json")
    train_set = bus.store.get_bytes("runs/redelivered/train/v0001.jsonl")
    published = len(bus.seen["model-trained"])

    # Every message of the run delivered a second time: nothing is trained or published again.
    generated = next(m for m in bus.seen["samples-generated"] if m["cycle"] == 1)
    asyncio.run(bus.publish(request.model_dump_json().encode(), "run-requested"))
    asyncio.run(bus.publish(json.dumps(generated).encode(), "samples-generated"))
    assert len(bus.seen["model-trained"]) == published
    assert len(bus.seen["run-completed"]) == 1
    assert bus.store.get_bytes("runs/redelivered/report.json") == report_before

    # A handler that stored its output but died before publishing it: the redelivery publishes it.
    bus.store.fs.rm(bus.store._path("runs/redelivered/handled/samples-generated-0001.published"))
    asyncio.run(bus.publish(json.dumps(generated).encode(), "samples-generated"))
    assert len(bus.seen["model-trained"]) == published + 1
    first = next(m for m in bus.seen["model-trained"] if m["cycle"] == 1)
    assert bus.seen["model-trained"][-1] == first     # the same message again, not a new round
    assert bus.store.get_bytes("runs/redelivered/train/v0001.jsonl") == train_set
    samples = [json.loads(line)["text"] for line in train_set.decode().splitlines()]
    taught = bus.store.get_model(SamplesGenerated.model_validate(generated).state, RunState)
    assert len(samples) == len(set(samples)) == 32 + taught.provenance.accepted


def test_bad_messages_go_to_the_dead_letter_topic_and_the_services_keep_consuming(bus, tmp_path):
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **{**CONFIG, "max_cycles": 1})
    good = steps.submit(config, bus.store, run_id="after-bad-ones")
    unknown_run = good.model_copy(update={"run_id": "never-submitted"})
    other = DistillConfig(data=str(make_toy_dataset(tmp_path / "other", seed=1)), **{**CONFIG, "max_cycles": 1})
    broken = steps.submit(other, bus.store, run_id="broken-dataset")
    Path(bus.store._path(bus.store.key_of(broken.dataset.uri))).write_bytes(b"damaged")   # recorded, then its data lost
    future = json.loads(good.model_dump_json()) | {"schema_version": 2}
    steps.submit(config, bus.store, run_id="lost-state")
    lost = CycleEvaluated(run_id="lost-state", cycle=0, state=ArtifactRef(
        uri="runs/lost-state/state/0000-4-evaluated.json", sha256="0" * 64, size=2))   # never saved

    async def scenario():
        async with TestKafkaBroker(bus.broker) as broker:
            await send(broker, b"\x00not json", "pgkd.model-trained")
            await send(broker, json.dumps(future).encode(), "pgkd.run-requested")
            await send(broker, b'{"run_id": "x", "cycle": -1}', "pgkd.negatives-mined")
            await send(broker, unknown_run.model_dump_json().encode(), "pgkd.run-requested")
            await send(broker, broken.model_dump_json().encode(), "pgkd.run-requested")
            await send(broker, good.model_dump_json().encode(), "pgkd.run-requested")
            await send(broker, lost.model_dump_json().encode(), "pgkd.cycle-evaluated")
    asyncio.run(scenario())

    letters = [DeadLetter.model_validate(m) for m in bus.seen["dead-letter"]]
    assert [(d.source_topic, d.service) for d in letters] == [
        ("pgkd.model-trained", "evaluator"), ("pgkd.run-requested", "trainer"),
        ("pgkd.negatives-mined", "generator"), ("pgkd.run-requested", "trainer"), ("pgkd.run-requested", "trainer"),
        ("pgkd.cycle-evaluated", "miner")]
    assert "not a valid ModelTrained" in letters[0].reason and letters[0].payload.endswith("not json")
    assert "schema_version" in letters[1].reason
    assert "cycle" in letters[2].reason
    assert "never-submitted" in letters[3].payload and "run 'never-submitted' is not recorded" in letters[3].reason
    assert letters[3].run_id == "never-submitted"
    # A message of no recorded run is parked, not failed: no record is made up for a run that never was.
    outcomes = {m["run_id"]: RunCompleted.model_validate(m) for m in bus.seen["run-completed"]}
    assert "never-submitted" not in outcomes and not bus.store.exists("runs/never-submitted")
    # A recorded run whose step fails ends as failed, with the reason; the good run after it completes.
    assert "ArtifactError" in letters[4].reason and letters[4].run_id == "broken-dataset"
    assert outcomes["broken-dataset"].status == "failed" and "ArtifactError" in outcomes["broken-dataset"].reason
    assert outcomes["after-bad-ones"].status == "completed"
    # A state that is not there: one line naming the run and the file; the run ends failed, not half-advanced.
    assert "StateError: run lost-state: state " in letters[5].reason and "0000-4-evaluated.json: missing" in \
        letters[5].reason and "\n" not in letters[5].reason
    assert outcomes["lost-state"].status == "failed"
    assert [k.rsplit("/", 1)[1] for k in bus.store.list("runs/lost-state/state")] == []
    # A stray (or forged) message of a run that has ended is parked; the run's outcome stands (a reviewer's
    # message pointing at another run's state turned a completed run into a failed one).
    ended = bus.store.get_bytes("runs/after-bad-ones/completed.json")
    stray = ModelTrained(run_id="after-bad-ones", cycle=5, state=ArtifactRef(
        uri="runs/lost-state/state/0001-1-trained.json", sha256="0" * 64, size=2))

    async def late():
        async with TestKafkaBroker(bus.broker) as broker:
            await send(broker, stray.model_dump_json().encode(), "pgkd.model-trained")
    published = len(bus.seen["run-completed"])
    asyncio.run(late())
    letter = DeadLetter.model_validate(bus.seen["dead-letter"][-1])
    assert letter.run_id == "after-bad-ones" and "had ended; its outcome stands" in letter.reason
    assert bus.store.get_bytes("runs/after-bad-ones/completed.json") == ended
    assert len(bus.seen["run-completed"]) == published


def test_the_generator_service_asks_an_llm_teacher_and_caches_its_answers_in_the_artifact_store(bus, tmp_path):
    from chat_server import ChatServer, answer
    chat = ChatServer()
    chat.script = [("ok", answer(4, start=0)), ("ok", answer(4, start=4))]
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")),
                           **{**CONFIG, "max_cycles": 2, "teacher": chat.url, "samples_per_cycle": 4})
    request = steps.submit(config, bus.store, run_id="llm-run")
    asyncio.run(bus.publish(request.model_dump_json().encode(), "run-requested"))
    (completed,) = [RunCompleted.model_validate(m) for m in bus.seen["run-completed"]]
    report = bus.store.get_json(completed.report)
    assert [c["accepted"] for c in report["cycles"]] == [0, 4, 4] and report["teacher_usage"]["calls"] == 2
    assert len(chat.requests) == 2 and len(bus.store.list("teacher-cache")) >= 1
