"""ingest: takes the stream of human-labeled samples and keeps the student current (pgkd.stream).

LabeledSample (labeled-samples) -> stored once, or the dead-letter topic with the reason; a trigger
(enough new samples, or drift) -> RunRequested, warm-started from the current student on the grown
dataset. RunCompleted (run-completed) of a stream run -> the decision: does its student replace
the current one. Configured with PGKD_STREAM_* (pgkd.stream.StreamSettings); run one replica."""
from __future__ import annotations

import asyncio
import logging

from pgkd.distributed.messages import LabeledSample, RunCompleted, RunRequested
from pgkd.stream import Rejected, Stream, StreamSettings
from pydantic import ValidationError

from pgkd_services.runtime import Service

log = logging.getLogger("pgkd.service")


class IngestService(Service):
    def __init__(self, stream_settings: StreamSettings | None = None, **options):
        super().__init__("ingest", **options)
        self.stream_settings = stream_settings
        self.stream: Stream | None = None
        self._publishing: set[str] = set()   # runs this process is publishing right now
        self.subscribe(self.topic(LabeledSample.topic), self.on_sample, "labeled-sample")
        self.subscribe(self.topic(RunCompleted.topic), self.on_run_completed, "run-completed")

    def prepare(self) -> None:
        self.stream = Stream(self.store, self.stream_settings or StreamSettings.from_env())
        self.stream.open()
        self.metrics.stream_state(self.stream)

    async def started(self) -> None:
        """A run recorded but never published (a crash in between), or a trigger that came due."""
        async with self._busy:
            requests = await asyncio.to_thread(self._runs_to_publish)
        await self._publish_runs(requests)

    async def on_sample(self, body: bytes) -> None:
        async with self._busy:   # not held while publishing: an in-memory test broker delivers in this call
            rejected, requests = await asyncio.to_thread(self._ingest, body)
        if rejected is not None:
            await self.dead_letter(self.topic(LabeledSample.topic), body, str(rejected))
        await self._publish_runs(requests)

    async def on_run_completed(self, body: bytes) -> None:
        try:
            completed = RunCompleted.model_validate_json(body)
        except ValidationError as e:
            await self.dead_letter(self.topic(RunCompleted.topic), body, f"not a valid RunCompleted: {e.errors()[0]}")
            return
        async with self._busy:
            requests = await asyncio.to_thread(self._decide, completed)
        await self._publish_runs(requests)

    # -- the work, in a worker thread, one message at a time ---------------------------------------------------
    def _ingest(self, body: bytes) -> tuple[Rejected | None, list[RunRequested]]:
        try:
            outcome = self.stream.ingest(body)
        except Rejected as e:
            self.metrics.ingested("rejected", e.reason)
            return e, []
        self.metrics.ingested(outcome)
        if outcome == "accepted":
            self.stream.check_drift()
        return None, self._runs_to_publish()

    def _decide(self, completed: RunCompleted) -> list[RunRequested]:
        decision = self.stream.run_completed(completed)
        if decision is not None:
            self.metrics.stream_decisions.labels("replaced" if decision.replaced else "kept").inc()
        return self._runs_to_publish()

    def _runs_to_publish(self) -> list[RunRequested]:
        trigger = self.stream.due_trigger()
        if trigger is not None:
            self.stream.start_run(trigger)
            self.metrics.stream_runs.labels(trigger.split(":", 1)[0]).inc()
        self.metrics.stream_state(self.stream)
        return [r for r in self.stream.unpublished() if r.run_id not in self._publishing]

    async def _publish_runs(self, requests: list[RunRequested]) -> None:
        for request in requests:
            self._publishing.add(request.run_id)
            try:
                await self.publish(request)
                async with self._busy:
                    await asyncio.to_thread(self.stream.published, request.run_id)
            finally:
                self._publishing.discard(request.run_id)


def build(**options) -> IngestService:
    return IngestService(**options)
