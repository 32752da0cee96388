"""Mining the student's mistakes: hard negatives, other misclassified samples, and correct ones."""
from __future__ import annotations

import random

import numpy as np

from pgkd.types import MinedSample, MiningResult, Sample


def mine(samples: list[Sample], probs: np.ndarray, labels: list[str], hard_negatives: int = 16,
         misclassified: int = 16, correct: int = 16, seed: int = 0) -> MiningResult:
    """Hard negatives are the misclassified samples the student was most sure of (highest
    probability on the wrong class); `misclassified` and `correct` are seeded random draws of
    the other wrong ones and of the right ones, so the teacher sees both sides."""
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    mined = [MinedSample(text=s.text, label=s.label, predicted=labels[p], confidence=round(float(c), 4))
             for s, p, c in zip(samples, predicted, confidence)]
    wrong = [m for m in mined if m.predicted != m.label]
    right = [m for m in mined if m.predicted == m.label]
    wrong.sort(key=lambda m: -m.confidence)  # stable: ties keep data order
    hard, rest = wrong[:hard_negatives], wrong[hard_negatives:]
    rng = random.Random(seed)
    return MiningResult(hard_negatives=hard,
                        misclassified=rng.sample(rest, min(misclassified, len(rest))),
                        correct=rng.sample(right, min(correct, len(right))))
