"""A run ends by calibrating the kept student on the validation texts the teacher never saw, and by
choosing the cascade's threshold when asked: the report, the student's folder, its served model and
`pgkd predict` all carry it; the services' run keeps the calibrated student as its best checkpoint."""
import json

import numpy as np
import pytest
from conftest import bag_of_words_embed, make_toy_dataset
from pgkd.artifacts import ArtifactStore
from pgkd.calibration import FILE, Calibration, scaled
from pgkd.cli import main
from pgkd.distributed import steps
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.students import load_student

RUN = dict(labeled=200, validation_fraction=0.3, student="tiny", teacher="pool-guided", samples_per_cycle=8,
           max_cycles=1, patience=5, epochs=3, cycle_epochs=1, learning_rate=1e-2, head_learning_rate=1e-2,
           batch_size=32, seed=1, hard_negatives=2, misclassified=2, correct=2, guidance_source="out-of-fold",
           guidance_folds=2)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrated")
    config = DistillConfig(data=str(make_toy_dataset(folder / "toy")), max_teacher_share=0.25, **RUN)
    out = folder / "run"
    result = run(config, out, progress=False, embed=bag_of_words_embed)
    return config, out, result


def test_the_report_records_the_calibration_on_the_texts_the_teacher_never_saw(calibrated):
    config, out, result = calibrated
    saved = json.loads((out / "report.json").read_text())["calibration"]
    # 60 validation texts, guided out of fold: the teacher saw none of them.
    assert saved["samples"] == 60 and saved["shown_to_teacher"] == 0 and "which the teacher never saw" in saved["source"]
    assert saved["temperature"] > 0 and saved["ece_before"] >= 0 and saved["ece_after"] >= 0
    assert saved["nll_after"] <= saved["nll_before"] + 1e-6     # T is fit to lower exactly this
    assert sum(b["samples"] for b in saved["reliability_after"]) == saved["samples"]
    assert saved["deferral"]["target"] == "max teacher share 0.25" and saved["deferral"]["student_share"] >= 0.75
    assert "confidence" not in saved            # the held scores are kept with the student, not in the report
    assert (out / "reliability.png").stat().st_size > 1000
    manifest = json.loads((out / ".pgkd-run.json").read_text())
    assert "reliability.png" in json.dumps(manifest)


def test_the_saved_student_answers_with_calibrated_probabilities(calibrated):
    config, out, result = calibrated
    kept = Calibration.model_validate_json((out / "best" / FILE).read_text())
    assert kept.deferral is not None and len(kept.confidence) == kept.samples
    student = load_student(out / "best")
    assert student.calibration == kept
    texts = ["I lost my card", "how do I change my pin", "send money to my brother"]
    calibrated_probs = student.predict_proba(texts)
    student.calibration = None
    assert np.allclose(calibrated_probs, scaled(student.predict_proba(texts), kept.temperature), atol=1e-5)


def test_training_a_calibrated_student_again_drops_its_calibration(calibrated, tmp_path):
    config, out, result = calibrated
    student = load_student(out / "best")
    from pgkd.types import Sample, TrainConfig
    student.train([Sample(text="lost card", label=student.labels[0])] * 4, [], TrainConfig(epochs=1, batch_size=4))
    assert student.calibration is None
    student.save(tmp_path / "again")
    assert not (tmp_path / "again" / FILE).exists()


@pytest.mark.parametrize("damage", ['{"temperature": "warm"', "temperature 0", "temperature -1", "temperature 50"])
def test_a_damaged_or_edited_calibration_file_is_one_line(calibrated, tmp_path, damage):
    import shutil
    config, out, result = calibrated
    copy = shutil.copytree(out / "best", tmp_path / "best")
    if damage.startswith("temperature "):     # a number pgkd never fits: 0 would divide by zero, -1 invert the answers
        data = json.loads((copy / FILE).read_text())
        (copy / FILE).write_text(json.dumps({**data, "temperature": float(damage.split()[1])}))
    else:
        (copy / FILE).write_text(damage)
    with pytest.raises(Exception) as e:
        load_student(copy)
    assert type(e.value).__name__ == "UserError" and FILE in str(e.value) and "\n" not in str(e.value)


def test_the_services_run_keeps_the_calibrated_student_as_its_best_checkpoint(calibrated, tmp_path):
    config, out, result = calibrated
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    completed = steps.run_through_steps(steps.submit(config, store, run_id="cal"), store)
    assert completed.best_checkpoint.uri.endswith("checkpoints/best.json")
    student = steps.load_checkpoint(store, completed.best_checkpoint, "cpu")
    assert student.calibration is not None and student.calibration.deferral is not None
    report = store.get_json(completed.report)
    assert report["calibration"]["temperature"] == pytest.approx(student.calibration.temperature)
    assert store.exists("runs/cal/reliability.png")


def test_a_target_the_held_scores_cannot_meet_writes_the_run_and_exits_2_naming_what_they_can(tmp_path, capsys,
                                                                                            monkeypatch):
    """Whether a tiny student's held scores meet a target depends on one text's rounding on this CPU, so
    the scores are made those of a student wrong on every text: what is under test is what the command
    does with an unmet target (the choice itself: tests/test_calibration.py)."""
    import pgkd.loop.cycle as cycle
    real = cycle.calibrate
    monkeypatch.setattr(cycle, "calibrate", lambda probs, targets, *a, **k: real(
        probs, (np.asarray(probs).argmax(axis=1) + 1) % np.asarray(probs).shape[1], *a, **k))
    data = make_toy_dataset(tmp_path / "toy")
    args = ["distill", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress", "--target-accuracy", "0.9"]
    for key, value in {**RUN, "max_cycles": 0, "epochs": 1}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "target accuracy 0.9 cannot be met" in err[-1] and "achievable" in err[-1]
    assert f"the run's results are written to {tmp_path / 'run'}" in err[-1]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["calibration"]["deferral"] is None and "cannot be met" in report["calibration"]["deferral_problem"]
    assert json.loads((tmp_path / "run" / "best" / FILE).read_text())["deferral"] is None


@pytest.mark.parametrize("flags, said", [(["--target-accuracy", "1.5"], "--target-accuracy"),
                                         (["--max-teacher-share", "-0.1"], "--max-teacher-share"),
                                         (["--target-accuracy", "0.9", "--max-teacher-share", "0.2",
                                           "--guidance-source", "out-of-fold"], "each choose the threshold: give one"),
                                         (["--target-accuracy", "0.9"], "--guidance-source out-of-fold")])
def test_a_target_outside_0_1_or_both_targets_are_one_line_before_any_work(flags, said, tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "toy")
    assert main(["distill", "--data", str(data), "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0]
    assert not (tmp_path / "run").exists()


def test_guided_by_validation_the_calibration_counts_what_the_teacher_saw(tmp_path):
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), **{**RUN, "guidance_source": "validation"})
    report = run(config, None, progress=False, embed=bag_of_words_embed).report
    saved = report.calibration
    assert saved["samples"] == 60 and 0 < saved["shown_to_teacher"] <= 6 and saved["deferral"] is None
    assert f"{saved['shown_to_teacher']} of which the teacher was shown" in saved["source"]
