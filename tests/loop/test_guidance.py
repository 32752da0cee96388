"""Out-of-fold guidance: every labeled sample predicted by a student that never trained on it, and
a validation split the teacher never sees."""
from collections import Counter

import numpy as np
import pytest
from conftest import bag_of_words_embed
from pgkd.types import Sample
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.loop.guidance import fold_of, out_of_fold_probs
from pgkd.teachers.simulated import PoolGuidedTeacher


def _samples(per_class: dict[str, int]) -> list[Sample]:
    return [Sample(text=f"{label} {i}", label=label) for label, n in per_class.items() for i in range(n)]


def test_folds_are_stratified_balanced_and_seeded():
    samples = _samples({"a": 10, "b": 7, "c": 3, "d": 1})
    folds = fold_of(samples, 5, seed=1)
    assert sorted(Counter(folds).values()) == [4, 4, 4, 4, 5]           # 21 samples over 5 folds
    for label in "abcd":                                               # each class spread over the folds
        counts = Counter(f for f, s in zip(folds, samples) if s.label == label)
        per_fold = [counts.get(k, 0) for k in range(5)]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    assert fold_of(samples, 5, seed=1) == folds and fold_of(samples, 5, seed=2) != folds


class RecordingStudent:
    """Remembers what it trained on; predicts 1 for the class of a text it trained on, else uniform."""
    labels = ["a", "b"]

    def __init__(self, log):
        self.log = log

    def train(self, train, validation, config, progress=True, description=""):
        self.seen = {s.text for s in train}
        self.log.append((self.seen, {s.text for s in validation}))

    def predict_proba(self, texts):
        return np.array([[0.5, 0.5] if t not in self.seen else [1.0, 0.0] for t in texts])


def test_each_labeled_sample_is_predicted_by_a_student_that_never_trained_on_it():
    labeled, added = _samples({"a": 6, "b": 6}), [Sample(text="teacher's", label="a")]
    validation = [Sample(text="selection", label="b")]
    log = []
    probs = out_of_fold_probs(labeled, added, validation, 3, seed=0, make_student=lambda k: RecordingStudent(log),
                              train_config=None)
    assert probs.shape == (12, 2) and np.allclose(probs, 0.5)         # never a text its student saw
    assert len(log) == 3
    for seen, early_stopping in log:
        assert "teacher's" in seen and len(seen) == 8 + 1                # the other folds and the teacher's samples
        assert early_stopping == {"selection"}


class RecordingTeacher(PoolGuidedTeacher):
    def __init__(self, pool):
        super().__init__(pool, embed=bag_of_words_embed, seed=1)
        self.requests = []

    def generate(self, request):
        self.requests.append(request)
        return super().generate(request)


def _shown_texts(request) -> set[str]:
    return {m.text for m in request.hard_negatives + request.misclassified + request.correct} | {
        s.text for s in request.examples}


@pytest.mark.parametrize("source", ["out-of-fold", "validation"])
def test_with_out_of_fold_guidance_the_teacher_never_sees_a_validation_text(toy_data, tmp_path, source):
    from pgkd.data import load_dataset, make_splits
    config = DistillConfig(data=str(toy_data), labeled=40, student="tiny", teacher="pool-guided", samples_per_cycle=8,
                           max_cycles=2, patience=5, epochs=4, cycle_epochs=1, learning_rate=1e-2,
                           head_learning_rate=1e-2, batch_size=16, seed=1, guidance_source=source, guidance_folds=2)
    splits = make_splits(load_dataset(toy_data, seed=1), 40, 1)
    teacher = RecordingTeacher(splits.pool)
    report = run(config, tmp_path / "run", progress=False, teacher=teacher).report
    shown = set().union(*(_shown_texts(r) for r in teacher.requests))
    validation = {s.text for s in splits.validation}
    assert len(teacher.requests) == 2
    assert report.selection.shown_to_teacher is (source == "validation")
    assert report.selection.samples == len(splits.validation) == 8
    if source == "out-of-fold":
        assert not shown & validation
        assert all(r.report.samples == len(splits.train) == 32 for r in teacher.requests)   # every labeled train sample
        assert shown & {s.text for s in splits.train}
    else:
        assert shown & validation                          # the method as first written: the flaw the option removes
        assert all(r.report.samples == 8 for r in teacher.requests)
    # Each cycle records what the teacher was shown after it; the last, where the run stopped, nothing.
    assert [c.guidance is not None for c in report.cycles] == [True, True, False]
    assert report.cycles[0].guidance["macro_f1"] == pytest.approx(teacher.requests[0].report.macro_f1)


def test_out_of_fold_selection_picks_the_best_cycle_on_scores_the_teacher_never_saw(toy_data, tmp_path):
    config = DistillConfig(data=str(toy_data), labeled=40, student="tiny", teacher="pool-guided", samples_per_cycle=8,
                           max_cycles=2, patience=5, epochs=4, cycle_epochs=1, learning_rate=1e-2,
                           head_learning_rate=1e-2, batch_size=16, seed=1, selection_source="out-of-fold",
                           guidance_folds=2)
    report = run(config, tmp_path / "run", progress=False, embed=bag_of_words_embed).report
    selection = [c.selection["macro_f1"] for c in report.cycles]
    assert report.best.cycle == selection.index(max(selection))          # not validation's choice
    assert report.selection.shown_to_teacher is False and report.selection.samples == 32
    assert report.selection.split.startswith("out-of-fold")
    assert report.selection.scores == report.cycles[report.best.cycle].selection
    assert all(c.validation is not None for c in report.cycles)           # validation is still reported


def test_guidance_and_selection_cannot_both_be_out_of_fold(toy_data, capsys):
    from pgkd.cli import main
    with pytest.raises(ValueError, match="cannot both be out-of-fold"):
        DistillConfig(data=str(toy_data), guidance_source="out-of-fold", selection_source="out-of-fold")
    assert main(["distill", "--data", str(toy_data), "--out", "never-written", "--guidance-source", "out-of-fold",
                 "--selection-source", "out-of-fold"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot both be out-of-fold" in err[0]
