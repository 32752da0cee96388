"""Promotion: does a stream run's student replace the current one? A pure comparison of the two
students on the same validation set (human labels only, never the teacher's); a tie keeps the current
student.

Two criteria, by what the student is served for:
- the metric (`--metric`, macro-F1 by default): the new student replaces the current one only if it
  scores strictly better;
- a cascade target (the runs' --target-accuracy or --max-teacher-share): what the cascade needs is not
  the best student alone but the one that answers the most traffic at the target. Each student is
  calibrated on the validation texts and its threshold chosen there for the target, as a run does on its
  held texts (pgkd.calibration); the new student replaces the current one when it answers a larger share
  of them at a target accuracy, or when its answers are more accurate at a most-share-to-the-LLM target.
  When the two are equal the metric decides. (BENCHMARKS.md, "The cascade": promoted on macro-F1, a
  student that answers less at the target went on serving a cascade.)"""
from __future__ import annotations

import hashlib

import numpy as np

from pgkd.calibration import Deferral, calibrate, target_name
from pgkd.types import EvalReport, Sample
from pgkd.loop.evaluation import evaluate
from pgkd.stream.state import PromotionDecision


def _probabilities(student, samples: list[Sample], labels: list[str]) -> np.ndarray:
    """The student's probabilities over `labels` (those it does not know it can only get wrong)."""
    probs = student.predict_proba([s.text for s in samples])
    full = np.zeros((len(samples), len(labels)), dtype=np.float32)
    index = {label: i for i, label in enumerate(labels)}
    for j, label in enumerate(student.labels):
        full[:, index[label]] = probs[:, j]
    return full


def score(student, samples: list[Sample], labels: list[str]) -> EvalReport:
    """An EvalReport over `labels`, for a student that may know fewer of them."""
    return evaluate([s.label for s in samples], _probabilities(student, samples, labels), labels)


def cascade_score(student, samples: list[Sample], labels: list[str], target_accuracy: float | None = None,
                  max_teacher_share: float | None = None) -> Deferral | None:
    """The student as a cascade would serve it, judged on `samples`: calibrated there and its threshold
    chosen there for the target (the share of texts it answers, their accuracy); None when these texts
    cannot meet the target (it would answer nothing)."""
    index = {label: i for i, label in enumerate(labels)}
    calibration = calibrate(_probabilities(student, samples, labels), np.array([index[s.label] for s in samples]),
                            "the stream's validation texts, for the promotion", target_accuracy, max_teacher_share)
    return calibration.deferral


def _cascade_key(deferral: Deferral | None, by_share: bool) -> float:
    if deferral is None:
        return -1.0
    return deferral.student_share if by_share else (deferral.student_accuracy if deferral.student_accuracy
                                                    is not None else -1.0)


def _said(deferral: Deferral | None, by_share: bool) -> str:
    if deferral is None:
        return "cannot meet it"
    if by_share:
        return f"answers {deferral.student_share:.1%}"
    return "answers nothing" if deferral.student_accuracy is None else \
        f"is {deferral.student_accuracy:.4f} accurate on the {deferral.student_share:.1%} it answers"


def compare(run_id: str, new: EvalReport, current: EvalReport, metric: str, current_run: str,
            validation: list[Sample], cascade: tuple[Deferral | None, Deferral | None] | None = None,
            target_accuracy: float | None = None, max_teacher_share: float | None = None) -> PromotionDecision:
    """The decision from the two reports: `new` replaces `current` only if it scores better on `metric`;
    with `cascade` (each student's cascade_score for the target), only if it serves the cascade better,
    the metric deciding a tie."""
    lower_is_better = metric == "loss"
    better = new.metric(metric) < current.metric(metric) if lower_is_better else \
        new.metric(metric) > current.metric(metric)
    digest = hashlib.sha256("".join(s.model_dump_json() + "\n" for s in validation).encode()).hexdigest()
    on_metric = (f"validation {metric} {new.metric(metric):.4f} {'replaces' if better else 'does not beat'} the "
                 f"current student's {current.metric(metric):.4f}")
    extra: dict = {}
    if cascade is None:
        reason = f"{on_metric} (run {current_run}, {len(validation)} validation samples)"
    else:
        if (target_accuracy is None) == (max_teacher_share is None):
            raise ValueError("a cascade comparison needs one of target_accuracy and max_teacher_share")
        by_share, target = target_accuracy is not None, target_name(target_accuracy, max_teacher_share)
        new_key, current_key = (_cascade_key(d, by_share) for d in cascade)
        if new_key != current_key:
            better = new_key > current_key
        tie = f"; {on_metric}" if new_key == current_key else ""
        reason = (f"at the cascade's {target}, on the {len(validation)} validation texts the new student "
                  f"{_said(cascade[0], by_share)}, the current one (run {current_run}) {_said(cascade[1], by_share)}"
                  f"{tie}: it {'replaces it' if better else 'does not replace it'}")
        extra = {"criterion": "cascade", "cascade_target": target, "new_cascade": cascade[0],
                 "current_cascade": cascade[1]}
    return PromotionDecision(run_id=run_id, replaced=better, metric=metric, new_score=new.metric(metric),
                             current_score=current.metric(metric), new_accuracy=new.accuracy,
                             current_accuracy=current.accuracy, current_run=current_run,
                             validation_size=len(validation), validation_sha256=digest, reason=reason, **extra)
