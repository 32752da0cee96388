from collections import Counter

import numpy as np
import pytest
from conftest import bag_of_words_embed
from pgkd.types import ClassScores, EvalReport, GenerationRequest, MinedSample, Sample
from pgkd.loop.evaluation import evaluate
from pgkd.teachers.simulated import PoolGuidedTeacher, PoolRandomTeacher, make_simulated_teacher

LABELS = ["a", "b", "c", "d"]


def _pool(per_class=30):
    return [Sample(text=f"{label} pool text number {i} " + ("zebra" if i % 10 == 0 else "plain"), label=label)
            for label in LABELS for i in range(per_class)]


def _report(weak="a"):
    """A validation report in which only `weak` is always wrong."""
    targets = [c for c in LABELS for _ in range(5)]
    probs = np.array([np.eye(4)[(LABELS.index(t) + 1) % 4 if t == weak else LABELS.index(t)] for t in targets])
    return evaluate(targets, probs, LABELS)


def _request(n=12, report=None, mistakes=()):
    return GenerationRequest(taxonomy=LABELS, examples=[], report=report, hard_negatives=list(mistakes),
                             misclassified=[], correct=[], n=n, cycle=1)


def test_random_teacher_draws_from_the_pool_and_never_repeats():
    pool = _pool()
    teacher = PoolRandomTeacher(pool, seed=0)
    first = teacher.generate(_request(n=50)).samples
    second = teacher.generate(_request(n=100)).samples
    assert len(first) == 50 and len(second) == 70           # the pool holds 120
    assert set(first).isdisjoint(second) and set(first) | set(second) == set(pool)
    assert teacher.generate(_request(n=5)).samples == []    # exhausted
    assert teacher.describe()["simulated"] is True and "simulation" in teacher.describe()["note"]


def test_guided_teacher_spends_the_budget_on_weak_classes():
    teacher = PoolGuidedTeacher(_pool(), embed=bag_of_words_embed, seed=0)
    batch = teacher.generate(_request(n=12, report=_report(weak="a")))
    counts = Counter(s.label for s in batch.samples)
    assert len(batch.samples) == 12
    # "a" has F1 0, "b" (which takes a's errors) F1 0.67, "c" and "d" are perfect.
    assert counts["a"] > counts["b"] > max(counts["c"], counts["d"]), counts


def test_a_score_on_few_validation_samples_moves_the_budget_less():
    def report(support_of_a):
        """"a" scores F1 0 on `support_of_a` samples; b, c and d score 0.5, 1 and 1 on 20 each."""
        scores = {"a": (0.0, support_of_a), "b": (0.5, 20), "c": (1.0, 20), "d": (1.0, 20)}
        return EvalReport(accuracy=0.6, macro_precision=0.6, macro_recall=0.6, macro_f1=0.625,
                          weighted_precision=0.6, weighted_recall=0.6, weighted_f1=0.6, loss=1.0, samples=60,
                          per_class={c: ClassScores(precision=f, recall=f, f1=f, support=n)
                                     for c, (f, n) in scores.items()}, confusions=[])

    teacher = PoolGuidedTeacher(_pool(per_class=100), embed=bag_of_words_embed, seed=0)
    few = teacher.class_budget(_request(n=40, report=report(1)), dict.fromkeys(LABELS, 100))
    many = teacher.class_budget(_request(n=40, report=report(40)), dict.fromkeys(LABELS, 100))
    assert few["a"] < many["a"], (few, many)
    assert few["b"] > few["c"] and many["b"] > many["c"]


def test_guided_teacher_without_report_spreads_evenly():
    teacher = PoolGuidedTeacher(_pool(), embed=bag_of_words_embed, seed=0)
    counts = Counter(s.label for s in teacher.generate(_request(n=12)).samples)
    assert counts == {"a": 3, "b": 3, "c": 3, "d": 3}


def test_guided_teacher_picks_pool_texts_nearest_to_the_mistakes():
    teacher = PoolGuidedTeacher(_pool(), embed=bag_of_words_embed, seed=0)
    mistake = MinedSample(text="a zebra zebra", label="a", predicted="b", confidence=0.9)
    batch = teacher.generate(_request(n=3, report=_report(weak="a"), mistakes=[mistake]))
    picked_a = [s for s in batch.samples if s.label == "a"]
    assert picked_a and all("zebra" in s.text for s in picked_a)


def test_label_noise_relabels_about_the_requested_share():
    teacher = PoolRandomTeacher(_pool(per_class=100), seed=0, label_noise=0.3)
    batch = teacher.generate(_request(n=400))
    wrong = sum(not s.text.startswith(s.label + " ") for s in batch.samples)
    assert 0.22 < wrong / 400 < 0.38
    assert all(s.label in LABELS for s in batch.samples)


def test_factory_checks_names():
    assert make_simulated_teacher("pool-random", _pool(), seed=0).name == "pool-random"
    with pytest.raises(ValueError, match="unknown simulated teacher"):
        make_simulated_teacher("gpt", _pool(), seed=0)
