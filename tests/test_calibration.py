"""Calibrated confidence and the cascade's threshold (pgkd.calibration): temperature scaling recovers
a known temperature and lowers the calibration error; the threshold is the lowest that meets the
target on the held scores; a target they cannot meet is one line naming what they can."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pgkd.calibration import (Calibration, accuracy_lower_bound, calibrate, choose_threshold,
                              expected_calibration_error, fit_temperature, reliability, scaled)
from pgkd.errors import UserError


def overconfident(n: int = 1000, classes: int = 10, temperature: float = 3.0, seed: int = 0):
    """Probabilities softmax(l) of labels drawn from softmax(l / temperature): a student that is too
    sure of itself by exactly `temperature`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 4
    truth = np.exp(logits / temperature)
    truth /= truth.sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(classes, p=row) for row in truth])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), targets


def test_temperature_scaling_finds_the_temperature_the_labels_were_drawn_with_and_lowers_the_error():
    probs, targets = overconfident(temperature=3.0)
    t = fit_temperature(probs, targets)
    assert 2.4 < t < 3.8
    after = scaled(probs, t)
    assert expected_calibration_error(after, targets) < expected_calibration_error(probs, targets) / 3
    assert (after.argmax(axis=1) == probs.argmax(axis=1)).all()        # the answers stay the same


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(2, 12), st.floats(0.05, 20), st.integers(0, 2**31 - 1))
def test_scaling_keeps_rows_probabilities_and_the_answer(n, classes, temperature, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(classes), size=n)
    out = scaled(probs, temperature)
    assert np.allclose(out.sum(axis=1), 1, atol=1e-5) and (out >= 0).all()
    assert (out.argmax(axis=1) == probs.argmax(axis=1)).all() or np.isclose(np.sort(probs, 1)[:, -1],
                                                                           np.sort(probs, 1)[:, -2]).any()


def test_the_reliability_bins_count_every_text_once():
    probs, targets = overconfident(n=300)
    bins = reliability(probs, targets)
    assert sum(b.samples for b in bins) == 300
    assert all(b.lower <= b.confidence < b.upper + 1e-9 for b in bins if b.samples)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=60), st.floats(0.01, 1))
def test_the_threshold_for_an_accuracy_is_the_lowest_whose_answers_hold_it(scores, target):
    confidence = np.array([c for c, _ in scores])
    correct = np.array([r for _, r in scores])
    try:
        d = choose_threshold(confidence, correct, target_accuracy=target)
    except UserError as e:
        assert "cannot be met" in str(e) and "achievable" in str(e) and "\n" not in str(e)
        return
    answered = confidence >= d.threshold

    def bound(mask):
        return accuracy_lower_bound(correct[mask].sum(), mask.sum())
    assert bound(answered) >= target - 1e-9 and correct[answered].mean() >= target - 1e-9
    assert math.isclose(d.student_share, answered.mean())
    lower = confidence[confidence < d.threshold]
    if len(lower):     # one step lower (the next confidence down) no longer holds it
        assert bound(confidence >= lower.max()) < target


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.floats(0, 1))
def test_the_threshold_for_a_teacher_share_sends_it_at_most_that_share(confidence, share):
    confidence = np.array(confidence)
    d = choose_threshold(confidence, np.ones(len(confidence), dtype=bool), max_teacher_share=share)
    assert (confidence < d.threshold).mean() <= share + 1e-9
    lowest_answered = confidence[confidence >= d.threshold].min(initial=1.0)   # 0 answers what the lowest does
    higher = confidence[confidence > lowest_answered]
    if len(higher) and share < 1:   # one step higher would send the LLM more than its share
        assert (confidence < higher.min()).mean() > share


@pytest.mark.parametrize("target", [dict(max_teacher_share=0.0), dict(target_accuracy=0.3)])
def test_a_target_every_held_text_meets_lets_the_student_answer_every_text(target):
    """A teacher share of 0 (an operator switching the LLM off), or an accuracy the student holds on every
    held text: the threshold is 0, so a live text less sure than any held one is not sent to the LLM."""
    d = choose_threshold([0.9, 0.8, 0.7, 0.6], [True, True, True, False], **target)
    assert d.threshold == 0.0 and d.student_share == 1.0


def test_a_target_the_scores_cannot_meet_names_what_they_can():
    with pytest.raises(UserError) as e:
        choose_threshold([0.9, 0.8, 0.7, 0.6], [False, True, True, False], target_accuracy=0.9)
    best = max(accuracy_lower_bound(r, n) for r, n in ((0, 1), (1, 2), (2, 3), (2, 4)))
    assert "target accuracy 0.9 cannot be met" in str(e.value)
    assert f"up to {best:.4f}" in str(e.value) and "at 90% confidence" in str(e.value)


def test_the_wilson_bound_is_below_the_accuracy_and_closes_in_as_texts_grow():
    assert accuracy_lower_bound(9, 10) < 0.9 < accuracy_lower_bound(900, 1000) + 0.02
    assert accuracy_lower_bound(90, 100) < accuracy_lower_bound(900, 1000) < 0.9


def test_no_threshold_is_chosen_on_scores_the_teacher_was_shown():
    probs, targets = overconfident(n=100)
    c = calibrate(probs, targets, "held", max_teacher_share=0.2, shown_to_teacher=30)
    assert c.deferral is None and "the teacher was shown 30 of these 100" in c.deferral_problem


@pytest.mark.parametrize("kwargs", [dict(target_accuracy=1.5), dict(target_accuracy=float("nan")),
                                    dict(max_teacher_share=-0.1)])
def test_targets_outside_0_1_are_refused(kwargs):
    with pytest.raises(UserError, match=r"expected a number in \[0, 1\]"):
        choose_threshold([0.5], [True], **kwargs)


def test_a_calibration_keeps_its_held_scores_so_another_target_can_be_chosen_without_the_data():
    probs, targets = overconfident(n=400, temperature=2.0)
    c = calibrate(probs, targets, "held", max_teacher_share=0.3)
    again = Calibration.model_validate_json(c.model_dump_json())
    assert again.deferral == c.deferral and again.deferral.student_share >= 0.7 - 1e-9
    other = again.threshold_for(max_teacher_share=0.5)
    assert other.threshold > c.deferral.threshold     # the LLM may take more: the student keeps its surest
    assert "confidence" not in c.record() and c.record()["ece_after"] < c.record()["ece_before"]


def test_an_unmet_target_is_recorded_not_raised_and_too_few_scores_fit_no_temperature():
    probs, targets = overconfident(n=200)
    wrong = (probs.argmax(axis=1) + 1) % probs.shape[1]          # a student wrong on every text
    c = calibrate(probs, wrong, "held", target_accuracy=0.5)
    assert c.deferral is None and "target accuracy 0.5 cannot be met" in c.deferral_problem
    few = calibrate(probs[:10], targets[:10], "held")
    assert few.temperature == 1.0 and "too few (10 < 30)" in few.source


@pytest.mark.parametrize("content, says", [
    ('{"temperature": "hot", "source": "held", "samples": 3}', "(temperature: Input should be a valid number"),
    ('{"temperature": 1e9, "source": "held", "samples": 3}', "(temperature: Input should be less than or equal"),
    ('{"source": "held"}', "(samples: Field required"),
    ('{"source": "held", "samples": 3, "deferral": {"threshold": 2}}', "deferral.threshold: Input should be less"),
    ('{"tempera', "(the file: Invalid JSON"),
])
def test_a_damaged_saved_calibration_is_one_line_naming_the_field_and_the_problem(tmp_path, content, says):
    """What `pgkd predict` and `pgkd export` say of a student folder whose pgkd-calibration.json is damaged."""
    from pgkd.calibration import FILE
    from pgkd.students.contract import read_calibration
    (tmp_path / FILE).write_text(content)
    with pytest.raises(UserError) as error:
        read_calibration(tmp_path, ["a", "b"])
    message = str(error.value)
    assert message.startswith(f"{tmp_path / FILE}: not a readable calibration (") and says in message, message
    assert "\n" not in message and "validation error" not in message, message
