"""The embedded PGKD loop: train, evaluate, mine, ask the teacher, screen, add, repeat.

Read `run` top to bottom: it is the whole method. Each step is an engine function the services
call too (student.train, evaluate, mine, build_request, teacher.generate, screen, StopPolicy).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator
from tqdm.auto import tqdm

from . import __version__
from .data import Sample, count_duplicates, label_counts, load_dataset, make_splits, normalize_text
from .evaluation import METRICS, EvalReport, evaluate
from .mining import mine
from .outputs import RunOutput, write_json_atomic
from .report import BestScores, CycleRecord, RunReport, Scores, TrainingRound, environment, plot_history
from .screening import screen
from .simulated_teachers import TEACHERS, make_simulated_teacher
from .stopping import StopPolicy
from .frozen_student import EmbeddingCache
from .student import Student, TrainConfig
from .students import create_student
from .teacher import build_request


class DistillConfig(BaseModel):
    """Every option of a run; recorded whole in report.json."""
    data: str
    text_column: str = "text"
    label_column: str = "label"
    labeled: int = Field(1000, gt=0)
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    teacher: str = "pool-guided"
    guidance: Literal["full", "no-report", "no-hard-negatives"] = "full"   # the paper's two ablations
    label_noise: float = Field(0.0, ge=0, le=1)
    student: str = "minilm"
    samples_per_cycle: int = Field(32, gt=0)
    max_cycles: int = Field(10, ge=0)
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    sample_budget: int | None = Field(None, gt=0)
    metric: str = "macro_f1"
    seed: int = 1
    epochs: int = Field(8, gt=0)          # first round, from the pretrained encoder
    cycle_epochs: int = Field(3, gt=0)    # later rounds, warm-started from the best student
    warm_start: bool = True
    # Warm-started rounds take smaller steps: at the full rate the student drifted and lost test accuracy
    # cycle after cycle while validation rose (BENCHMARKS.md).
    cycle_learning_rate_scale: float = Field(0.25, gt=0, le=1)
    track_test: bool = False              # diagnostic: test scores per cycle, never used for any decision
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(4e-4, gt=0)
    head_learning_rate: float = Field(4e-3, gt=0)
    max_length: int = Field(128, gt=0)
    hard_negatives: int = Field(16, ge=0)
    misclassified: int = Field(16, ge=0)
    correct: int = Field(16, ge=0)
    device: str = "auto"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; one of {', '.join(METRICS)}")
        return v

    @field_validator("teacher")
    @classmethod
    def _known_teacher(cls, v: str) -> str:
        if v not in TEACHERS:
            raise ValueError(f"unknown teacher {v!r}; one of {', '.join(TEACHERS)}")
        return v

    def train_config(self, epochs: int, seed: int, scale: float = 1.0) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, learning_rate=self.learning_rate * scale,
                           head_learning_rate=self.head_learning_rate * scale, max_length=self.max_length,
                           patience=2 if epochs > 3 else 1, seed=seed)


def student_embed(student):
    """The frozen-encoder student's embeddings serve the guided teacher too: one encoder, one cache."""
    return getattr(student, "embed", None)


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def evaluate_student(student: "Student", samples: list[Sample], labels: list[str]) -> tuple[EvalReport, np.ndarray]:
    probs = student.predict_proba([s.text for s in samples])
    return evaluate([s.label for s in samples], probs, labels), probs


def run(config: DistillConfig, out: str | Path, progress: bool = True, embed=None,
        keep_model: bool = True) -> RunReport:
    """Run PGKD and write OUT/report.json, OUT/best/ and OUT/history.png.

    `embed` is the sentence encoder of the simulated guided teacher (default: MiniLM). An
    EmbeddingCache is shared with the frozen-encoder student, so each text is encoded once.
    Without `keep_model` (benchmarks) OUT/best/ is not written."""
    started = time.perf_counter()
    output = RunOutput(out)                       # checks OUT before any work
    dataset = load_dataset(config.data, config.text_column, config.label_column, seed=config.seed)
    splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
    labels = splits.labels
    cache = embed if isinstance(embed, EmbeddingCache) else None
    student = create_student(config.student, labels, seed=config.seed, device=config.device, embed=cache)
    teacher = make_simulated_teacher(config.teacher, splits.pool, seed=config.seed,
                                     label_noise=config.label_noise, embed=embed or student_embed(student))
    policy = StopPolicy(patience=config.patience, max_cycles=config.max_cycles, sample_budget=config.sample_budget,
                        min_delta=config.min_delta, metric=config.metric, lower_is_better=config.metric == "loss")
    log(f"pgkd: {dataset.name}: {len(labels)} classes, {splits.sizes()}; student {config.student} "
        f"({student.parameter_count() / 1e6:.1f}M parameters, {student.device}); teacher {teacher.name}"
        + (" (a simulation of an LLM teacher)" if teacher.simulated else ""))
    for note in dataset.notes:
        log(f"pgkd: note: {note}")
    duplicates = count_duplicates({"train": splits.train + splits.validation + splits.pool, "test": splits.test})
    if any(duplicates.values()):
        log(f"pgkd: note: duplicate texts in the data (kept): {duplicates}")

    staging = output.open()
    try:
        train, validation = list(splits.train), splits.validation
        known = {normalize_text(s.text) for s in splits.train + splits.validation + splits.test}
        cycles: list[CycleRecord] = []
        history: list[float] = []
        generated_total = 0
        best_state = None
        cycle = 0
        generated, accepted, rejected, usage = 0, 0, {}, None
        while True:
            cycle_started = time.perf_counter()
            # 1. Train: from the pretrained encoder at cycle 0, then warm-started from the best student.
            if cycle > 0:
                if config.warm_start:
                    student.load_state(best_state)
                else:
                    student = create_student(config.student, labels, seed=config.seed + cycle, device=config.device,
                                             embed=cache)
            warm = cycle > 0 and config.warm_start
            round_config = config.train_config(config.cycle_epochs if warm else config.epochs, config.seed + cycle,
                                               config.cycle_learning_rate_scale if warm else 1.0)
            trained = student.train(train, validation, round_config, progress=progress,
                                    description=f"cycle {cycle} train")
            # 2. Evaluate on validation.
            report, probs = evaluate_student(student, validation, labels)
            history.append(report.metric(config.metric))
            improved = policy.best_cycle(history) == cycle
            if improved:
                best_state, best_report = student.state(), report
            test_report = (evaluate_student(student, splits.test, labels)[0]
                           if cycle == 0 or config.track_test else None)
            if cycle == 0:
                baseline = Scores(validation=report, test=test_report)
            cycles.append(CycleRecord(
                cycle=cycle, train_size=len(train), validation=report.headline(), generated=generated,
                test=test_report.headline() if config.track_test else None,
                accepted=accepted, rejected=rejected, teacher_usage=usage or {},
                training=TrainingRound.model_validate(trained, from_attributes=True),
                improved=improved, seconds=time.perf_counter() - cycle_started))
            best_cycle = policy.best_cycle(history)
            log(f"cycle {cycle:>2}: train {len(train):>5}  val {config.metric} {history[-1]:.4f}  "
                f"acc {report.accuracy:.4f}  best {history[best_cycle]:.4f} @ {best_cycle}  "
                f"accepted {accepted}/{generated}" + (f" rejected {rejected}" if rejected else "")
                + f"  {cycles[-1].seconds:.0f}s")

            decision = policy.decide(history, generated_total)
            if decision.stop:
                break
            # 3. Mine the mistakes, 4. ask the teacher, 5. screen and add.
            cycle += 1
            mined = mine(validation, probs, labels, config.hard_negatives, config.misclassified, config.correct,
                         seed=config.seed + cycle)
            wanted = config.samples_per_cycle
            if config.sample_budget is not None:
                wanted = min(wanted, config.sample_budget - generated_total)
            request = build_request(labels, train, mined, report, n=wanted, cycle=cycle, seed=config.seed,
                                    with_report=config.guidance != "no-report",
                                    with_hard_negatives=config.guidance != "no-hard-negatives")
            batch = teacher.generate(request)
            if not batch.samples:
                decision.reason = "teacher_exhausted: the teacher returned no samples"
                break
            screened = screen(batch.samples, labels, known)
            known.update(normalize_text(s.text) for s in screened.accepted)
            train = train + screened.accepted
            generated, accepted, rejected = len(batch.samples), len(screened.accepted), screened.rejected_by_reason()
            usage = batch.usage
            generated_total += generated

        best_cycle = policy.best_cycle(history)
        student.load_state(best_state)
        best = BestScores(cycle=best_cycle, validation=best_report,
                          test=evaluate_student(student, splits.test, labels)[0])
        if keep_model:
            student.save(staging / "best")
        result = RunReport(
            pgkd_version=__version__,
            dataset={"name": dataset.name, "path": dataset.path, "classes": len(labels), "sizes": splits.sizes(),
                     "train_label_counts": label_counts(train), "duplicates": duplicates, "notes": dataset.notes},
            student={"spec": config.student, "parameters": student.parameter_count(), "device": str(student.device)},
            teacher=teacher.describe(), seed=config.seed, config=config.model_dump(), cycles=cycles,
            baseline=baseline, best=best, stop_reason=decision.reason, seconds=time.perf_counter() - started,
            environment=environment())
        plot_history(result, staging / "history.png")
        write_json_atomic(staging / "report.json", result.model_dump(mode="json"))
        output.commit()
    except BaseException:
        output.abort()
        raise
    return result


def summary_table(report: RunReport) -> str:
    b, d = report.baseline.test, report.best.test
    rows = [("", "test accuracy", "test macro-F1"),
            ("baseline (cycle 0)", f"{b.accuracy:.4f}", f"{b.macro_f1:.4f}"),
            (f"distilled (cycle {report.best.cycle})", f"{d.accuracy:.4f}", f"{d.macro_f1:.4f}"),
            ("change", f"{d.accuracy - b.accuracy:+.4f}", f"{d.macro_f1 - b.macro_f1:+.4f}")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>13}  {r[2]:>13}" for r in rows)
