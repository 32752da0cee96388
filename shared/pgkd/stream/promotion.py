"""Promotion: does a stream run's student replace the current one? A pure comparison of the two
students' scores on the same validation set; only a strictly better score replaces (a tie keeps the
current student)."""
from __future__ import annotations

import hashlib

import numpy as np

from pgkd.types import EvalReport, Sample
from pgkd.loop.evaluation import evaluate
from pgkd.stream.state import PromotionDecision


def score(student, samples: list[Sample], labels: list[str]) -> EvalReport:
    """An EvalReport over `labels`, for a student that may know fewer of them (those it does not
    know it can only get wrong)."""
    probs = student.predict_proba([s.text for s in samples])
    full = np.zeros((len(samples), len(labels)), dtype=np.float32)
    index = {label: i for i, label in enumerate(labels)}
    for j, label in enumerate(student.labels):
        full[:, index[label]] = probs[:, j]
    return evaluate([s.label for s in samples], full, labels)


def compare(run_id: str, new: EvalReport, current: EvalReport, metric: str, current_run: str,
            validation: list[Sample]) -> PromotionDecision:
    """The decision from the two reports: `new` replaces `current` only if it scores better on `metric`."""
    lower_is_better = metric == "loss"
    better = new.metric(metric) < current.metric(metric) if lower_is_better else \
        new.metric(metric) > current.metric(metric)
    digest = hashlib.sha256("".join(s.model_dump_json() + "\n" for s in validation).encode()).hexdigest()
    verdict = "replaces" if better else "does not beat"
    return PromotionDecision(run_id=run_id, replaced=better, metric=metric, new_score=new.metric(metric),
                             current_score=current.metric(metric), new_accuracy=new.accuracy,
                             current_accuracy=current.accuracy, current_run=current_run,
                             validation_size=len(validation), validation_sha256=digest,
                             reason=f"validation {metric} {new.metric(metric):.4f} {verdict} the current student's "
                                    f"{current.metric(metric):.4f} (run {current_run}, {len(validation)} "
                                    "validation samples)")
