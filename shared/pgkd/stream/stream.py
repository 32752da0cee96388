"""One stream, and what ingest does with incoming messages: `take_batch(bodies)` for labeled
samples (`take(body)` for one), `finished(completed)` for a run that ended, `resume()` when ingest
starts. Each returns a StreamStep (what to do next: dead-letter messages, publish runs); the ingest
service and `pgkd bench stream` call the same ones. The parts: samples.py (validation, dedupe keys,
routing), segments.py (the samples' storage and the dedupe index), settings.py (the environment's
and the settings file's), state.py (what is remembered), promotion.py (the comparison); this module
sequences them."""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from pgkd.data import Splits, normalize_text
from pgkd.types import EvalReport, Sample
from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import RunCompleted, RunRequested, StudentPromoted
from pgkd.distributed.steps import (
    RunFiles,
    load_checkpoint,
    read_samples_artifact,
    record_promotion,
    run_context,
    submit_splits,
)
from pgkd.errors import UserError, dotted, invalid
from pgkd.loop.config import DistillConfig
from pgkd.loop.state import Best, RunState
from pgkd.stream.promotion import cascade_score, compare, score
from pgkd.stream.samples import Rejected, StoredSample, parse_sample, split_for
from pgkd.stream.segments import KEY_BYTES, SegmentLog, index_key
from pgkd.stream.settings import SettingsFile, StreamSettings
from pgkd.stream.state import (CurrentStudent, DriftCheck, PromotionDecision, StreamRun, StreamState, Trigger,
                               stream_key)
from pgkd.stream.teacher_share import TeacherShare, bound_teacher_share

log = logging.getLogger("pgkd.stream")


@dataclass
class Taken:
    """What became of one sample message: stored, a duplicate, or rejected (and why); for the first
    two, whose label it was (human or teacher: pgkd.distributed.messages.source_kind)."""
    outcome: Literal["accepted", "duplicate", "rejected"]
    rejected: Rejected | None = None
    source: Literal["human", "teacher"] | None = None


@dataclass
class StreamStep:
    """What follows from a message or a batch: each sample's outcome (a rejected one goes to the
    dead-letter topic with its reason), a decision taken, a run started now and why, the runs to publish."""
    outcome: Literal["accepted", "duplicate", "rejected", "batch", "decided", "ignored", "resumed"]
    rejected: Rejected | None = None
    decision: PromotionDecision | None = None
    started: Trigger | None = None
    publish: list[RunRequested | StudentPromoted] = field(default_factory=list)
    taken: list[Taken] = field(default_factory=list)


class Stream:
    """A stream's samples and state in the artifact store. It has one writer: run ingest as a single
    replica."""

    MAX_DRIFT_CHECKS = 20

    def __init__(self, store: ArtifactStore, settings: StreamSettings):
        self.store, self.env_settings = store, settings
        self.settings, self.settings_file = settings, None     # with the settings file's over them (refresh)
        self.base = stream_key(settings.stream)
        self.log = SegmentLog(store, f"{self.base}/segments", settings.segment_samples)
        self.state: StreamState | None = None
        # index keys of what the stream's data holds besides its stored samples (self.log.keys): the
        # base run's splits and what the current student was trained on
        self.known: set[bytes] = set()
        self.pending: list[StoredSample] = []   # stored, not yet in a drift window
        self._student: tuple[str, object] | None = None   # (checkpoint sha256, the current student)
        self._settings_stamp: tuple | None = None

    # -- the entry points ------------------------------------------------------------------------------------
    def take_batch(self, bodies: list[bytes | None]) -> StreamStep:
        """Streamed samples (record values, None for a null one): each rejected, a duplicate, or stored
        (the stored ones in one commit); then drift is checked and a run starts if a trigger is due."""
        self.refresh_settings()
        taken = self.store_batch(bodies)
        if any(t.outcome == "accepted" for t in taken):
            self.check_drift()
        return self._runs_due(StreamStep("batch", taken=taken))

    def take(self, body: bytes) -> StreamStep:
        """One streamed sample (a batch of one)."""
        step = self.take_batch([body])
        step.outcome, step.rejected = step.taken[0].outcome, step.taken[0].rejected
        return step

    def finished(self, completed: RunCompleted) -> StreamStep:
        """A run ended: the base run's student becomes the first current one; a stream run's may
        replace it. A trigger that waited for the run may start the next one."""
        self.refresh_settings()
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
        """Read the stream back from the store, or start it from the base run. A bad setting, a bad
        settings file or a damaged segment is a UserError."""
        started = time.perf_counter()
        self.settings, self.settings_file = self._load_settings()
        key = f"{self.base}/state.json"
        if self.store.exists(key):
            self.state = self.store.get_model(key, StreamState)
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
        self._check_run_options(self.settings)
        base = self._base_splits()
        self.known = {index_key(s.text) for s in base.train + base.validation + base.test}
        self.log.open()
        if self.state.current is None:   # the base run may have completed before ingest first started
            self.pending = list(deque(self._human(self.log.read(after_seq=self.state.drift_checked_through)),
                                      maxlen=self.settings.drift_window))
            completed = RunFiles(self.state.base_run).completed
            if self.store.exists(completed):
                self.run_completed(self.store.get_model(completed, RunCompleted))
        else:
            self.pending = list(self._human(self.log.read(after_seq=self.state.drift_checked_through)))
            self.known |= self._trained_keys(self.state.current.train_set)
        log.info("stream %s: base run %s, %d labels, %d samples stored in %d segment(s), current student: %s "
                 "(read back in %.2f s)", self.state.name, self.state.base_run, len(self.state.labels), self.log.count,
                 len(self.log.manifest.segments),
                 self.state.current.run_id if self.state.current else "none yet (the base run has not completed)",
                 time.perf_counter() - started)

    def _load_settings(self) -> tuple[StreamSettings, SettingsFile | None]:
        path = self.env_settings.settings_file
        if path:
            try:
                stat = os.stat(path)
                self._settings_stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except OSError:
                self._settings_stamp = None
        return self.env_settings.with_file()

    def refresh_settings(self) -> None:
        """The settings file again if it changed since it was read; one that does not validate is one
        logged line, and the settings in force stay."""
        path = self.env_settings.settings_file
        if not path or self.state is None:
            return
        try:
            stat = os.stat(path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = None
        if stamp == self._settings_stamp:
            return
        try:
            settings, file = self._load_settings()
            self._check_run_options(settings)
        except UserError as e:
            log.error("stream %s: the settings in force stay: %s", self.state.name, e)
            return
        if file.sha256 != (self.settings_file.sha256 if self.settings_file else None):
            log.info("stream %s: settings from %s now in force: %s", self.state.name, path, file.values)
        self.settings, self.settings_file = settings, file

    def _check_run_options(self, settings: StreamSettings) -> None:
        """The triggered runs' options over the base run's must make a valid run: checked when they are
        read, not when a run is due."""
        try:
            self.run_config(settings)
        except ValidationError as e:
            where = settings.settings_file or StreamSettings.variable("run")
            raise UserError(f"{where}: {invalid(e, dotted(prefix='run.'))}") from None

    def run_config(self, settings: StreamSettings | None = None) -> DistillConfig:
        """The options of a run it triggers: the base run's, the settings' `run` over them."""
        return DistillConfig.model_validate({**self._base_config().model_dump(), **(settings or self.settings).run})

    def _trained_keys(self, train_set) -> set[bytes]:
        """Index keys of a training set's texts that are not stored samples (the base run's, the teacher's),
        kept beside the segments so a restart need not read the training set."""
        key = f"{self.base}/trained/{train_set.sha256[:32]}.keys"
        if self.store.exists(key):
            data = self.store.get_bytes(key)
            return {data[i:i + KEY_BYTES] for i in range(0, len(data), KEY_BYTES)}
        keys = {index_key(s.text) for s in read_samples_artifact(self.store, train_set)} - self.log.keys
        self.store.put_bytes(key, b"".join(sorted(keys)))
        return keys

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

    # -- streamed samples ------------------------------------------------------------------------------------
    def store_batch(self, bodies: list[bytes | None]) -> list[Taken]:
        """Store each new sample once, all in one commit; a text already known (or earlier in the
        batch) is a duplicate; a bad message is rejected with its reason."""
        taken, accepted, keys = [], [], set()
        labels_before = list(self.state.labels)
        for body in bodies:
            try:
                sample = parse_sample(body, self.settings)
                self._check_label(sample.label)
            except Rejected as e:
                taken.append(Taken("rejected", e))
                continue
            kind = "teacher" if sample.is_teacher else "human"
            key = index_key(sample.text)
            # A person's label of a text stored with the teacher's corrects it (once); else a known text is a
            # duplicate. (A text the teacher labeled is no base run's: `known` holds it only as trained on.)
            correction = kind == "human" and key not in keys and self.log.correctable(key)
            if not correction and (key in self.known or key in self.log.keys or key in keys):
                taken.append(Taken("duplicate", source=kind))
                continue
            keys.add(key)
            accepted.append(StoredSample(text=sample.text, label=sample.label,
                                         split=split_for(sample, self.settings.validation_percent),
                                         seq=self.log.last_seq + 1 + len(accepted), source=sample.source,
                                         id=sample.id, model=sample.model, arrived_at=time.time()))
            taken.append(Taken("accepted", source=kind))
        if self.state.labels != labels_before:
            # before the samples: stored samples of a label the state lacks would never add it (their
            # redelivery is a duplicate)
            self._save()
        self.log.append(accepted)
        self.pending.extend(self._human(accepted))
        if self.state.current is None:   # nothing to check yet: the first student is judged on what comes last
            self.pending = self.pending[-self.settings.drift_window:]
        return taken

    def ingest(self, body: bytes) -> Literal["accepted", "duplicate"]:
        """One sample stored (a batch of one); raises Rejected."""
        (taken,) = self.store_batch([body])
        if taken.rejected is not None:
            raise taken.rejected
        return taken.outcome

    @staticmethod
    def _human(samples):
        """The human labels among stored samples: what drift is measured on (a teacher label answers a
        text the student deferred, and is the teacher's word, not the truth the student is judged by)."""
        return (s for s in samples if not s.is_teacher)

    def _check_label(self, label: str) -> None:
        if label in self.state.labels:
            return
        if self.settings.new_labels != "extend":
            raise Rejected("unknown_label", f"{label!r} is not one of the stream's {len(self.state.labels)} "
                                            "labels (PGKD_STREAM_NEW_LABELS=extend adds new labels)")
        self.state.labels = sorted(self.state.labels + [label])
        log.info("stream %s: new label %r; the next run's student has %d classes", self.state.name, label,
                 len(self.state.labels))

    # -- triggers --------------------------------------------------------------------------------------------
    @property
    def running(self) -> StreamRun | None:
        return next((r for r in self.state.runs if r.decision is None), None)

    def new_samples(self) -> int:
        """Accepted since the last run started (or since the stream started)."""
        return self.log.last_seq - (self.state.runs[-1].samples_through if self.state.runs else 0)

    def check_drift(self) -> DriftCheck | None:
        """Score the current student on each full window of new human labels (never teacher labels:
        see `_human`). Its first windows make its
        reference (`drift_reference_windows` of them: samples it was neither trained nor selected on,
        so the reference is neither flattered by selection nor by the teacher aiming at validation);
        each later window drifts when its accuracy is below the reference by more than the margin.
        The first windows themselves drift when below the floor by the margin (a stream unlike the
        data from its start): the base student's unbiased score, or the reference the stream had."""
        current, check, size = self.state.current, None, self.settings.drift_window
        while current is not None and len(self.pending) >= size:
            window, self.pending = self.pending[:size], self.pending[size:]
            report = score(self._current_student(), [Sample(text=s.text, label=s.label) for s in window],
                           self.state.labels)
            if current.reference_windows < self.settings.drift_reference_windows:
                current.reference_windows += 1
                current.reference_samples += len(window)
                current.reference_correct += round(report.accuracy * len(window))
                if current.reference_windows == self.settings.drift_reference_windows:
                    current.drift_reference = current.reference_correct / current.reference_samples
                check = DriftCheck(through=window[-1].seq, first=window[0].seq, window=len(window),
                                   accuracy=report.accuracy, reference=current.reference_floor, role="reference",
                                   drifted=report.accuracy < current.reference_floor - self.settings.drift_margin)
            else:
                check = DriftCheck(through=window[-1].seq, first=window[0].seq, window=len(window),
                                   accuracy=report.accuracy, reference=current.drift_reference,
                                   drifted=report.accuracy < current.drift_reference - self.settings.drift_margin)
            self.state.drift_checked_through = check.through
            self.state.drift_checks = (self.state.drift_checks + [check])[-self.MAX_DRIFT_CHECKS:]
            log.info("stream %s: drift %s through sample %d: accuracy %.4f on the last %d, %s %.4f%s",
                     self.state.name, "reference window" if check.role == "reference" else "check", check.through,
                     check.accuracy, check.window, "floor" if check.role == "reference" else "reference",
                     check.reference, " (drift)" if check.drifted else "")
            if check.drifted and self.state.pending_trigger is None:
                self.state.pending_trigger = Trigger(
                    kind="drift", detail=f"accuracy {check.accuracy:.4f} on samples {check.first}-"
                                         f"{check.through} < {'floor' if check.role == 'reference' else 'reference'} "
                                         f"{check.reference:.4f} - margin "
                                         f"{self.settings.drift_margin}")
        if check is not None:
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
        """A run on the grown dataset, warm-started from the current student (from the pretrained
        encoder when the settings' `run` names another student). Recorded before it is published, so a
        crash in between publishes it on the next start (`unpublished`)."""
        current = self.state.current
        splits, teacher = self.cut()
        config = self.run_config().model_copy(update={
            "data": f"stream://{self.state.name}", "labeled": len(splits.train) + len(splits.validation)})
        same_student = config.student == run_context(self.store, current.run_id).config.student
        run_id = f"{self.state.name}-{len(self.state.runs) + 1:04d}"
        request = submit_splits(config, f"stream {self.state.name}", splits, self.store, run_id,
                                start_from=current.checkpoint if same_student else None)
        self.state.runs.append(StreamRun(run_id=run_id, trigger=trigger, samples_through=self.log.last_seq,
                                         train_size=len(splits.train), validation_size=len(splits.validation),
                                         teacher_labels=teacher.kept, teacher_labels_left_out=teacher.left_out,
                                         started_at=time.time(), settings=self.settings.in_force(),
                                         cut_from=[{"segment": s.name, "samples": s.samples, "bytes": s.bytes,
                                                    "sha256": s.sha256} for s in self.log.manifest.segments],
                                         settings_sha256=self.settings_file.sha256 if self.settings_file else None))
        self.state.pending_trigger = None
        self._save()
        log.info("stream %s: run %s started (%s): train %d (%d teacher labels, %d left out: at most %s of it), "
                 "validation %d, %d labels, %s", self.state.name, run_id, trigger, len(splits.train), teacher.kept,
                 teacher.left_out, self.settings.max_teacher_label_share, len(splits.validation),
                 len(self.state.labels), f"from {current.run_id}" if same_student else f"a new {config.student} student")
        return request

    def dataset(self) -> Splits:
        """The grown dataset a run is cut from (see `cut`)."""
        return self.cut()[0]

    def cut(self) -> tuple[Splits, TeacherShare]:
        """The grown dataset a run is cut from: the current student's training set (the base run's
        train split before there is one) and every streamed human train sample, then the newest
        teacher labels up to `max_teacher_label_share` of the training set (teacher_share.py says
        why the newest); the base run's validation and every streamed validation sample (human
        labels only); the base run's pool (less what is now labeled) and test. And how many teacher
        labels were kept and left out."""
        current, base = self.state.current, self._base_splits()
        streamed = {"train": [], "validation": [], "teacher": []}
        for s in self.log.read():
            streamed["teacher" if s.is_teacher else s.split].append(Sample(text=s.text, label=s.label))
        teacher_texts = {normalize_text(s.text) for s in streamed["teacher"]}
        # a person's label of a text the teacher labeled first replaces the teacher's (in train or validation)
        corrected = teacher_texts & {normalize_text(s.text) for s in streamed["train"] + streamed["validation"]}
        trained = read_samples_artifact(self.store, current.train_set) if current else base.train
        # a teacher label an earlier stream run trained on is in `trained`: it is counted (and bounded) as one
        others = _unique([s for s in trained if normalize_text(s.text) not in teacher_texts] + streamed["train"])
        teacher = bound_teacher_share(others, [s for s in streamed["teacher"] if normalize_text(s.text) not in corrected],
                                      self.settings.max_teacher_label_share)
        validation = _unique(base.validation + streamed["validation"])
        taken = {normalize_text(s.text) for s in teacher.train + validation}
        return Splits(labels=list(self.state.labels), train=teacher.train, validation=validation,
                      pool=[s for s in base.pool if normalize_text(s.text) not in taken], test=base.test), teacher

    def published(self, run_id: str) -> None:
        for r in self.state.runs:
            if r.run_id == run_id:
                r.published = True
        self._save()

    def unpublished(self) -> list[RunRequested | StudentPromoted]:
        """The runs to start and the students to serve that are not on the bus yet."""
        return [self.store.get_model(RunFiles(r.run_id).request, RunRequested)
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
        """The current validation set: the base run's and every streamed validation sample, human
        labels only (what promotion compares students on)."""
        return _unique(self._base_splits().validation
                       + [Sample(text=s.text, label=s.label) for s in self._human(self.log.read())
                          if s.split == "validation"])

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
                                           validation_score=reference.metric(self.metric), since=time.time(),
                                           reference_floor=reference.accuracy)
            self._promote(completed, {f"validation_{k}": v for k, v in best.validation.headline().items()},
                          f"the first student of stream {state.name} (its base run)")
            # judged for drift on what arrived last (pending keeps the last window while there is no student)
            state.drift_checked_through = max(state.drift_checked_through,
                                              self.pending[0].seq - 1 if self.pending else self.log.last_seq)
            self.known |= self._trained_keys(best.train_set)
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
            self.pending = [s for s in self.pending if s.seq > state.drift_checked_through]
            self._promote(completed, {f"validation_{metric}": decision.new_score,
                                      "validation_accuracy": decision.new_accuracy}, decision.reason)
        self.store.put_json(f"{self.base}/decisions/{run.run_id}.json", decision.model_dump(mode="json"))
        self._save()
        log.info("stream %s: run %s: %s", state.name, run.run_id, decision.reason)
        return decision

    def _promote_if_better(self, completed: RunCompleted, metric: str) -> PromotionDecision:
        state, validation = self.state, self.validation_set()
        if not validation:           # nothing to judge either student on: never a swap on no evidence
            return PromotionDecision(run_id=completed.run_id, replaced=False, metric=metric,
                                     current_run=state.current.run_id,
                                     reason="no validation texts to compare the students on; the current "
                                            "student stays")
        new_student = load_checkpoint(self.store, completed.best_checkpoint, self._base_config().device)
        new, current = (score(new_student, validation, state.labels),
                        score(self._current_student(), validation, state.labels))
        config = run_context(self.store, completed.run_id).config   # the run's own target (it was calibrated for it)
        target = {"target_accuracy": config.target_accuracy, "max_teacher_share": config.max_teacher_share}
        cascade = None if target == {"target_accuracy": None, "max_teacher_share": None} else \
            tuple(cascade_score(s, validation, state.labels, **target) for s in (new_student, self._current_student()))
        decision = compare(completed.run_id, new, current, metric, state.current.run_id, validation, cascade, **target)
        if decision.replaced:
            best = self._best_cycle(completed)
            state.current = CurrentStudent(run_id=completed.run_id, checkpoint=completed.best_checkpoint,
                                           train_set=best.train_set, labels=list(new_student.labels),
                                           validation_accuracy=new.accuracy, validation_score=new.metric(metric),
                                           since=time.time(),
                                           reference_floor=self._floor_after(state.current))
            self._student = (completed.best_checkpoint.sha256, new_student)
            self.known |= self._trained_keys(best.train_set)
        return decision

    @staticmethod
    def _floor_after(previous: CurrentStudent) -> float:
        """A promoted student's floor: the level the stream had (its validation score selected it, so
        that score flatters it)."""
        return previous.drift_reference if previous.drift_reference is not None else previous.reference_floor

    def _unbiased_scores(self, completed: RunCompleted, best: Best) -> EvalReport:
        """The drift reference: scores of the base run the teacher never aimed at. Its selection scores
        when they are such (out-of-fold selection, or out-of-fold guidance); when validation both guided
        the teacher and selected, the kept student's validation score flatters it (the teacher was
        aimed at those very texts) and a check against it fires on data of the same distribution, so
        the reference is then cycle 0's validation score, taken before the teacher was asked anything:
        lower than the kept student's true accuracy, so the check errs towards silence."""
        config = run_context(self.store, completed.run_id).config
        if config.selection_source == "out-of-fold" or config.guidance_source == "out-of-fold":
            return best.decisive
        return self._final_state(completed).baseline.validation

    def _final_state(self, completed: RunCompleted) -> RunState:
        if completed.state is None:
            raise UserError(f"run {completed.run_id}: its RunCompleted names no final state")
        return self.store.get_model(completed.state, RunState)

    def _best_cycle(self, completed: RunCompleted) -> Best:
        return self._final_state(completed).best

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
