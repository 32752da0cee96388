"""ingest: takes the stream of labeled samples and keeps the student current (pgkd.stream).

LabeledSample (labeled-samples: human labels, and teacher labels, `source` "teacher"), in batches (PGKD_STREAM_BATCH_MAX, PGKD_STREAM_BATCH_SECONDS)
-> stored once, or the dead-letter topic with the reason; a trigger
(enough new samples, or drift) -> RunRequested, warm-started from the current student on the grown
dataset. RunCompleted (run-completed) of a stream run -> the decision: does its student replace
the current one; when it does (and for the base run's student), StudentPromoted. Configured with
PGKD_STREAM_* (pgkd.stream.StreamSettings); run one replica."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from pgkd.distributed.messages import LabeledSample, RunCompleted, StudentPromoted
from pgkd.stream import AnotherWriter, Stream, StreamSettings, StreamStep

from pgkd_services.runtime import Service

log = logging.getLogger("pgkd.service")


class IngestService(Service):
    def __init__(self, stream_settings: StreamSettings | None = None, **options):
        super().__init__("ingest", **options)
        self.stream_settings = stream_settings or StreamSettings.from_env()
        self.batch = (self.stream_settings.batch_max, self.stream_settings.batch_seconds)
        self.stream: Stream | None = None
        self._publishing: set[str] = set()   # message keys this process is publishing right now
        self.samples_topic = self.topic(LabeledSample.topic)
        # the samples' own checks are the stream's, each rejection with its reason (pgkd.stream)
        self.subscribe(LabeledSample, self.on_samples, decode=False)
        self.subscribe(RunCompleted, self.on_run_completed)

    def prepare(self) -> None:
        self.stream = Stream(self.store, self.stream_settings)
        self.stream.open()
        self.metrics.stream_state(self.stream)

    async def started(self) -> None:
        await self._apply(await self._step(self.stream.resume))

    async def handle_batch(self, records: list) -> None:
        """In order: each run of consecutive samples as one batch of the stream (one commit), each
        RunCompleted on its own. Acknowledged when it returns: the samples are stored by then, and
        the rejected ones dead-lettered (a tombstone among them too: the service goes on)."""
        samples: list = []
        for record in records + [None]:
            if record is not None and record.topic == self.samples_topic:
                samples.append(record)
                continue
            if samples:
                await self.on_samples([r.value for r in samples], samples)
                samples = []
            if record is not None:
                await self.deliver(record)

    async def on_samples(self, bodies: list[bytes | None] | bytes, records: list | None = None) -> None:
        """Sample messages (record values, None for a null one) as one batch of the stream; `records`,
        the records they came in, for the dead letters of the rejected ones."""
        bodies = [bodies] if isinstance(bodies, bytes) else bodies
        records = records or [None] * len(bodies)
        log.info("ingest: batch of %d sample message(s) received", len(bodies))
        started = time.perf_counter()
        try:
            step = await self._step(self.stream.take_batch, bodies)
        except AnotherWriter as e:     # a second replica: the batch is not acknowledged, and this one stops
            self.stop_failed(str(e))
            raise
        await asyncio.gather(*(self.dead_letter(self.samples_topic, body, str(taken.rejected), record=record)
                               for body, record, taken in zip(bodies, records, step.taken)
                               if taken.rejected is not None))
        outcomes = Counter(taken.outcome for taken in step.taken)
        teacher = sum(taken.outcome == "accepted" and taken.source == "teacher" for taken in step.taken)
        # (bench_stream reads " stored, " in this line for its batch times)
        log.info("ingest: batch of %d: %d stored, %d duplicate(s), %d rejected, %d teacher label(s) (%.2f s)",
                 len(bodies), outcomes["accepted"], outcomes["duplicate"], outcomes["rejected"], teacher,
                 time.perf_counter() - started)
        await self._apply(step)

    async def on_run_completed(self, completed: RunCompleted) -> None:
        await self._apply(await self._step(self.stream.finished, completed))

    async def _step(self, entry, *args) -> StreamStep:
        """One of the stream's entry points, in a worker thread, one message or batch at a time; its metrics."""
        async with self._busy:   # not held while publishing: an in-memory test broker delivers in this call
            step = await asyncio.to_thread(entry, *args)
        for taken in step.taken:
            self.metrics.ingested(taken.outcome, taken.rejected.reason if taken.rejected else None, taken.source)
        if step.decision is not None:
            self.metrics.stream_decisions.labels("replaced" if step.decision.replaced else "kept").inc()
        if step.started is not None:
            self.metrics.stream_runs.labels(step.started.kind).inc()
        self.metrics.stream_state(self.stream)
        return step

    async def _apply(self, step: StreamStep) -> None:
        """Publish the runs and promotions the step asks for (those another message is not publishing already)."""
        for message in [m for m in step.publish if m.key not in self._publishing]:
            self._publishing.add(message.key)
            try:
                await self.publish(message)
                done = self.stream.promotion_published if isinstance(message, StudentPromoted) else self.stream.published
                async with self._busy:
                    await asyncio.to_thread(done, message.run_id)
            finally:
                self._publishing.discard(message.key)


def build(**options) -> IngestService:
    return IngestService(**options)
