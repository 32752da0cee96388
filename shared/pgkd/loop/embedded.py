"""The embedded PGKD run: the whole method in one process. Read `distill_splits` top to bottom: train,
evaluate, decide, mine, ask the teacher, screen, add, repeat; keep the best student. The phases are
in cycle.py, where the services call the same ones."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pgkd.data import Dataset, Sample, Splits, load_dataset, make_splits
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import (
    cycle_record,
    dataset_duplicates,
    evaluate_cycle,
    finish,
    fresh_student,
    guidance_cycle,
    log,
    log_cycle,
    make_teacher,
    mine_cycle,
    parameter_count,
    round_student,
    stop_decision,
    teach,
    train_round,
)
from pgkd.loop.outputs import RunOutput, write_json_atomic
from pgkd.loop.report import Provenance, RunReport, plot_history
from pgkd.students.frozen import EmbeddingCache
from pgkd.teachers.contract import TeacherUnavailable


@dataclass
class DistillResult:
    """What a run gives: its report (what report.json holds) and the kept student, in memory."""
    report: RunReport
    student: object


def run(config: DistillConfig, out: str | Path | None, progress: bool = True, embed=None, keep_model: bool = True,
        dataset: Dataset | None = None, teacher=None, student=None) -> DistillResult:
    """Run PGKD on `config.data` (or on `dataset`, read already), and write OUT/report.json, OUT/best/
    and OUT/history.png; without `out`, nothing is written.

    `teacher` and `student`, when given, are used instead of those `config` names (the Python API's
    own objects). `embed` is the sentence encoder of the guided simulation (default: MiniLM), shared
    with the frozen-encoder student, so each text is encoded once. Without `keep_model` (benchmarks)
    OUT/best/ is not written."""
    started = time.perf_counter()
    output = RunOutput(out) if out is not None else None
    staging = output.open() if output is not None else None       # checks OUT before any work
    try:
        if dataset is None:
            dataset = load_dataset(config.data, config.text_column, config.label_column, seed=config.seed)
        splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
        result = distill_splits(config, dataset, splits, progress=progress, embed=embed, teacher=teacher,
                                student=student, started=started)
        if output is not None:
            if keep_model:
                result.student.save(staging / "best")
            plot_history(result.report, staging / "history.png")
            write_json_atomic(staging / "report.json", result.report.model_dump(mode="json"))
            output.commit()
        return result
    except BaseException:
        if output is not None:
            output.abort()
        raise


def distill_splits(config: DistillConfig, dataset: Dataset, splits: Splits, progress: bool = True, embed=None,
                   teacher=None, student=None, started: float | None = None) -> DistillResult:
    """The loop itself, on splits made already."""
    started = time.perf_counter() if started is None else started
    labels, validation = splits.labels, splits.validation
    # One sentence encoder for the frozen student and the guided teacher; it loads on first use.
    cache = embed if isinstance(embed, EmbeddingCache) else EmbeddingCache(progress=progress) if embed is None else None
    student = student if student is not None else fresh_student(config, labels, 0, embed=cache)
    teacher = teacher if teacher is not None else make_teacher(config, splits, embed=embed or cache)
    announce(config, dataset, splits, student, teacher)

    train: list[Sample] = list(splits.train)
    cycles, reports, history = [], [], []
    provenance, best_state, cycle = Provenance(), None, 0
    while True:
        cycle_started = time.perf_counter()
        # 1. Train: from the pretrained encoder at cycle 0, then warm-started from the best student.
        if cycle > 0:
            student = round_student(config, labels, cycle, best=lambda: restored(student, best_state), embed=cache)
        trained = train_round(config, student, train, validation, cycle, progress=progress)
        # 2. Evaluate on validation (and the baseline on test), 3. decide.
        evaluation = evaluate_cycle(config, student, splits, cycle, train=train, embed=cache)
        reports.append(evaluation.validation)
        history.append(evaluation.decisive.metric(config.metric))
        improved = config.policy().best_cycle(history) == cycle
        if improved:
            best_state = student.state()
        if cycle == 0:
            baseline_test = evaluation.test
        cycles.append(cycle_record(config, cycle, len(train), evaluation, provenance, trained, improved,
                                   time.perf_counter() - cycle_started))
        log_cycle(config, cycles[-1], history)
        decision = stop_decision(config, history, cycles)
        if decision.stop:
            stop_reason = decision.reason
            break
        # 4. Mine the student's mistakes (on validation, or out of fold on the labeled train samples),
        # 5. ask the teacher for samples aimed at them, screen, add.
        cycle += 1
        guidance = guidance_cycle(config, splits, train, evaluation.validation, evaluation.probs, cycle,
                                  embed=cache)
        cycles[-1].guidance = guidance.report.headline()
        mined = mine_cycle(config, guidance.samples, guidance.probs, labels, cycle)
        lesson = teach(config, teacher, splits, train, mined, guidance.report,
                       config.samples_wanted(sum(c.generated for c in cycles)), cycle)
        if lesson.stop_reason:           # the teacher is unavailable, or has nothing left to give
            stop_reason = lesson.stop_reason
            break
        train, provenance = train + lesson.accepted, lesson.provenance

    log(f"pgkd: stop: {stop_reason}")
    best_cycle = config.policy().best_cycle(history)
    best = restored(student, best_state)
    report = finish(config, dataset, splits, best, best_cycle, cycles, reports, baseline_test, train,
                    describe(teacher), stop_reason, time.perf_counter() - started)
    return DistillResult(report=report, student=best)


def restored(student, state):
    student.load_state(state)
    return student


def announce(config: DistillConfig, dataset: Dataset, splits: Splits, student, teacher) -> None:
    """What runs, said before the first (long) round; an LLM teacher is reached once first."""
    name = getattr(teacher, "name", type(teacher).__name__)
    parameters = parameter_count(student)
    log(f"pgkd: {dataset.name}: {len(splits.labels)} classes, {splits.sizes()}; student {config.student} "
        f"({'' if parameters is None else f'{parameters / 1e6:.1f}M parameters, '}"
        f"{getattr(student, 'device', 'cpu')}); teacher {name}"
        + (" (a simulation of an LLM teacher)" if getattr(teacher, "simulated", False) else ""))
    for note in dataset.notes:
        log(f"pgkd: note: {note}")
    if config.guidance_source == config.selection_source == "validation":
        log("pgkd: note: validation both guides the teacher and selects the best cycle, so the kept student's "
            "validation score flatters it; --selection-source out-of-fold selects on scores the teacher never sees")
    duplicates = dataset_duplicates(splits)
    if any(duplicates.values()):
        log(f"pgkd: note: duplicate texts in the data (kept): {duplicates}")
    if hasattr(teacher, "check"):
        if hasattr(teacher, "check_timeout"):    # an LLM teacher, reached over the network
            log(f"pgkd: reaching the teacher at {name} (up to {teacher.check_timeout:g} s an attempt)")
        try:
            teacher.check()
        except TeacherUnavailable as e:
            raise UserError(str(e)) from None


def describe(teacher) -> dict:
    return teacher.describe() if hasattr(teacher, "describe") else {"name": getattr(teacher, "name", "")}
