"""The embedded loop end to end with the tiny student on the synthetic dataset."""
import json

import pytest
from conftest import bag_of_words_embed
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.students.finetuned import FineTunedStudent
from pgkd.types import GeneratedBatch


def _config(data, **overrides):
    options = dict(data=str(data), labeled=40, student="tiny", teacher="pool-guided", samples_per_cycle=16,
                   max_cycles=2, patience=5, epochs=8, cycle_epochs=2, learning_rate=1e-2, head_learning_rate=1e-2,
                   batch_size=16, seed=1)
    options.update(overrides)
    return DistillConfig(**options)


def test_two_cycles_write_a_complete_run(toy_data, tmp_path):
    out = tmp_path / "run"
    report = run(_config(toy_data), out, progress=False, embed=bag_of_words_embed).report
    saved = json.loads((out / "report.json").read_text())
    assert saved["stop_reason"].startswith("max_cycles")
    assert [c["cycle"] for c in saved["cycles"]] == [0, 1, 2]
    assert saved["teacher"]["simulated"] is True and saved["teacher"]["name"] == "pool-guided"
    assert saved["config"]["seed"] == 1 and saved["dataset"]["sizes"]["train"] == 32
    assert set(saved["baseline"]) == {"validation", "test"} and "cycle" in saved["best"]
    # The training set grows by exactly what was accepted, and every generated sample is accounted for.
    for before, after in zip(saved["cycles"], saved["cycles"][1:]):
        assert after["train_size"] == before["train_size"] + after["accepted"]
        assert after["accepted"] + sum(after["rejected"].values()) == after["generated"] == 16
    # The best cycle is the one with the best validation macro-F1 (first on ties), and it is what was kept.
    scores = [c["validation"]["macro_f1"] for c in saved["cycles"]]
    assert saved["best"]["cycle"] == scores.index(max(scores))
    assert saved["best"]["validation"]["macro_f1"] == pytest.approx(max(scores))
    best = FineTunedStudent.load(out / "best")
    assert best.labels == sorted({"card_lost", "refund", "transfer", "pin_change"})
    assert saved["best"]["validation"]["samples"] == 8 and saved["best"]["test"]["samples"] == 60
    assert (out / "history.png").stat().st_size > 1000
    assert not (out / ".pgkd-staging").exists()       # no staging left behind
    assert {p.name for p in out.iterdir()} >= {"report.json", "best", "history.png"}
    assert report.best.test.accuracy == saved["best"]["test"]["accuracy"]


def test_patience_stops_the_loop(toy_data, tmp_path):
    # min_delta 1.0: no macro-F1 (in [0, 1]) can improve on another by more, so one cycle of patience
    # ends the run on any CPU.
    report = run(_config(toy_data, max_cycles=8, patience=1, min_delta=1.0), tmp_path / "run", progress=False,
                 embed=bag_of_words_embed).report
    assert report.stop_reason.startswith("patience") and len(report.cycles) == 2 and report.best.cycle == 0


def test_a_failed_run_leaves_no_result_and_keeps_the_previous_one(toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(_config(toy_data, max_cycles=0), out, progress=False).report
    previous = (out / "report.json").read_text()

    def broken(self, request) -> GeneratedBatch:
        raise RuntimeError("teacher crashed")

    monkeypatch.setattr("pgkd.teachers.simulated.PoolRandomTeacher.generate", broken)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        run(_config(toy_data, teacher="pool-random"), out, progress=False).report
    assert (out / "report.json").read_text() == previous
    assert not (out / ".pgkd-staging").exists()       # the failed run's staging is gone, the old result kept


def test_sample_budget_caps_what_the_teacher_is_asked_for(toy_data, tmp_path):
    report = run(_config(toy_data, teacher="pool-random", max_cycles=5, sample_budget=24), tmp_path / "run",
                 progress=False).report
    assert [c.generated for c in report.cycles] == [0, 16, 8]
    assert report.stop_reason.startswith("sample_budget")


def test_same_seed_same_run(toy_data, tmp_path):
    a = run(_config(toy_data, teacher="pool-random", max_cycles=1), tmp_path / "a", progress=False).report
    b = run(_config(toy_data, teacher="pool-random", max_cycles=1), tmp_path / "b", progress=False).report
    assert [c.validation for c in a.cycles] == [c.validation for c in b.cycles]
    assert a.best.test == b.best.test


def test_the_kept_student_is_exactly_the_best_cycles_student(toy_data, tmp_path):
    """With --track-test every cycle is scored on test; the student restored at the end must score
    what it scored at its own cycle, although later cycles trained on from it."""
    # min_delta 1.0 keeps cycle 0 the best (whatever the scores) while cycles 1 and 2 train on; their
    # students differ on test.
    report = run(_config(toy_data, teacher="pool-random", max_cycles=2, patience=5, min_delta=1.0, track_test=True,
                         labeled=24, epochs=2, learning_rate=3e-3, head_learning_rate=3e-3,
                         cycle_learning_rate_scale=1),
                 tmp_path / "run", progress=False).report
    assert report.best.cycle == 0 and all(c.test is not None for c in report.cycles)
    assert report.cycles[2].test["loss"] != report.cycles[0].test["loss"]
    assert report.best.test.loss == report.cycles[0].test["loss"] == report.baseline.test.loss


def test_warm_started_rounds_take_scaled_steps(toy_data):
    config = _config(toy_data, learning_rate=1e-3, head_learning_rate=1e-2, cycle_learning_rate_scale=0.25)
    scaled = config.train_config(epochs=3, seed=0, scale=config.cycle_learning_rate_scale)
    assert (scaled.learning_rate, scaled.head_learning_rate) == (pytest.approx(2.5e-4), pytest.approx(2.5e-3))


def test_a_round_from_the_pretrained_encoder_runs_its_whole_schedule_and_a_warm_one_stops_early(toy_data):
    config = _config(toy_data, epochs=8, cycle_epochs=3)
    first, warm = config.round_config(0), config.round_config(1)
    assert (first.epochs, first.patience) == (8, 8)       # early stopping never cuts the first schedule short
    assert (warm.epochs, warm.patience) == (3, 1)
    assert config.round_config(1, warm=False).patience == 8   # --no-warm-start: every round from the encoder
