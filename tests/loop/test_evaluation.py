import numpy as np
import pytest
from pgkd.loop.evaluation import evaluate


def test_scores_match_a_hand_computed_example():
    labels = ["a", "b", "c"]
    targets = ["a", "a", "b", "b"]
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    r = evaluate(targets, probs, labels)
    assert r.accuracy == pytest.approx(0.5)
    # a: P=1/2 R=1/2; b: P=1/2 R=1/2; c has no support and stays out of the macro average.
    assert r.macro_f1 == pytest.approx(0.5) and r.macro_precision == pytest.approx(0.5)
    assert r.per_class["c"].support == 0 and r.per_class["a"].support == 2
    assert r.loss == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.8, 0.3])))
    assert [(c.true, c.predicted, c.count) for c in r.confusions] == [("a", "b", 1), ("b", "a", 1)]


def test_weighted_average_follows_support():
    labels = ["a", "b"]
    targets = ["a", "a", "a", "b"]
    probs = np.array([[1.0, 0.0]] * 4)  # always "a"
    r = evaluate(targets, probs, labels)
    assert r.per_class["a"].f1 == pytest.approx(2 * 0.75 / 1.75)
    assert r.weighted_f1 == pytest.approx(0.75 * r.per_class["a"].f1)
    assert r.macro_f1 == pytest.approx(r.per_class["a"].f1 / 2)
