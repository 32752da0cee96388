"""The per-class validation report: what the student gets right and wrong, in numbers."""
from __future__ import annotations

import numpy as np

from pgkd.students.contract import log_loss
from pgkd.types import ClassScores, Confusion, EvalReport


TOP_CONFUSIONS = 10    # the most confused pairs a report lists


def evaluate(targets: list[str], probs: np.ndarray, labels: list[str], top_confusions: int = TOP_CONFUSIONS) -> EvalReport:
    """Score predicted probabilities against true labels.

    Macro averages run over the classes the split holds (support > 0): a 200-sample validation set
    of a 150-class taxonomy lacks some classes, and they say nothing about the student."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support   # a second to import
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[t] for t in targets])
    y_pred = probs.argmax(axis=1)
    all_ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=all_ids, zero_division=0)
    present = s > 0
    weights = s / s.sum()
    loss = log_loss(probs, y_true)
    matrix = confusion_matrix(y_true, y_pred, labels=all_ids)
    np.fill_diagonal(matrix, 0)
    pairs = np.argwhere(matrix > 0)
    ranked = sorted(pairs.tolist(), key=lambda ij: (-matrix[ij[0], ij[1]], ij[0], ij[1]))[:top_confusions]
    return EvalReport(
        accuracy=float((y_true == y_pred).mean()),
        macro_precision=float(p[present].mean()), macro_recall=float(r[present].mean()),
        macro_f1=float(f[present].mean()),
        weighted_precision=float((p * weights).sum()), weighted_recall=float((r * weights).sum()),
        weighted_f1=float((f * weights).sum()),
        loss=loss, samples=len(y_true),
        per_class={labels[i]: ClassScores(precision=float(p[i]), recall=float(r[i]), f1=float(f[i]),
                                          support=int(s[i])) for i in all_ids},
        confusions=[Confusion(true=labels[i], predicted=labels[j], count=int(matrix[i, j])) for i, j in ranked],
    )
