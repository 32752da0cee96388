"""Continuous distillation: a stream of human-labeled samples keeps the student current.

A stream grows the dataset of a base run (one submitted with `pgkd submit`). Each streamed sample
is validated (a bad one is rejected with a reason), deduplicated by normalised text against every
text the stream's data already holds (train, validation, test, and what the current student was
trained on), and routed to train or validation by a stable hash of that text, so validation stays
held out and a replay routes every sample the same way. Two triggers start a new run, warm-started
from the current best student on the grown dataset:
    count: `trigger_count` samples accepted since the last run started;
    drift: the current student's accuracy on a window of `drift_window` newly arrived samples is
           below its validation accuracy by more than `drift_margin`.
One run at a time: a trigger that fires while a run is going is kept and acted on when it ends.
When a stream run completes, its best student replaces the current one only if it scores better
on the current validation set (the base run's plus every streamed validation sample); the decision
is recorded either way.

What a stream keeps in the artifact store, under streams/<name>/:
    state.json              the taxonomy, the current student, the runs and their decisions, drift checks
    samples/<sha256>.json   one accepted sample, keyed by its normalised text (so stored at most once)
    decisions/<run_id>.json a run's decision: both scores, the validation set they were measured on
The stream has one writer: run ingest as a single replica.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from pgkd.distributed.artifacts import ArtifactRef, ArtifactStore
from pgkd.data import Sample, Splits, normalize_text
from pgkd.loop.config import DistillConfig
from pgkd.errors import UserError
from pgkd.loop.evaluation import evaluate
from pgkd.distributed.messages import LabeledSample, RunCompleted, RunRequested
from pgkd.distributed.metrics import INGEST_REJECTIONS
from pgkd.distributed.steps import CycleState, RunFiles, load_checkpoint, read_samples_artifact, run_context, submit_splits

log = logging.getLogger("pgkd.stream")

REJECTION_REASONS = INGEST_REJECTIONS


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REJECTION_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class StreamSettings(BaseModel):
    """How ingest treats a stream; from PGKD_STREAM_* in the service (see `from_env`)."""
    stream: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    base_run: str | None = None           # the run whose data and best student the stream starts from
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(2000, ge=1)    # longer texts are rejected (oversized), not truncated
    new_labels: Literal["reject", "extend"] = "reject"    # extend: a new label grows the taxonomy
    validation_percent: int = Field(20, ge=0, le=100)
    trigger_count: int = Field(500, gt=0)
    drift_window: int = Field(200, gt=0)
    drift_margin: float = Field(0.1, ge=0, le=1)

    @classmethod
    def from_env(cls, env=None) -> "StreamSettings":
        env = os.environ if env is None else env
        values = {field: env[cls.variable(field)] for field in cls.model_fields if env.get(cls.variable(field))}
        try:
            return cls(**values)
        except ValidationError as e:
            field = str(e.errors()[0]["loc"][0])
            raise UserError(f"{cls.variable(field)}={values.get(field)!r}: {e.errors()[0]['msg']}") from None

    @staticmethod
    def variable(field: str) -> str:
        """The environment variable of a setting: PGKD_STREAM, PGKD_STREAM_BASE_RUN, ..."""
        return "PGKD_STREAM" if field == "stream" else f"PGKD_STREAM_{field.upper()}"


# -- one streamed sample ---------------------------------------------------------------------------------

class StoredSample(BaseModel):
    text: str
    label: str
    split: Literal["train", "validation"]
    seq: int                      # arrival order among the stream's accepted samples, from 1
    source: str | None = None
    id: str | None = None
    arrived_at: float


def parse_sample(body: bytes, settings: StreamSettings) -> LabeledSample:
    """The message as a sample, or Rejected with why: not JSON, wrong fields, empty, too short or too long."""
    if len(body) > 4 * settings.max_chars + 4096:   # no need to parse a huge body to know
        raise Rejected("oversized", f"message of {len(body)} bytes")
    try:
        row = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected("not_json", str(e)[:120]) from None
    if not isinstance(row, dict):
        raise Rejected("not_json", f"expected a JSON object, got {type(row).__name__}")
    try:
        sample = LabeledSample.model_validate(row)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'message'}: {err['msg']}"
                             for err in e.errors()[:3])
        raise Rejected("invalid_fields", problems) from None
    text = " ".join(sample.text.split())
    if not text:
        raise Rejected("empty_text", "the text is empty")
    if len(text) < settings.min_chars:
        raise Rejected("too_short", f"{len(text)} characters, fewer than {settings.min_chars}")
    if len(text) > settings.max_chars:
        raise Rejected("oversized", f"{len(text)} characters, more than {settings.max_chars}")
    if not sample.label.strip():
        raise Rejected("invalid_fields", "label: empty")
    return sample.model_copy(update={"text": text, "label": sample.label.strip()})


def text_key(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


def route(text: str, validation_percent: int) -> Literal["train", "validation"]:
    """Train or validation, by a hash of the normalised text: the same text always goes the same way."""
    return "validation" if int(text_key(text)[:8], 16) % 100 < validation_percent else "train"


# -- the stream's state ----------------------------------------------------------------------------------

class CurrentStudent(BaseModel):
    run_id: str
    checkpoint: ArtifactRef
    train_set: ArtifactRef        # what it was trained on: the next run's training set starts from it
    labels: list[str]
    validation_accuracy: float    # when it became current: the drift trigger's reference
    validation_score: float       # the same, in the run's metric
    since: float


class Decision(BaseModel):
    run_id: str
    replaced: bool
    reason: str
    metric: str
    new_score: float | None = None
    current_score: float | None = None
    new_accuracy: float | None = None
    current_accuracy: float | None = None
    current_run: str | None = None          # the student the new one was measured against
    validation_size: int = 0
    validation_sha256: str = ""
    decided_at: float = Field(default_factory=time.time)


class StreamRun(BaseModel):
    run_id: str
    trigger: str
    samples_through: int          # accepted samples (by seq) its dataset holds
    train_size: int
    validation_size: int
    started_at: float
    published: bool = False
    decision: Decision | None = None


class DriftCheck(BaseModel):
    through: int                  # the last sample (seq) of the window
    window: int
    accuracy: float
    reference: float              # the current student's validation accuracy
    drifted: bool
    checked_at: float = Field(default_factory=time.time)


class StreamState(BaseModel):
    name: str
    base_run: str
    labels: list[str]
    current: CurrentStudent | None = None
    runs: list[StreamRun] = []
    drift_checked_through: int = 0
    drift_checks: list[DriftCheck] = []     # the latest few
    pending_trigger: str | None = None      # fired while a run was going


def score(student, samples: list[Sample], labels: list[str]):
    """An EvalReport over `labels`, for a student that may know fewer of them (those it does not
    know it can only get wrong)."""
    probs = student.predict_proba([s.text for s in samples])
    full = np.zeros((len(samples), len(labels)), dtype=np.float32)
    index = {label: i for i, label in enumerate(labels)}
    for j, label in enumerate(student.labels):
        full[:, index[label]] = probs[:, j]
    return evaluate([s.label for s in samples], full, labels)


class Stream:
    """One stream: its state and samples in the artifact store, and what ingest does with a sample
    or a finished run. Methods return what to publish; the caller publishes."""

    MAX_DRIFT_CHECKS = 20

    def __init__(self, store: ArtifactStore, settings: StreamSettings):
        self.store, self.settings = store, settings
        self.base = f"streams/{settings.stream}"
        self.state: StreamState | None = None
        self.samples: list[StoredSample] = []
        self.known: set[str] = set()          # text keys of everything the stream's data holds
        self._student: tuple[str, object] | None = None   # (checkpoint sha256, the current student)

    # -- opening -------------------------------------------------------------------------------------------
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
        self.samples = sorted((StoredSample.model_validate(self.store.get_json(k))
                               for k in self.store.list(f"{self.base}/samples")), key=lambda s: s.seq)
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

    # -- a streamed sample ----------------------------------------------------------------------------------
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
        self.store.put_json(f"{self.base}/samples/{key}.json", stored.model_dump(mode="json"))
        self.samples.append(stored)
        self.known.add(key)
        return "accepted"

    # -- triggers ---------------------------------------------------------------------------------------------
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
                self.state.pending_trigger = (f"drift: accuracy {check.accuracy:.4f} on samples "
                                              f"{check.through - check.window + 1}-{check.through} < validation "
                                              f"{check.reference:.4f} - margin {self.settings.drift_margin}")
            self._save()
        return check

    def due_trigger(self) -> str | None:
        """Why a run should start now, if one should (and can: a current student, no run going)."""
        if self.state.current is None or self.running is not None:
            return None
        if self.state.pending_trigger:
            return self.state.pending_trigger
        if self.new_samples() >= self.settings.trigger_count:
            return f"count: {self.new_samples()} new samples >= {self.settings.trigger_count}"
        return None

    def start_run(self, trigger: str) -> RunRequested:
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

    def unpublished(self) -> list[RunRequested]:
        return [RunRequested.model_validate(self.store.get_json(RunFiles(r.run_id).request))
                for r in self.state.runs if not r.published]

    # -- a finished run ---------------------------------------------------------------------------------------
    def validation_set(self) -> list[Sample]:
        """The current validation set: the base run's and every streamed validation sample."""
        return _unique(self._base_splits().validation
                       + [Sample(text=s.text, label=s.label) for s in self.samples if s.split == "validation"])

    def run_completed(self, completed: RunCompleted) -> Decision | None:
        """The base run's student becomes the first current one; a stream run's replaces it only if
        it scores better on the current validation set. Other runs are none of the stream's business."""
        state = self.state
        if state.current is None and completed.run_id == state.base_run:
            if completed.status != "completed":
                log.warning("stream %s: base run %s failed (%s): no student to start from", state.name,
                            completed.run_id, completed.reason)
                return None
            best = CycleState.model_validate(self.store.get_json(RunFiles(completed.run_id).cycle_state(
                completed.best_cycle)))
            state.current = CurrentStudent(run_id=completed.run_id, checkpoint=completed.best_checkpoint,
                                           train_set=best.train_set, labels=run_context(self.store,
                                                                                          completed.run_id).labels,
                                           validation_accuracy=best.validation.accuracy,
                                           validation_score=best.validation.metric(self.metric),
                                           since=time.time())
            self._save()
            log.info("stream %s: current student: run %s cycle %d (validation accuracy %.4f)", state.name,
                     completed.run_id, completed.best_cycle, best.validation.accuracy)
            return None
        run = next((r for r in state.runs if r.run_id == completed.run_id), None)
        if run is None or run.decision is not None:
            return None
        metric = self.metric
        if completed.status != "completed":
            decision = Decision(run_id=run.run_id, replaced=False, metric=metric, current_run=state.current.run_id,
                                reason=f"the run failed ({completed.reason}); the current student stays")
        else:
            try:
                decision = self._compare(completed, metric)
            except Exception as e:  # a decision that cannot be made must not hold the stream's next runs
                log.exception("stream %s: run %s: cannot compare the students", state.name, run.run_id)
                decision = Decision(run_id=run.run_id, replaced=False, metric=metric, current_run=state.current.run_id,
                                    reason=f"could not compare the students ({type(e).__name__}: {e}); "
                                           "the current student stays")
        run.decision = decision
        if decision.replaced:   # judge the new student for drift only on samples it was not trained on
            state.drift_checked_through = max(state.drift_checked_through, run.samples_through)
        self.store.put_json(f"{self.base}/decisions/{run.run_id}.json", decision.model_dump(mode="json"))
        self._save()
        log.info("stream %s: run %s: %s", state.name, run.run_id, decision.reason)
        return decision

    def _compare(self, completed: RunCompleted, metric: str) -> Decision:
        state, validation = self.state, self.validation_set()
        digest = hashlib.sha256("".join(s.model_dump_json() + "\n" for s in validation).encode()).hexdigest()
        device = self._base_config().device
        new_student = load_checkpoint(self.store, completed.best_checkpoint, device)
        new, current = (score(new_student, validation, state.labels),
                        score(self._current_student(), validation, state.labels))
        lower_is_better = metric == "loss"
        better = new.metric(metric) < current.metric(metric) if lower_is_better else \
            new.metric(metric) > current.metric(metric)
        verdict = "replaces" if better else "does not beat"
        decision = Decision(run_id=completed.run_id, replaced=better, metric=metric, new_score=new.metric(metric),
                            current_score=current.metric(metric), new_accuracy=new.accuracy,
                            current_accuracy=current.accuracy, current_run=state.current.run_id,
                            validation_size=len(validation), validation_sha256=digest,
                            reason=f"validation {metric} {new.metric(metric):.4f} {verdict} the current student's "
                                   f"{current.metric(metric):.4f} (run {state.current.run_id}, "
                                   f"{len(validation)} validation samples)")
        if better:
            best = CycleState.model_validate(self.store.get_json(RunFiles(completed.run_id).cycle_state(
                completed.best_cycle)))
            state.current = CurrentStudent(run_id=completed.run_id, checkpoint=completed.best_checkpoint,
                                           train_set=best.train_set, labels=list(new_student.labels),
                                           validation_accuracy=new.accuracy, validation_score=new.metric(metric),
                                           since=time.time())
            self._student = (completed.best_checkpoint.sha256, new_student)
            self.known |= {text_key(s.text) for s in read_samples_artifact(self.store, best.train_set)}
        return decision

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

