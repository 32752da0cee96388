"""The cascade: the student answers the texts it is sure of, the teacher LLM answers the rest, and
every answer says who gave it.

    texts -> student (calibrated confidence) -> confidence >= threshold ? student : teacher
                                                                          (classification prompt)

The threshold comes from a `Policy`: a threshold, or a target (an accuracy the student's answers must
hold, or the share of texts the LLM may see) turned into one on the student's held calibration
scores (pgkd.calibration). A policy file, when given, is read again whenever it changes, so an
operator moves the threshold while the cascade serves, without a new model version.

The deferred texts of a batch go to the teacher together, in prompts of `max_per_call` texts, at
most `concurrency` at a time, within `timeout` seconds. A teacher that is slow, down, refuses, or
answers something outside the taxonomy never fails a text: the student's answer is returned, and
`fallback` says why. Each teacher label goes to `sink` (the stream's input topic, as a label with
source "teacher"), which must never block.

This module knows nothing of Triton or Kafka: pgkd.serving.cascade_server serves it over KServe v2
(HTTP and gRPC), pgkd_services.cascade publishes the labels.
"""
from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pgkd.calibration import FILE as CALIBRATION_FILE, Calibration
from pgkd.errors import Option, UserError, invalid
from pgkd.types import ClassificationRequest, Sample, TeacherUnavailable

log = logging.getLogger("pgkd.cascade")

STUDENT, TEACHER, ERROR = "student", "teacher", "error"     # who answered a text (`answered_by`)
# Why the student's answer stands for a deferred text (`fallback`); "" when nothing failed.
FALLBACKS = ("teacher_timeout", "teacher_unavailable", "teacher_error", "out_of_taxonomy")
POLICY_CHECK_SECONDS = 1.0    # how often a policy file is looked at (its mtime)
POLICY_MAX_BYTES = 65_536     # a policy file is a few bytes of JSON
WARN_SECONDS = 10.0           # a failing teacher is logged at most this often


class Policy(BaseModel):
    """What decides the threshold: one of the three, or none (the threshold the served student's run
    recorded with it)."""
    model_config = ConfigDict(extra="forbid", strict=True)    # `true` or "0.7" is not a threshold
    threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    target_accuracy: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_teacher_share: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one(self) -> "Policy":
        given = [k for k in ("threshold", "target_accuracy", "max_teacher_share") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of threshold, target_accuracy, max_teacher_share (got {', '.join(given)})")
        return self

    def resolve(self, calibration: Calibration | None) -> tuple[float, str, float]:
        """The threshold, what it was chosen for, and the share of texts the teacher may answer (what the
        alert compares with): the policy's max teacher share, else the held texts' share at the threshold,
        1 for a bare threshold. A target needs the held scores; one they
        cannot meet is a UserError naming what they can."""
        if self.threshold is not None:
            return self.threshold, f"threshold {self.threshold:g}", 1.0
        if self.target_accuracy is None and self.max_teacher_share is None:
            if calibration is None or calibration.deferral is None:
                raise UserError("no threshold: the student was calibrated without a target; give --threshold, "
                                "--target-accuracy or --max-teacher-share")
            deferral, described = calibration.deferral, f"the run's {calibration.deferral.target}"
        else:
            if calibration is None or not calibration.confidence:
                raise UserError("a target needs the student's calibration (its held scores): give --calibration")
            deferral = calibration.threshold_for(self.target_accuracy, self.max_teacher_share)
            described = deferral.target
        share = self.max_teacher_share if self.max_teacher_share is not None else 1 - deferral.student_share
        return deferral.threshold, described, round(share, 6)


def _in(file: Path):
    """A namer for pgkd.errors.invalid: the file, and the key when there is one."""
    return lambda loc, value: str(file) + (f": {'.'.join(map(str, loc))}" if loc else "")


def read_calibration_path(path: str | Path) -> Calibration:
    """A student's calibration: its pgkd-calibration.json, or a folder holding one (best/, an exported version)."""
    path = Path(path)
    file = path / CALIBRATION_FILE if path.is_dir() else path
    try:
        return Calibration.model_validate_json(file.read_bytes())
    except OSError as e:
        raise UserError(f"{file}: cannot read the calibration ({e.strerror or e})") from None
    except ValidationError as e:
        raise invalid(e, _in(file), limit=2) from None


class ServedCalibration:
    """The calibration of the student version that answers. `path` is a calibration file or a version's
    folder (fixed), or the model's folder in the repository the student is served from (`models/student`):
    then each version's own calibration is read when a response first comes from that version, so a
    promoted student brings its labels and its threshold with it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.follows = self.path.is_dir() and not (self.path / CALIBRATION_FILE).is_file()
        self.version: str | None = None
        if self.follows:
            versions = sorted(int(p.name) for p in self.path.iterdir()
                              if p.name.isdigit() and (p / CALIBRATION_FILE).is_file())
            if not versions:
                raise UserError(f"{self.path}: neither a calibration ({CALIBRATION_FILE}) nor a model folder with "
                                "a version that has one")
            self.version = str(versions[-1])
            self.current = read_calibration_path(self.path / self.version)
        else:
            self.current = read_calibration_path(self.path)

    def for_version(self, version: str) -> Calibration | None:
        """`version`'s calibration when the answering version changed, else None."""
        if not self.follows or not version or version == self.version:
            return None
        if not version.isdigit():      # a server's word, made a path: a version number, or nothing
            log.warning("cascade: the student answered as version %r, not a version number", version[:40])
            return None
        self.version = version           # read once a version, whatever comes of it
        try:
            self.current = read_calibration_path(self.path / version)
        except UserError as e:
            log.warning("cascade: version %s of the student: %s; its answers are routed with the calibration "
                        "of the version before", version, e)
            return None
        return self.current


def read_policy_file(path: str | Path) -> Policy:
    """The policy in a regular file of at most POLICY_MAX_BYTES: opened without blocking, so a FIFO or a
    device named there is refused instead of waited on."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UserError(f"{path}: the cascade's policy must be a regular file")
            raw = f.read(POLICY_MAX_BYTES + 1)
        if len(raw) > POLICY_MAX_BYTES:
            raise UserError(f"{path}: the cascade's policy is over {POLICY_MAX_BYTES:,} bytes")
        data = json.loads(raw)
    except OSError as e:
        raise UserError(f"{path}: cannot read the cascade's policy ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise invalid(e, _in(path), limit=2) from None


class PolicySource:
    """The threshold in force: the starting policy's, then the policy file's whenever the file changes.
    A file that becomes unreadable or names an unmeetable target keeps the last good threshold (logged,
    counted in `errors`). `watch()` looks at the file every POLICY_CHECK_SECONDS in a thread of its own:
    a request reads the threshold and never waits on the file."""

    def __init__(self, policy: Policy, calibration: Calibration | None = None, file: str | Path | None = None,
                 on_change: Callable[[float, float], None] | None = None):
        self.calibration, self.file, self.on_change = calibration, Path(file) if file else None, on_change
        self._lock, self._mtime, self.errors, self._stop = threading.Lock(), None, 0, threading.Event()
        if self.file is not None and self.file.exists():
            policy = read_policy_file(self.file)
            self._mtime = self.file.stat().st_mtime_ns
        self._set(policy)

    def _set(self, policy: Policy) -> None:
        threshold, described, share = policy.resolve(self.calibration)
        self.policy, self.threshold, self.described = policy, threshold, described
        if self.on_change is not None:
            self.on_change(threshold, share)

    def recalibrate(self, calibration: Calibration) -> None:
        """A new student's calibration: the policy's threshold again, on its held scores."""
        with self._lock:
            before = self.calibration
            self.calibration = calibration
            try:
                self._set(self.policy)
                log.info("cascade: a new student: threshold %.4f (%s)", self.threshold, self.described)
            except UserError as e:
                self.calibration, self.errors = before, self.errors + 1
                log.warning("cascade: a new student: %s; the threshold stays %.4f", e, self.threshold)

    def current(self) -> float:
        return self.threshold

    def check(self) -> None:
        """The policy file again if it changed (its mtime)."""
        if self.file is None:
            return
        with self._lock:
            try:
                mtime = self.file.stat().st_mtime_ns
            except OSError:
                mtime = self._mtime     # a file being replaced: the threshold stays
            if mtime != self._mtime:
                self._mtime = mtime
                try:
                    self._set(read_policy_file(self.file))
                    log.info("cascade: policy from %s: threshold %.4f (%s)", self.file, self.threshold,
                             self.described)
                except UserError as e:
                    self.errors += 1
                    log.warning("cascade: %s; the threshold stays %.4f", e, self.threshold)

    def watch(self) -> PolicySource:
        """Check the policy file every POLICY_CHECK_SECONDS until `close()`, in a daemon thread."""
        def loop():
            while not self._stop.wait(POLICY_CHECK_SECONDS):
                self.check()
        if self.file is not None:
            threading.Thread(target=loop, name="pgkd-policy-file", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()


class UnparseableAnswer(Exception):
    """The teacher answered, with no list of labels in its answer (fallback teacher_error)."""


@dataclass
class Answer:
    label: str
    answered_by: str             # student | teacher | error
    confidence: float            # the student's calibrated probability of its own label
    student_label: str
    teacher_label: str = ""      # "" when the teacher was not asked or gave no label of the taxonomy
    fallback: str = ""           # one of FALLBACKS when the teacher was asked and the student's answer stands
    error: str = ""              # what is wrong with the text (answered_by "error")


@dataclass
class TeacherLabel:
    """A deferred text and the label the teacher gave it: a label for the stream (source "teacher")."""
    text: str
    label: str
    model: str


class Cascade:
    """Routes a batch of texts with the student's probabilities; asks the teacher for the rest.

    `teacher` makes a teacher client for one thread (each worker thread asks with its own: an LLM
    client's connections are not shared across threads): an object with `classify(request) ->
    (labels, usage)` and `name`, as pgkd.teachers.llm.LLMTeacher."""

    def __init__(self, labels: list[str], teacher: Callable[[], object], policy: PolicySource, timeout: float = 5.0,
                 concurrency: int = 4, max_per_call: int = 16, descriptions: dict[str, str] | None = None,
                 examples: list[Sample] | None = None, sink: Callable[[list[TeacherLabel]], None] | None = None,
                 metrics: "CascadeMetrics | None" = None):
        self.labels, self.policy, self.timeout, self.max_per_call = list(labels), policy, timeout, max_per_call
        self.descriptions, self.examples = descriptions or {}, examples or []
        self.sink, self.metrics = sink, metrics
        self._make_teacher, self._local = teacher, threading.local()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cascade-teacher")
        self._warned_lock, self._warned, self._failures = threading.Lock(), float("-inf"), 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _warn(self, message: str) -> None:
        """At most one line every WARN_SECONDS (a dead teacher fails every deferred batch): how many since."""
        with self._warned_lock:
            self._failures += 1
            if time.monotonic() - self._warned < WARN_SECONDS:
                return
            count, self._failures, self._warned = self._failures, 0, time.monotonic()
        log.warning("cascade: %s%s; the student's answers stand", message,
                    f" ({count} failed calls since the last warning)" if count > 1 else "")

    def _teacher(self):
        if getattr(self._local, "teacher", None) is None:
            self._local.teacher = self._make_teacher()
        return self._local.teacher

    def _ask(self, texts: list[str]):
        teacher = self._teacher()
        began = time.perf_counter()
        labels, usage = teacher.classify(ClassificationRequest(taxonomy=self.labels, texts=texts,
                                                               descriptions=self.descriptions,
                                                               examples=self.examples))
        if self.metrics is not None:
            self.metrics.teacher_call(time.perf_counter() - began, usage)
        if usage.errors.get("unparseable_answer"):    # garbage, not a label outside the taxonomy
            raise UnparseableAnswer("its answer held no list of labels")
        return labels, getattr(teacher, "name", "teacher")

    def answer(self, texts: list[str], labels: list[str], confidence: list[float]) -> list[Answer]:
        """Each text's answer: the student's (its `labels`, with their calibrated `confidence`) where the
        confidence reaches the threshold, else the teacher's."""
        threshold = self.policy.current()
        answers = [Answer(label=label, answered_by=STUDENT, confidence=float(c), student_label=label)
                   for label, c in zip(labels, confidence, strict=True)]
        deferred = [i for i, a in enumerate(answers) if a.confidence < threshold]
        if deferred:
            self._defer(texts, answers, deferred)
        if self.metrics is not None:
            self.metrics.answered(answers)
        return answers

    def _defer(self, texts: list[str], answers: list[Answer], deferred: list[int]) -> None:
        chunks = [deferred[i:i + self.max_per_call] for i in range(0, len(deferred), self.max_per_call)]
        futures = {self._pool.submit(self._ask, [texts[i] for i in chunk]): chunk for chunk in chunks}
        done, late = wait(futures, timeout=self.timeout)
        labels_out: list[TeacherLabel] = []
        for future, chunk in futures.items():
            if future in late:
                future.cancel()            # not started: never sent; started: its answer is dropped
                reason, labels, model = "teacher_timeout", None, ""
            else:
                try:
                    labels, model = future.result()
                    reason = ""
                except TeacherUnavailable as e:
                    reason, labels, model = "teacher_unavailable", None, ""
                    self._warn(f"the teacher is unavailable: {e}")
                except Exception as e:  # noqa: BLE001 -- whatever the teacher did, the student's answer stands
                    reason, labels, model = "teacher_error", None, ""
                    self._warn(f"the teacher failed: {type(e).__name__}: {str(e)[:200]}")
            for n, i in enumerate(chunk):
                label = labels[n] if labels is not None and n < len(labels) else None
                if label is None or label not in self.labels:
                    answers[i].fallback = reason or "out_of_taxonomy"
                    continue
                answers[i].label, answers[i].answered_by, answers[i].teacher_label = label, TEACHER, label
                labels_out.append(TeacherLabel(text=texts[i], label=label, model=model))
        if labels_out and self.sink is not None:
            self.sink(labels_out)


class CascadeMetrics:
    """What operators watch (Prometheus): who answered, the teacher's calls, latency, tokens and cost,
    the fallbacks, how often the teacher disagreed with the student on deferred texts (a drift
    signal), the threshold in force and the teacher share it aims at, the labels sent to the stream."""

    def __init__(self, registry=None, price_prompt_per_1k: float = 0.0, price_completion_per_1k: float = 0.0):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        r = {"registry": registry if registry is not None else REGISTRY}
        self.prices = (price_prompt_per_1k, price_completion_per_1k)
        self.texts = Counter("pgkd_cascade_texts", "Texts answered, by who answered (student, teacher; error: a "
                             "text refused)", ["answered_by"], **r)
        self.deferred = Counter("pgkd_cascade_deferred", "Texts below the threshold, sent to the teacher", **r)
        self.fallbacks = Counter("pgkd_cascade_fallbacks", "Deferred texts answered by the student after all, by "
                                 "reason", ["reason"], **r)
        self.disagreements = Counter("pgkd_cascade_disagreements", "Deferred texts the teacher labeled otherwise "
                                     "than the student", **r)
        self.teacher_calls = Counter("pgkd_cascade_teacher_calls", "Classification prompts the teacher answered", **r)
        self.teacher_latency = Histogram("pgkd_cascade_teacher_latency_seconds", "Round trip of one teacher call",
                                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), **r)
        self.teacher_tokens = Counter("pgkd_cascade_teacher_tokens", "Teacher tokens, by kind", ["kind"], **r)
        self.teacher_cost = Counter("pgkd_cascade_teacher_cost", "Teacher cost, from the configured prices", **r)
        self.request_latency = Histogram("pgkd_cascade_request_latency_seconds", "A batch of texts, student and "
                                         "teacher", buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
                                         **r)
        self.threshold = Gauge("pgkd_cascade_threshold", "The confidence threshold in force", **r)
        self.teacher_share_target = Gauge("pgkd_cascade_teacher_share_target", "The share of texts the teacher should "
                                          "answer at the threshold, on the held texts (1 for a bare threshold)", **r)
        self.labels = Counter("pgkd_cascade_labels", "Teacher labels for the stream, by outcome (published, "
                              "dropped: the buffer was full)", ["outcome"], **r)
        self.labels_waiting = Gauge("pgkd_cascade_labels_waiting", "Teacher labels waiting for the broker (the "
                                    "buffer and the batch being sent)", **r)
        for who in (STUDENT, TEACHER, ERROR):
            self.texts.labels(who)
        for reason in FALLBACKS:
            self.fallbacks.labels(reason)
        for kind in ("prompt", "completion"):
            self.teacher_tokens.labels(kind)
        for outcome in ("published", "dropped"):
            self.labels.labels(outcome)

    def policy_changed(self, threshold: float, share: float) -> None:
        self.threshold.set(threshold)
        self.teacher_share_target.set(share)

    def teacher_call(self, seconds: float, usage) -> None:
        self.teacher_calls.inc()
        self.teacher_latency.observe(seconds)
        self.teacher_tokens.labels("prompt").inc(usage.prompt_tokens)
        self.teacher_tokens.labels("completion").inc(usage.completion_tokens)
        self.teacher_cost.inc(usage.prompt_tokens / 1000 * self.prices[0] + usage.completion_tokens / 1000 * self.prices[1])

    def answered(self, answers: list[Answer]) -> None:
        for a in answers:
            self.texts.labels(a.answered_by).inc()
            if a.answered_by == TEACHER or a.fallback:
                self.deferred.inc()
            if a.fallback:
                self.fallbacks.labels(a.fallback).inc()
            if a.answered_by == TEACHER and a.teacher_label != a.student_label:
                self.disagreements.inc()


def prompt_parts(labels: list[str], taxonomy: str | None = None, data: str | None = None, per_class: int = 2,
                 seed: int = 1) -> tuple[dict[str, str], list[Sample]]:
    """The classification prompt's descriptions (a taxonomy file's) and labeled examples (the taxonomy's,
    and `per_class` of each label from `data`'s train split, a seeded draw)."""
    import random

    from pgkd.data import load_dataset
    from pgkd.taxonomy import read_taxonomy
    descriptions, examples = {}, []
    if taxonomy:
        read = read_taxonomy(taxonomy)
        read.check_against(labels, "the student's labels")
        descriptions = read.descriptions
        examples = [Sample(text=t, label=c.label) for c in read.classes for t in c.examples]
    if data and per_class:
        rng, by_label = random.Random(seed), {}
        for sample in load_dataset(data, seed=seed).train:
            by_label.setdefault(sample.label, []).append(sample)
        if not by_label.keys() & set(labels):     # another dataset: the prompt would show no example at all
            raise UserError(Option("data", data), f": its train split holds none of the student's {len(labels)} "
                            f"labels ({', '.join(labels[:3])}, ...): the data the student was distilled from?")
        for label in labels:
            pool = by_label.get(label, [])
            examples += rng.sample(pool, min(per_class, len(pool)))
    return descriptions, examples
