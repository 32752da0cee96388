"""Confidence that means what it says: temperature scaling, its error, and the deferral threshold.

A student's probabilities p become softmax(log p / T): one number T (Guo et al., 2017), fit by the
negative log-likelihood of held scores, which leaves the student's answers as they were and makes a
"0.9" right about 9 times in 10. The threshold of the cascade (the student answers a text when its
calibrated confidence is at least the threshold, the LLM answers the rest) is picked on the same scores
from what the user states: an accuracy the student's answers must hold (`target_accuracy`), or the
share of traffic the LLM may see (`max_teacher_share`).

The scores are the caller's to choose, and must be ones neither the teacher nor the threshold's user
has seen: pgkd uses the validation texts the teacher was never shown (pgkd.loop.cycle.calibrate).
Numpy only, so a server can use it too.
"""
from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, Field

from pgkd.errors import UserError

TEMPERATURE_RANGE = (0.05, 20.0)   # T outside it is a sign of degenerate scores, not of a calibration
ECE_BINS = 15                      # equal-width confidence bins, as Guo et al. report it
MIN_SAMPLES = 30                   # fewer held scores than this: no calibration is fit (T stays 1)
# A target accuracy is held when the Wilson lower bound of the student's answers' accuracy reaches it, at this
# one-sided confidence: the threshold that merely looks best on a few hundred held texts is too loose (the most
# permissive of many noisy estimates; on banking77 the point estimate promised 0.940 and test gave 0.917).
CONFIDENCE_LEVEL = 0.9
FILE = "pgkd-calibration.json"     # where a saved student keeps its Calibration


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), row by row: T > 1 softens, T < 1 sharpens; the argmax never changes."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return probs.astype(np.float32)
    logits = np.log(np.clip(probs, 1e-12, None)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-np.mean(np.log(np.clip(np.asarray(probs)[np.arange(len(targets)), targets], 1e-12, None))))


def fit_temperature(probs: np.ndarray, targets: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE that minimises the NLL of `targets` under scaled(probs, T)."""
    from scipy.optimize import minimize_scalar
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: nll(scaled(probs, math.exp(log_t)), targets), bounds=(low, high),
                            method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


class Bin(BaseModel):
    """One bin of a reliability diagram: the texts whose confidence is in [lower, upper)."""
    lower: float
    upper: float
    samples: int
    confidence: float | None = None    # their mean confidence
    accuracy: float | None = None      # how many of them the student got right


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> list[Bin]:
    probs = np.asarray(probs)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        out.append(Bin(lower=float(edges[b]), upper=float(edges[b + 1]), samples=n,
                       confidence=float(confidence[inside].mean()) if n else None,
                       accuracy=float(correct[inside].mean()) if n else None))
    return out


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """The samples-weighted mean gap between confidence and accuracy over equal-width bins."""
    total = len(targets)
    return float(sum(b.samples / total * abs(b.confidence - b.accuracy) for b in reliability(probs, targets, bins)
                     if b.samples))


def accuracy_lower_bound(right, answered, level: float = CONFIDENCE_LEVEL):
    """The Wilson score interval's lower end of right / answered, one-sided at `level` (arrays or numbers)."""
    from statistics import NormalDist
    z = NormalDist().inv_cdf(level)
    n = np.asarray(answered, dtype=np.float64)
    p = np.asarray(right, dtype=np.float64) / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


class Deferral(BaseModel):
    """The cascade's policy: the student answers a text when its calibrated confidence is at least
    `threshold`; the LLM answers the rest. `student_share` and `student_accuracy` are what the held
    scores say it gives (the share of texts the student answers, and their accuracy)."""
    threshold: float = Field(ge=0, le=1)
    target: str                        # what it was chosen for, as the user said it
    student_share: float
    student_accuracy: float | None     # None when the student answers nothing
    accuracy_lower_bound: float | None = None   # what a target accuracy was held to (CONFIDENCE_LEVEL)
    samples: int                       # the held scores it was chosen on


def _answered(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct confidence c, highest first: the threshold c, how many texts the student
    answers at it (confidence >= c), and how many of those it gets right."""
    order = np.argsort(-confidence, kind="stable")
    conf, right = confidence[order], np.cumsum(correct[order])
    last = np.r_[conf[1:] != conf[:-1], True]     # the last text of each run of equal confidences
    return conf[last], np.flatnonzero(last) + 1, right[last]


def _threshold(thresholds: np.ndarray, k: int) -> float:
    """The threshold at `thresholds[k]`; where that answers every held text, 0: the student then answers
    every text, live ones less sure than any held one too (a teacher share of 0 sends the LLM nothing)."""
    return 0.0 if k == len(thresholds) - 1 else float(thresholds[k])


def target_name(target_accuracy: float | None = None, max_teacher_share: float | None = None) -> str:
    """A deferral target in words (Deferral.target)."""
    return f"target accuracy {target_accuracy:g}" if target_accuracy is not None else \
        f"max teacher share {max_teacher_share:g}"


def choose_threshold(confidence, correct, target_accuracy: float | None = None,
                     max_teacher_share: float | None = None) -> Deferral:
    """The lowest threshold (the most texts for the student) whose answers are at least
    `target_accuracy` accurate on these scores; or the highest that sends at most `max_teacher_share`
    of them to the LLM (it answers what it may, the student its surest texts). A target these scores cannot meet is a UserError naming what they can."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    n = len(confidence)
    if (target_accuracy is None) == (max_teacher_share is None):
        raise ValueError("give one of target_accuracy and max_teacher_share")
    if n == 0:
        raise UserError("no held scores to choose a threshold on")
    for name, value in (("target accuracy", target_accuracy), ("teacher share", max_teacher_share)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            raise UserError(f"{name} {value}: expected a number in [0, 1]")
    thresholds, answered, right = _answered(confidence, correct)
    accuracy = right / answered
    if max_teacher_share is not None:
        if max_teacher_share >= 1:     # the LLM may answer everything: the student only what it is sure of
            return Deferral(threshold=1.0, target=target_name(max_teacher_share=max_teacher_share),
                            student_share=float((confidence >= 1.0).mean()), student_accuracy=None, samples=n)
        k = np.flatnonzero(answered >= n * (1 - max_teacher_share) - 1e-9)[0]   # the last always fits
        return Deferral(threshold=_threshold(thresholds, k), target=target_name(max_teacher_share=max_teacher_share),
                        student_share=float(answered[k] / n), student_accuracy=float(accuracy[k]), samples=n)
    bound = accuracy_lower_bound(right, answered)
    meets = np.flatnonzero(bound >= target_accuracy - 1e-12)
    if not len(meets):
        best = int(np.argmax(bound))
        raise UserError(
            f"target accuracy {target_accuracy:g} cannot be met: on {n} held scores the student's answers are at "
            f"most {bound[best]:.4f} accurate at {CONFIDENCE_LEVEL:.0%} confidence (at {answered[best] / n:.1%} of "
            f"texts); achievable: a target up to {bound[best]:.4f}, or --max-teacher-share")
    k = meets[-1]
    return Deferral(threshold=_threshold(thresholds, k), target=target_name(target_accuracy),
                    student_share=float(answered[k] / n), student_accuracy=float(accuracy[k]),
                    accuracy_lower_bound=round(float(bound[k]), 6), samples=n)


class Calibration(BaseModel):
    """What a student's probabilities are scaled by, what that did on the held scores, the deferral
    threshold when one was asked for, and the held scores themselves (each text's calibrated confidence
    and whether the student was right), so a threshold can be chosen again for another target."""
    temperature: float = Field(1.0, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])   # as fit_temperature finds it
    labels: list[str] = []              # the student's, in the order of its probabilities
    source: str                         # which scores, in words
    samples: int
    shown_to_teacher: int = 0           # of them, the texts a request showed the teacher (no threshold then)
    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    reliability_before: list[Bin] = []
    reliability_after: list[Bin] = []
    deferral: Deferral | None = None
    deferral_problem: str | None = None   # the target asked for, and why these scores cannot meet it
    confidence: list[float] = []        # the held scores, calibrated
    correct: list[bool] = []

    def threshold_for(self, target_accuracy: float | None = None, max_teacher_share: float | None = None) -> Deferral:
        """The threshold for a target, on the held scores; refused on scores the teacher was shown, which
        flatter the student exactly where the threshold is drawn."""
        if self.shown_to_teacher:
            raise UserError(f"a threshold needs scores the teacher never saw: the teacher was shown {self.shown_to_teacher} "
                            f"of these {self.samples} validation texts (a run guided by validation; "
                            "--guidance-source out-of-fold keeps validation unseen), or give --threshold")
        return choose_threshold(self.confidence, self.correct, target_accuracy, max_teacher_share)

    def record(self) -> dict:
        """What report.json keeps: all but the held scores (the student's folder keeps those)."""
        return self.model_dump(mode="json", exclude={"confidence", "correct", "labels"})


def calibrate(probs: np.ndarray, targets: np.ndarray, source: str, target_accuracy: float | None = None,
              max_teacher_share: float | None = None, labels: list[str] = (), shown_to_teacher: int = 0) -> Calibration:
    """Fit T on the held scores (`probs`, one row per text; `targets`, the true classes), record its
    effect, and choose the threshold when a target is given. Too few scores: T stays 1, said in `source`."""
    probs, targets = np.asarray(probs), np.asarray(targets, dtype=np.int64)
    n = len(targets)
    if n < MIN_SAMPLES:
        temperature, source = 1.0, f"{source}: too few ({n} < {MIN_SAMPLES}) to fit a temperature"
    else:
        temperature = fit_temperature(probs, targets)
    after = scaled(probs, temperature)
    confidence, correct = after.max(axis=1), after.argmax(axis=1) == targets
    record = Calibration(temperature=round(temperature, 6), labels=list(labels), source=source, samples=n,
                         shown_to_teacher=shown_to_teacher,
                         confidence=[round(float(c), 6) for c in confidence], correct=[bool(c) for c in correct])
    if n:
        record = record.model_copy(update=dict(
            ece_before=expected_calibration_error(probs, targets), ece_after=expected_calibration_error(after, targets),
            nll_before=nll(probs, targets), nll_after=nll(after, targets),
            reliability_before=reliability(probs, targets), reliability_after=reliability(after, targets)))
    if target_accuracy is not None or max_teacher_share is not None:
        try:
            record = record.model_copy(update={"deferral": record.threshold_for(target_accuracy, max_teacher_share)})
        except UserError as e:      # the run's work stands; the caller says so after writing it
            record = record.model_copy(update={"deferral_problem": str(e)})
    return record
