"""The ingest service over Kafka, with FastStream's in-memory TestKafkaBroker, beside the four loop
services: the base run, the stream, the dead letters, a triggered run and its decision, all through
the real handlers."""
import asyncio

from conftest import make_toy_dataset
from faststream.kafka import TestKafkaBroker
from pgkd.distributed.steps import run_through_steps
from pgkd.distributed import steps
from pgkd.loop.config import DistillConfig
from pgkd.distributed.messages import DeadLetter, RunCompleted
from pgkd.stream import StreamSettings
from stream_fixtures import BASE_CONFIG, REMAP, body, new_samples, stored
from test_services_kafka import Bus

import pgkd_services as services
from pgkd_services.runtime import send

BAD = {  # one message for each reason ingest rejects
    b"this is not json": "not_json",
    b'{"text": "no label here"}': "invalid_fields",
    b'{"text": "   ", "label": "refund"}': "empty_text",
    body({"text": "refund " * 400, "label": "refund"}): "oversized",
    body({"text": "please close my account", "label": "close_account"}): "unknown_label",
}


def stream_over_kafka(tmp_path, **settings):
    """The loop's four services and ingest on one in-memory broker, the base run completed through them."""
    bus = Bus(tmp_path / "artifacts")
    ingest = services.build("ingest", settings=bus.settings, broker=bus.broker, store=bus.store,
                            stream_settings=StreamSettings(base_run="base", **settings))
    data = make_toy_dataset(tmp_path / "toy")
    request = steps.submit(DistillConfig(data=str(data), **BASE_CONFIG), bus.store, run_id="base")
    ingest.prepare()                       # `pgkd service ingest` does this before serving
    assert ingest.stream.state.current is None
    asyncio.run(bus.publish(request.model_dump_json().encode(), "run-requested"))
    assert ingest.stream.state.current.run_id == "base"    # from the base run's RunCompleted
    return bus, ingest, data


def stream(bus, ingest, bodies: list[bytes]) -> None:
    async def scenario():
        async with TestKafkaBroker(bus.broker) as broker:
            await ingest.started()
            for b in bodies:
                await send(broker, b, "pgkd.labeled-samples")
    asyncio.run(scenario())


def test_a_stream_with_remapped_labels_triggers_a_run_through_the_services_and_bad_messages_are_dead_lettered(
        tmp_path):
    bus, ingest, data = stream_over_kafka(tmp_path, trigger_count=1000, drift_window=40, drift_margin=0.2)
    remapped = [body(r) for r in new_samples(data, 40, remap=REMAP)]
    stream(bus, ingest, remapped[:20] + list(BAD) + remapped[20:])

    letters = [DeadLetter.model_validate(m) for m in bus.seen["dead-letter"]]
    assert [(d.payload.encode(), d.reason.split(":")[0]) for d in letters] == list(BAD.items())
    assert {(d.service, d.source_topic) for d in letters} == {("ingest", "pgkd.labeled-samples")}
    assert len(stored(bus.store)) == 40

    state = ingest.stream.state
    (run,) = state.runs
    assert run.run_id == "default-0001" and run.trigger.kind == "drift" and run.published
    completed = {m["run_id"]: RunCompleted.model_validate(m) for m in bus.seen["run-completed"]}
    assert completed["default-0001"].status == "completed"
    assert bus.store.get_json("runs/default-0001/request.json")["start_from"] == \
        completed["base"].best_checkpoint.model_dump()
    decision = run.decision
    assert decision is not None and decision.current_run == "base"
    assert decision.replaced == (decision.new_score > decision.current_score)
    assert bus.store.exists("streams/default/decisions/default-0001.json")
    metrics = ingest.metrics
    assert metrics.stream_runs.labels("drift")._value.get() == 1
    assert metrics.ingest_messages.labels("rejected")._value.get() == len(BAD)


def test_a_stream_from_the_training_distribution_does_not_trigger_a_run(tmp_path):
    bus, ingest, data = stream_over_kafka(tmp_path, trigger_count=1000, drift_window=40, drift_margin=0.2)
    stream(bus, ingest, [body(r) for r in new_samples(data, 80)])
    state = ingest.stream.state
    assert len(state.drift_checks) == 2 and not any(c.drifted for c in state.drift_checks)
    assert state.runs == [] and "dead-letter" not in bus.seen
    assert [m["run_id"] for m in bus.seen["run-completed"]] == ["base"]


def test_a_run_recorded_but_never_published_is_published_when_ingest_starts_again(tmp_path):
    bus, ingest, data = stream_over_kafka(tmp_path, trigger_count=10, drift_window=1000)
    # What a crash between recording a run and publishing it leaves: the run in the state only.
    for row in new_samples(data, 10):
        ingest.stream.ingest(body(row))
    request = ingest.stream.start_run(ingest.stream.due_trigger())
    assert not bus.store.exists(f"runs/{request.run_id}/completed.json")

    ingest.prepare()               # a new process reads the stream back ...
    stream(bus, ingest, [])        # ... and, once connected, publishes what was never published
    (run,) = ingest.stream.state.runs
    assert run.published and run.decision is not None and run.decision.current_run == "base"
    assert [m["run_id"] for m in bus.seen["run-completed"]] == ["base", request.run_id]


def test_a_decision_that_cannot_be_made_is_recorded_and_the_stream_goes_on(tmp_path):
    bus, ingest, data = stream_over_kafka(tmp_path, trigger_count=10, drift_window=1000)
    for row in new_samples(data, 10):
        ingest.stream.ingest(body(row))
    request = ingest.stream.start_run(ingest.stream.due_trigger())
    completed = run_through_steps(request, bus.store)
    corrupt = completed.best_checkpoint.model_copy(update={"sha256": "0" * 64})   # not what the store holds
    decision = ingest.stream.run_completed(completed.model_copy(update={"best_checkpoint": corrupt}))
    assert not decision.replaced and decision.reason.startswith("could not compare the students (ArtifactError")
    assert ingest.stream.running is None and ingest.stream.state.current.run_id == "base"
