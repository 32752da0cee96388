"""The embedded PGKD run: the whole method in one process. Read `distill_splits` top to bottom: train,
evaluate, decide, mine, ask the teacher, screen, add, repeat; keep the best student. The phases are
pgkd.loop.distillation's, on a state in memory; each service calls one of the same phases on a state
it loads from the artifact store."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pgkd.loop.dryrun import check_fits
from pgkd.data import Dataset, Splits, load_dataset, make_splits, with_taxonomy
from pgkd.errors import EnvironmentFailure, UserError
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import dataset_duplicates, fresh_student, log, make_teacher, parameter_count
from pgkd.loop.distillation import Distillation, MemoryKeeper
from pgkd.files import write_json_atomic
from pgkd.loop.outputs import RunOutput
from pgkd.loop.report import RunReport, plot_history, plot_reliability
from pgkd.encoder import EmbeddingCache, loading_bars
from pgkd.types import TeacherUnavailable


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
    with loading_bars(progress):
        return _run(config, out, progress, embed, keep_model, dataset, teacher, student)


def _run(config: DistillConfig, out, progress: bool, embed, keep_model: bool, dataset: Dataset | None, teacher,
         student) -> DistillResult:
    started = time.time()
    output = RunOutput(out) if out is not None else None
    staging = output.open() if output is not None else None       # checks OUT before any work
    try:
        if dataset is None:
            dataset = load_dataset(config.data, config.text_column, config.label_column, seed=config.seed)
        dataset = with_taxonomy(dataset, config.taxonomy) if dataset.taxonomy is None else dataset
        splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
        check_fits(config, splits, teacher)   # an LLM's prompt can fit --teacher-max-prompt-tokens: before any work
        result = distill_splits(config, dataset, splits, progress=progress, embed=embed, teacher=teacher,
                                student=student, started=started)
        if output is not None:
            if keep_model:
                result.student.save(staging / "best")
            plot_history(result.report, staging / "history.png")
            if result.report.calibration and result.report.calibration["samples"]:
                plot_reliability(result.report, staging / "reliability.png")
            write_json_atomic(staging / "report.json", result.report.model_dump(mode="json"))
            output.commit()
        return result
    except BaseException:
        if output is not None:
            output.abort()
        raise


def distill_splits(config: DistillConfig, dataset: Dataset, splits: Splits, progress: bool = True, embed=None,
                   teacher=None, student=None, started: float | None = None) -> DistillResult:
    """The loop itself, on splits made already: the phases of pgkd.loop.distillation, in order, on a
    state kept in memory."""
    # One sentence encoder for the frozen student and the guided teacher; it loads on first use.
    cache = embed if isinstance(embed, EmbeddingCache) else \
        EmbeddingCache(progress=progress, device=config.device) if embed is None else None
    student = student if student is not None else fresh_student(config, splits.labels, 0, embed=cache)
    teacher = teacher if teacher is not None else make_teacher(config, splits, embed=embed or cache)
    announce(config, dataset, splits, student, teacher)
    run = Distillation(config, dataset, splits, MemoryKeeper(), make_teacher=lambda: teacher, embed=cache,
                       student=student, events=[CycleLines()], progress=progress)

    state = run.start("embedded", started_at=started, handed_at=time.time())
    while True:
        state = run.train(state)        # 1. train: from the pretrained encoder at cycle 0, then warm-started
        state = run.evaluate(state)     # 2. evaluate on validation (and the baseline on test), 3. decide
        if state.stopped:
            break
        state = run.mine(state)         # 4. mine the student's mistakes (on validation, or out of fold)
        state = run.teach(state)        # 5. ask the teacher for samples aimed at them, screen, add
        if state.stopped:               # the teacher is unavailable, or has nothing left to give
            break
    log(f"pgkd: stop: {state.stop_reason}")
    state, report, best = run.finish(state)
    return DistillResult(report=report, student=best)


class CycleLines:
    """Prints each cycle's line as it is recorded (the listener of the embedded run)."""

    def on_cycle_evaluated(self, state) -> None:
        log(state.cycle_line(state.cycles[-1].cycle))


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
        except TeacherUnavailable as e:   # refused (a key, a model): the input's fault; else the environment's
            raise (UserError if e.refused else EnvironmentFailure)(str(e)) from None
