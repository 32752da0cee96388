"""pgkd.stream.promotion: a stream whose runs have a cascade target promotes the student that serves the
cascade better on the validation texts (the larger share answered at a target accuracy; the more accurate
answers at a most-share-to-the-LLM target), the metric deciding a tie; without a target, the metric alone."""
import numpy as np
import pytest
from pgkd.artifacts import ArtifactStore
from pgkd.calibration import Deferral
from pgkd.cli import main
from pgkd.distributed.steps import run_through_steps
from pgkd.loop.evaluation import evaluate
from pgkd.stream import Stream, StreamSettings
from pgkd.stream.promotion import cascade_score, compare
from pgkd.types import Sample
from stream_fixtures import base_run, body, new_samples

VALIDATION = [Sample(text=f"text {i}", label="a" if i % 2 else "b") for i in range(200)]


def report(accuracy: float):
    """An EvalReport whose accuracy (and macro-F1) grows with `accuracy`: that share of the texts right."""
    gold = [s.label for s in VALIDATION]
    right = int(accuracy * len(gold))
    probs = np.array([[0.9, 0.1] if (g == "a") == (i < right) else [0.1, 0.9] for i, g in enumerate(gold)])
    return evaluate(gold, probs, ["a", "b"])


def deferral(share: float, accuracy: float | None, target: str = "target accuracy 0.9") -> Deferral:
    return Deferral(threshold=0.5, target=target, student_share=share, student_accuracy=accuracy, samples=200)


@pytest.mark.parametrize("new, current, new_metric, replaced", [
    (deferral(0.80, 0.95), deferral(0.70, 0.96), 0.6, True),       # answers more at the target, worse alone
    (deferral(0.70, 0.97), deferral(0.80, 0.95), 0.9, False),      # better alone, answers less
    (None, deferral(0.10, 0.95), 0.9, False),                      # cannot meet the target
    (deferral(0.10, 0.95), None, 0.6, True),                       # the current one could not
    (deferral(0.75, 0.95), deferral(0.75, 0.96), 0.9, True),       # a tie: the metric decides
    (deferral(0.75, 0.95), deferral(0.75, 0.96), 0.6, False),
])
def test_at_a_target_accuracy_the_student_answering_more_of_validation_is_promoted(new, current, new_metric,
                                                                                    replaced):
    decision = compare("run-2", report(new_metric), report(0.75), "macro_f1", "run-1", VALIDATION,
                       (new, current), target_accuracy=0.9)
    assert decision.replaced is replaced
    assert (decision.criterion, decision.cascade_target) == ("cascade", "target accuracy 0.9")
    assert (decision.new_cascade, decision.current_cascade) == (new, current)
    assert decision.reason.startswith("at the cascade's target accuracy 0.9, on the 200 validation texts")
    assert decision.reason.endswith("replaces it" if replaced else "does not replace it")


def test_at_a_most_share_target_the_more_accurate_answers_are_promoted():
    share = "max teacher share 0.2"
    better = compare("run-2", report(0.6), report(0.9), "macro_f1", "run-1", VALIDATION,
                     (deferral(0.8, 0.97, share), deferral(0.8, 0.93, share)), max_teacher_share=0.2)
    assert better.replaced and "is 0.9700 accurate on the 80.0% it answers" in better.reason
    with pytest.raises(ValueError, match="one of target_accuracy and max_teacher_share"):
        compare("run-2", report(0.6), report(0.9), "macro_f1", "run-1", VALIDATION, (None, None))


def test_without_a_target_the_metric_alone_decides():
    decision = compare("run-2", report(0.9), report(0.75), "macro_f1", "run-1", VALIDATION)
    assert decision.replaced and decision.criterion == "metric" and decision.new_cascade is None
    assert decision.reason.startswith("validation macro_f1 ")


class Student:
    """Sure and right on the first `sure` texts, unsure (and wrong) on the rest."""
    labels = ["a", "b"]

    def __init__(self, sure: int):
        self.sure = sure

    def predict_proba(self, texts):
        gold = [0 if s.label == "a" else 1 for s in VALIDATION]
        return np.array([[0.99, 0.01][::1 if g == 0 else -1] if i < self.sure else [0.45, 0.55][::1 if g == 0 else -1]
                         for i, g in enumerate(gold[:len(texts)])])


def test_a_students_cascade_score_is_the_share_it_answers_at_the_target_on_these_texts():
    sure = cascade_score(Student(180), VALIDATION, ["a", "b"], target_accuracy=0.9)
    less = cascade_score(Student(120), VALIDATION, ["a", "b"], target_accuracy=0.9)
    assert sure.samples == less.samples == 200 and sure.target == "target accuracy 0.9"
    assert sure.student_share > less.student_share >= 0.5 and sure.student_accuracy >= 0.9
    assert cascade_score(Student(0), VALIDATION, ["a", "b"], target_accuracy=0.9) is None   # right on none


def run_of_a_stream_with_a_target(tmp_path):
    """A stream whose base run has --target-accuracy 0.6, and its first triggered run, completed (not decided)."""
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    data, _ = base_run(tmp_path, store, guidance_source="out-of-fold", guidance_folds=3, target_accuracy=0.6)
    stream = Stream(store, StreamSettings(base_run="base", trigger_count=3, drift_window=1000))
    stream.open()
    stream.promotion_published("base")
    for row in new_samples(data, 3):
        step = stream.take(body(row))
    [request] = step.publish
    stream.published(request.run_id)
    return store, stream, request, run_through_steps(request, store)


def test_a_stream_whose_runs_have_a_cascade_target_decides_by_it(tmp_path, monkeypatch, capsys):
    store, stream, request, completed = run_of_a_stream_with_a_target(tmp_path)
    decision = stream.finished(completed).decision
    assert (decision.criterion, decision.cascade_target) == ("cascade", "target accuracy 0.6")
    assert decision.new_cascade is not None and decision.current_cascade is not None
    shares = decision.new_cascade.student_share, decision.current_cascade.student_share
    assert decision.replaced == (shares[0] > shares[1] or (shares[0] == shares[1]
                                                           and decision.new_score > decision.current_score))
    assert store.get_json(f"streams/default/decisions/{request.run_id}.json")["criterion"] == "cascade"
    monkeypatch.setenv("PGKD_ARTIFACTS", store.url)
    assert main(["stream", "status", "default"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"run {request.run_id} "))
    assert " current student (by the cascade at its target accuracy 0.6): at the cascade's " in line, line


def test_with_no_validation_texts_the_current_student_stays(tmp_path, monkeypatch):
    _, stream, _, completed = run_of_a_stream_with_a_target(tmp_path)
    monkeypatch.setattr(stream, "validation_set", lambda: [])
    decision = stream.finished(completed).decision
    assert not decision.replaced and decision.reason.startswith("no validation texts"), decision.reason
    assert stream.state.current.run_id == "base"


def test_the_run_is_judged_at_its_own_target_not_at_one_the_settings_file_says_later(tmp_path):
    """The target the run was calibrated for decides, whatever the stream's `run` settings say when it ends."""
    _, stream, _, completed = run_of_a_stream_with_a_target(tmp_path)
    stream.settings = stream.settings.model_copy(update={"run": {"target_accuracy": None, "max_teacher_share": 0.3}})
    decision = stream.finished(completed).decision
    assert decision.cascade_target == "target accuracy 0.6", decision.reason
