"""What the teacher is shown of the student, and from which samples.

`validation` (the method as first written): the student's report on the validation split and the
mistakes mined from it. Two flaws: 200 validation samples over 150 classes score each class on 1.3
samples, so the report steers by noise; and the same split then picks the best cycle, after the
teacher was aimed at its mistakes, so the kept student's validation score flatters it.

`out-of-fold`: the labeled train samples are cut into k folds; for each, a student of the same
recipe trains on the other folds (plus every teacher sample so far) and predicts the held-out one.
The report and the mined samples come from these predictions over all labeled train samples (800
where validation has 200), and the validation split becomes a selection split the teacher never
sees: its scores pick the best cycle and stop the run without bias from the guidance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from pgkd.types import EvalReport, Sample
from pgkd.loop.evaluation import evaluate

SOURCES = ("out-of-fold", "validation")


@dataclass
class Guidance:
    report: EvalReport       # the per-class report the teacher is shown
    samples: list[Sample]    # the samples the student's mistakes are mined from
    probs: np.ndarray        # the predictions on them: held out from the student that made each


def fold_of(samples: list[Sample], folds: int, seed: int) -> list[int]:
    """A fold per sample, stratified: each class's samples, in a seeded order, dealt round the folds,
    the deal continuing from class to class so that small classes spread over different folds."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    assigned = [0] * len(samples)
    dealt = 0
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        for i in members:
            assigned[i] = dealt % folds
            dealt += 1
    return assigned


def out_of_fold_probs(labeled: list[Sample], added: list[Sample], validation: list[Sample], folds: int,
                      seed: int, make_student, train_config) -> np.ndarray:
    """Each labeled sample's probabilities from a student that never trained on it. `make_student(k)`
    gives fold k's fresh student; it trains on the other folds plus `added` (the teacher's samples),
    early-stopped on `validation` as the run's own rounds are."""
    assigned = fold_of(labeled, folds, seed)
    probs = None
    for k in range(folds):
        held_out = [i for i, f in enumerate(assigned) if f == k]
        if not held_out:
            continue
        student = make_student(k)
        student.train([s for s, f in zip(labeled, assigned) if f != k] + added, validation, train_config,
                      progress=False, description=f"fold {k + 1}/{folds}")
        fold_probs = np.asarray(student.predict_proba([labeled[i].text for i in held_out]))
        if probs is None:
            probs = np.zeros((len(labeled), fold_probs.shape[1]), dtype=np.float32)
        probs[held_out] = fold_probs
    return probs


def validation_guidance(validation: list[Sample], report: EvalReport, probs: np.ndarray) -> Guidance:
    return Guidance(report=report, samples=validation, probs=probs)


def out_of_fold_guidance(labeled: list[Sample], added: list[Sample], validation: list[Sample], labels: list[str],
                         folds: int, seed: int, make_student, train_config) -> Guidance:
    probs = out_of_fold_probs(labeled, added, validation, folds, seed, make_student, train_config)
    return Guidance(report=evaluate([s.label for s in labeled], probs, labels), samples=labeled, probs=probs)
