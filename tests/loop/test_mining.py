import numpy as np
from pgkd.types import Sample
from pgkd.loop.mining import mine


def _case():
    labels = ["a", "b"]
    samples = [Sample(text=f"t{i}", label="a") for i in range(6)]
    # t0..t3 predicted "b" with rising confidence, t4 and t5 right.
    probs = np.array([[0.4, 0.6], [0.3, 0.7], [0.1, 0.9], [0.2, 0.8], [0.9, 0.1], [0.8, 0.2]])
    return samples, probs, labels


def test_hard_negatives_are_the_most_confident_mistakes():
    samples, probs, labels = _case()
    m = mine(samples, probs, labels, hard_negatives=2, misclassified=5, correct=5)
    assert [h.text for h in m.hard_negatives] == ["t2", "t3"]
    assert all(h.predicted == "b" and h.label == "a" for h in m.hard_negatives)
    assert m.hard_negatives[0].confidence == 0.9
    assert {x.text for x in m.misclassified} == {"t0", "t1"}      # the other mistakes, no overlap
    assert {x.text for x in m.correct} == {"t4", "t5"}


def test_counts_are_caps_and_draws_are_seeded():
    samples, probs, labels = _case()
    a = mine(samples, probs, labels, hard_negatives=1, misclassified=1, correct=1, seed=7)
    b = mine(samples, probs, labels, hard_negatives=1, misclassified=1, correct=1, seed=7)
    assert a == b and len(a.hard_negatives) == len(a.misclassified) == len(a.correct) == 1
    none = mine(samples, probs, labels, hard_negatives=0, misclassified=0, correct=0)
    assert not none.hard_negatives and not none.misclassified and not none.correct
