"""One stream, and what ingest does with each incoming message: `take(body)` for a labeled sample,
`finished(completed)` for a run that ended, `resume()` when ingest starts. Each returns a StreamStep
(what to do next: dead-letter the message, publish runs); the ingest service and `pgkd bench stream`
call the same three. The parts: samples.py (validation, dedupe keys, routing, storage), state.py
(what is remembered), promotion.py (the comparison); this module sequences them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from pgkd.data import Sample, Splits, normalize_text
from pgkd.distributed.artifacts import ArtifactStore
from pgkd.distributed.messages import RunCompleted, RunRequested, StudentPromoted
from pgkd.distributed.steps import (
    CycleState,
    RunFiles,
    load_checkpoint,
    read_samples_artifact,
    record_promotion,
    run_context,
    submit_splits,
)
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.loop.evaluation import EvalReport
from pgkd.stream.promotion import compare, score
from pgkd.stream.samples import Rejected, SampleStore, StoredSample, parse_sample, route, text_key
from pgkd.stream.settings import StreamSettings
from pgkd.stream.state import CurrentStudent, DriftCheck, PromotionDecision, StreamRun, StreamState, Trigger

log = logging.getLogger("pgkd.stream")


@dataclass
class StreamStep:
    """What follows from one message: its outcome, why it was rejected (then it goes to the
    dead-letter topic), a decision taken, a run started now and why, and the runs to publish."""
    outcome: Literal["accepted", "duplicate", "rejected", "decided", "ignored", "resumed"]
    rejected: Rejected | None = None
    decision: PromotionDecision | None = None
    started: Trigger | None = None
    publish: list[RunRequested | StudentPromoted] = field(default_factory=list)


class Stream:
    """A stream's samples and state in the artifact store. It has one writer: run ingest as a single
    replica."""

    MAX_DRIFT_CHECKS = 20

    def __init__(self, store: ArtifactStore, settings: StreamSettings):
        self.store, self.settings = store, settings
        self.base = f"streams/{settings.stream}"
        self.sample_store = SampleStore(store, self.base)
        self.state: StreamState | None = None
        self.samples: list[StoredSample] = []
        self.known: set[str] = set()          # text keys of everything the stream's data holds
        self._student: tuple[str, object] | None = None   # (checkpoint sha256, the current student)

    # -- the entry points ------------------------------------------------------------------------------------
    def take(self, body: bytes) -> StreamStep:
        """A streamed sample: rejected, a duplicate, or stored; then drift is checked and a run starts
        if a trigger is due."""
        try:
            outcome = self.ingest(body)
        except Rejected as e:
            return StreamStep("rejected", rejected=e)
        if outcome == "accepted":
            self.check_drift()
        return self._runs_due(StreamStep(outcome))

    def finished(self, completed: RunCompleted) -> StreamStep:
        """A run ended: the base run's student becomes the first current one; a stream run's may
        replace it. A trigger that waited for the run may start the next one."""
        decision = self.run_completed(completed)
        return self._runs_due(StreamStep("decided" if decision else "ignored", decision=decision))

    def resume(self) -> StreamStep:
        """On start: a run recorded but never published (a crash in between), or a trigger come due."""
        return self._runs_due(StreamStep("resumed"))

    def _runs_due(self, step: StreamStep) -> StreamStep:
        trigger = self.due_trigger()
        if trigger is not None:
            self.start_run(trigger)
            step.started = trigger
        step.publish = self.unpublished()
        return step

    # -- opening ---------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Read the stream back from the store, or start it from the base run. A bad setting is a UserError."""
        key = f"{self.base}/state.json"
        if self.store.exists(key):
            self.state = StreamState.model_validate(self.store.get_json(key))
            if self.settings.base_run and self.settings.base_run != self.state.base_run:
                log.warning("stream %s: started from run %s; PGKD_STREAM_BASE_RUN=%s is ignored",
                            self.state.name, self.state.base_run, self.settings.base_run)
        else:
            if not self.settings.base_run:
                raise UserError(f"stream {self.settings.stream} does not exist in {self.store.url} yet: "
                                "set PGKD_STREAM_BASE_RUN to the run it starts from")
            if not self.store.exists(RunFiles(self.settings.base_run).request):
                raise UserError(f"PGKD_STREAM_BASE_RUN={self.settings.base_run}: no such run in {self.store.url}")
            self.state = StreamState(name=self.settings.stream, base_run=self.settings.base_run,
                                     labels=run_context(self.store, self.settings.base_run).labels)
            self._save()
        base = self._base_splits()
        self.known = {text_key(s.text) for s in base.train + base.validation + base.test}
        self.samples = self.sample_store.read_all()
        self.known |= {text_key(s.text) for s in self.samples}
        if self.state.current is None:   # the base run may have completed before ingest first started
            completed = RunFiles(self.state.base_run).completed
            if self.store.exists(completed):
                self.run_completed(RunCompleted.model_validate(self.store.get_json(completed)))
        if self.state.current is not None:
            self.known |= {text_key(s.text) for s in read_samples_artifact(self.store, self.state.current.train_set)}
        log.info("stream %s: base run %s, %d labels, %d samples stored, current student: %s", self.state.name,
                 self.state.base_run, len(self.state.labels), len(self.samples),
                 self.state.current.run_id if self.state.current else "none yet (the base run has not completed)")

    def _save(self) -> None:
        self.store.put_json(f"{self.base}/state.json", self.state.model_dump(mode="json"))

    def _base_splits(self) -> Splits:
        return run_context(self.store, self.state.base_run).splits

    def _base_config(self) -> DistillConfig:
        return run_context(self.store, self.state.base_run).config

    @property
    def metric(self) -> str:
        """The metric runs are judged by: the base run's."""
        return self._base_config().metric

    # -- a streamed sample -----------------------------------------------------------------------------------
    def ingest(self, body: bytes) -> Literal["accepted", "duplicate"]:
        """Store a new sample once; a text already known is a duplicate. Raises Rejected."""
        sample = parse_sample(body, self.settings)
        if sample.label not in self.state.labels:
            if self.settings.new_labels != "extend":
                raise Rejected("unknown_label", f"{sample.label!r} is not one of the stream's {len(self.state.labels)} "
                                                "labels (PGKD_STREAM_NEW_LABELS=extend adds new labels)")
            self.state.labels = sorted(self.state.labels + [sample.label])
            self._save()
            log.info("stream %s: new label %r; the next run's student has %d classes", self.state.name,
                     sample.label, len(self.state.labels))
        key = text_key(sample.text)
        if key in self.known:
            return "duplicate"
        stored = StoredSample(text=sample.text, label=sample.label, split=route(sample.text,
                              self.settings.validation_percent), seq=len(self.samples) + 1, source=sample.source,
                              id=sample.id, arrived_at=time.time())
        self.sample_store.put(stored)
        self.samples.append(stored)
        self.known.add(key)
        return "accepted"

    # -- triggers --------------------------------------------------------------------------------------------
    @property
    def running(self) -> StreamRun | None:
        return next((r for r in self.state.runs if r.decision is None), None)

    def new_samples(self) -> int:
        """Accepted since the last run started (or since the stream started)."""
        return len(self.samples) - (self.state.runs[-1].samples_through if self.state.runs else 0)

    def check_drift(self) -> DriftCheck | None:
        """Score the current student on each full window of new samples; the last check is kept."""
        current, check = self.state.current, None
        while current is not None:
            start = self.state.drift_checked_through      # samples[i].seq == i + 1
            window = self.samples[start:start + self.settings.drift_window]
            if len(window) < self.settings.drift_window:
                break
            report = score(self._current_student(), [Sample(text=s.text, label=s.label) for s in window],
                           self.state.labels)
            check = DriftCheck(through=window[-1].seq, window=len(window), accuracy=report.accuracy,
                               reference=current.validation_accuracy,
                               drifted=report.accuracy < current.validation_accuracy - self.settings.drift_margin)
            self.state.drift_checked_through = check.through
            self.state.drift_checks = (self.state.drift_checks + [check])[-self.MAX_DRIFT_CHECKS:]
            log.info("stream %s: drift check through sample %d: accuracy %.4f on the last %d, validation %.4f%s",
                     self.state.name, check.through, check.accuracy, check.window, check.reference,
                     " (drift)" if check.drifted else "")
            if check.drifted and self.state.pending_trigger is None:
                self.state.pending_trigger = Trigger(
                    kind="drift", detail=f"accuracy {check.accuracy:.4f} on samples {check.through - check.window + 1}-"
                                         f"{check.through} < validation {check.reference:.4f} - margin "
                                         f"{self.settings.drift_margin}")
            self._save()
        return check

    def due_trigger(self) -> Trigger | None:
        """Why a run should start now, if one should (and can: a current student, no run going)."""
        if self.state.current is None or self.running is not None:
            return None
        if self.state.pending_trigger:
            return self.state.pending_trigger
        if self.new_samples() >= self.settings.trigger_count:
            return Trigger(kind="count", detail=f"{self.new_samples()} new samples >= {self.settings.trigger_count}")
        return None

    def start_run(self, trigger: Trigger) -> RunRequested:
        """A run on the grown dataset, warm-started from the current student. Recorded before it is
        published, so a crash in between publishes it on the next start (`unpublished`)."""
        current, base = self.state.current, self._base_splits()
        streamed = {"train": [], "validation": []}
        for s in self.samples:
            streamed[s.split].append(Sample(text=s.text, label=s.label))
        train = _unique(read_samples_artifact(self.store, current.train_set) + streamed["train"])
        validation = _unique(base.validation + streamed["validation"])
        taken = {normalize_text(s.text) for s in train + validation}
        splits = Splits(labels=list(self.state.labels), train=train, validation=validation,
                        pool=[s for s in base.pool if normalize_text(s.text) not in taken], test=base.test)
        config = self._base_config().model_copy(update={"data": f"stream://{self.state.name}",
                                                         "labeled": len(train) + len(validation)})
        run_id = f"{self.state.name}-{len(self.state.runs) + 1:04d}"
        request = submit_splits(config, f"stream {self.state.name}", splits, self.store, run_id,
                                start_from=current.checkpoint)
        self.state.runs.append(StreamRun(run_id=run_id, trigger=trigger, samples_through=len(self.samples),
                                         train_size=len(train), validation_size=len(validation),
                                         started_at=time.time()))
        self.state.pending_trigger = None
        self._save()
        log.info("stream %s: run %s started (%s): train %d, validation %d, %d labels, from %s", self.state.name,
                 run_id, trigger, len(train), len(validation), len(self.state.labels), current.run_id)
        return request

    def published(self, run_id: str) -> None:
        for r in self.state.runs:
            if r.run_id == run_id:
                r.published = True
        self._save()

    def unpublished(self) -> list[RunRequested | StudentPromoted]:
        """The runs to start and the students to serve that are not on the bus yet."""
        return [RunRequested.model_validate(self.store.get_json(RunFiles(r.run_id).request))
                for r in self.state.runs if not r.published] + \
            [StudentPromoted.model_validate(p) for p in self.state.unpublished_promotions]

    def promotion_published(self, run_id: str) -> None:
        self.state.unpublished_promotions = [p for p in self.state.unpublished_promotions if p["run_id"] != run_id]
        self._save()

    def _promote(self, completed: RunCompleted, scores: dict[str, float], decision: str) -> None:
        """The new current student goes to serving: a StudentPromoted, kept until it is published."""
        promoted = record_promotion(self.store, StudentPromoted(
            run_id=completed.run_id, cycle=completed.best_cycle, checkpoint=completed.best_checkpoint,
            model=self.settings.serving_model, scores=scores, decision=decision, source="stream",
            stream=self.state.name))
        self.state.unpublished_promotions.append(promoted.model_dump(mode="json"))

    # -- a finished run --------------------------------------------------------------------------------------
    def validation_set(self) -> list[Sample]:
        """The current validation set: the base run's and every streamed validation sample."""
        return _unique(self._base_splits().validation
                       + [Sample(text=s.text, label=s.label) for s in self.samples if s.split == "validation"])

    def run_completed(self, completed: RunCompleted) -> PromotionDecision | None:
        """The base run's student becomes the first current one; a stream run's replaces it only if
        it scores better on the current validation set. Other runs are none of the stream's business."""
        state = self.state
        if state.current is None and completed.run_id == state.base_run:
            if completed.status != "completed":
                log.warning("stream %s: base run %s failed (%s): no student to start from", state.name,
                            completed.run_id, completed.reason)
                return None
            best = self._best_cycle(completed)
            reference = self._unbiased_scores(completed, best)
            state.current = CurrentStudent(run_id=completed.run_id, checkpoint=completed.best_checkpoint,
                                           train_set=best.train_set,
                                           labels=run_context(self.store, completed.run_id).labels,
                                           validation_accuracy=reference.accuracy,
                                           validation_score=reference.metric(self.metric), since=time.time())
            self._promote(completed, {f"validation_{k}": v for k, v in best.validation.headline().items()},
                          f"the first student of stream {state.name} (its base run)")
            self._save()
            log.info("stream %s: current student: run %s cycle %d (drift reference: accuracy %.4f)", state.name,
                     completed.run_id, completed.best_cycle, reference.accuracy)
            return None
        run = next((r for r in state.runs if r.run_id == completed.run_id), None)
        if run is None or run.decision is not None:
            return None
        metric = self.metric
        if completed.status != "completed":
            decision = PromotionDecision(run_id=run.run_id, replaced=False, metric=metric,
                                         current_run=state.current.run_id,
                                         reason=f"the run failed ({completed.reason}); the current student stays")
        else:
            try:
                decision = self._promote_if_better(completed, metric)
            except Exception as e:  # a decision that cannot be made must not hold the stream's next runs
                log.exception("stream %s: run %s: cannot compare the students", state.name, run.run_id)
                decision = PromotionDecision(run_id=run.run_id, replaced=False, metric=metric,
                                             current_run=state.current.run_id,
                                             reason=f"could not compare the students ({type(e).__name__}: {e}); "
                                                    "the current student stays")
        run.decision = decision
        if decision.replaced:   # judge the new student for drift only on samples it was not trained on
            state.drift_checked_through = max(state.drift_checked_through, run.samples_through)
            self._promote(completed, {f"validation_{metric}": decision.new_score,
                                      "validation_accuracy": decision.new_accuracy}, decision.reason)
        self.store.put_json(f"{self.base}/decisions/{run.run_id}.json", decision.model_dump(mode="json"))
        self._save()
        log.info("stream %s: run %s: %s", state.name, run.run_id, decision.reason)
        return decision

    def _promote_if_better(self, completed: RunCompleted, metric: str) -> PromotionDecision:
        state, validation = self.state, self.validation_set()
        new_student = load_checkpoint(self.store, completed.best_checkpoint, self._base_config().device)
        new, current = (score(new_student, validation, state.labels),
                        score(self._current_student(), validation, state.labels))
        decision = compare(completed.run_id, new, current, metric, state.current.run_id, validation)
        if decision.replaced:
            best = self._best_cycle(completed)
            state.current = CurrentStudent(run_id=completed.run_id, checkpoint=completed.best_checkpoint,
                                           train_set=best.train_set, labels=list(new_student.labels),
                                           validation_accuracy=new.accuracy, validation_score=new.metric(metric),
                                           since=time.time())
            self._student = (completed.best_checkpoint.sha256, new_student)
            self.known |= {text_key(s.text) for s in read_samples_artifact(self.store, best.train_set)}
        return decision

    def _unbiased_scores(self, completed: RunCompleted, best: CycleState) -> EvalReport:
        """The drift reference: scores of the base run the teacher never aimed at. Its selection scores
        when they are such (out-of-fold selection, or out-of-fold guidance); when validation both guided
        the teacher and selected, the kept student's validation score flatters it (the teacher was
        aimed at those very texts) and a check against it fires on data of the same distribution, so
        the reference is then cycle 0's validation score, taken before the teacher was asked anything:
        lower than the kept student's true accuracy, so the check errs towards silence."""
        config = run_context(self.store, completed.run_id).config
        if config.selection_source == "out-of-fold" or config.guidance_source == "out-of-fold":
            return best.decisive
        return CycleState.model_validate(self.store.get_json(RunFiles(completed.run_id).cycle_state(0))).validation

    def _best_cycle(self, completed: RunCompleted) -> CycleState:
        return CycleState.model_validate(self.store.get_json(RunFiles(completed.run_id).cycle_state(
            completed.best_cycle)))

    def _current_student(self):
        ref = self.state.current.checkpoint
        if self._student is None or self._student[0] != ref.sha256:
            self._student = (ref.sha256, load_checkpoint(self.store, ref, self._base_config().device))
        return self._student[1]


def _unique(samples: list[Sample]) -> list[Sample]:
    """First occurrence of each normalised text, in order."""
    seen, out = set(), []
    for s in samples:
        key = normalize_text(s.text)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out
