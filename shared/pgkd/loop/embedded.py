"""The embedded PGKD loop: train, evaluate, mine, ask the teacher, screen, add, repeat.

Read `run` top to bottom: it is the whole method. The steps of a cycle are the functions above it;
the distributed services call the same ones (steps.py), so both compute the same run.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, field_validator
from tqdm.auto import tqdm

from pgkd import __version__
from pgkd.data import Dataset, Sample, Splits, count_duplicates, label_counts, load_dataset, make_splits, normalize_text
from pgkd.errors import UserError
from pgkd.loop.evaluation import METRICS, EvalReport, evaluate
from pgkd.students.frozen import EmbeddingCache
from pgkd.loop.mining import MiningResult, mine
from pgkd.loop.outputs import RunOutput, write_json_atomic
from pgkd.loop.report import BestScores, CycleRecord, Provenance, RunReport, Scores, TrainingRound, environment, plot_history
from pgkd.loop.screening import Screened, screen
from pgkd.teachers.simulated import TEACHERS, make_simulated_teacher
from pgkd.distributed.metrics import LoopMetrics
from pgkd.distributed.metrics_readers import LoopFigures, RegistryReader
from pgkd.loop.stopping import Decision, StopPolicy
from pgkd.students.finetuned import Student, TrainConfig
from pgkd.students import create_student
from pgkd.distributed.artifacts import ArtifactStore
from pgkd.teachers.llm import LLMSettings, LLMTeacher, ResponseCache
from pgkd.teachers.transports import TeacherURL, is_llm_teacher
from pgkd.teachers.contract import GeneratedBatch, GenerationRequest, TeacherUnavailable, TeacherUsage, build_request


class DistillConfig(BaseModel):
    """Every option of a run; recorded whole in report.json."""
    data: str
    text_column: str = "text"
    label_column: str = "label"
    labeled: int = Field(1000, gt=0)
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    teacher: str = "pool-guided"          # a simulation's name, or triton://, triton+grpc://, openai:// URL
    teacher_timeout: float = Field(120.0, gt=0)        # LLM teachers: seconds per call
    teacher_retries: int = Field(3, ge=0)
    teacher_concurrency: int = Field(4, gt=0)
    teacher_max_per_call: int = Field(32, gt=0)        # samples asked for in one call
    teacher_max_tokens: int = Field(4096, gt=0)
    teacher_temperature: float = Field(0.7, ge=0)
    price_prompt_per_1k: float = Field(0.0, ge=0)      # currency units per 1,000 prompt tokens
    price_completion_per_1k: float = Field(0.0, ge=0)
    teacher_cache: str = "file://~/.cache/pgkd"      # artifact store for LLM answers; "none" turns it off
    guidance: Literal["full", "no-report", "no-hard-negatives"] = "full"   # the paper's two ablations
    label_noise: float = Field(0.0, ge=0, le=1)
    student: str = "minilm"
    samples_per_cycle: int = Field(32, gt=0)
    max_cycles: int = Field(10, ge=0)
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    sample_budget: int | None = Field(None, gt=0)
    target_score: float | None = None                 # stop once the metric reaches it
    token_budget: int | None = Field(None, gt=0)      # stop once the teacher used this many tokens
    cost_budget: float | None = Field(None, gt=0)     # stop once the teacher cost this much
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
        if is_llm_teacher(v):
            TeacherURL.parse(v)
        elif v not in TEACHERS:
            raise ValueError(f"unknown teacher {v!r}; one of {', '.join(TEACHERS)}, or triton://HOST:PORT/MODEL, "
                             "triton+grpc://HOST:PORT/MODEL, openai://HOST:PORT/v1?model=NAME")
        return v

    def llm_settings(self) -> LLMSettings:
        return LLMSettings(timeout=self.teacher_timeout, retries=self.teacher_retries,
                           concurrency=self.teacher_concurrency, max_per_call=self.teacher_max_per_call,
                           max_tokens=self.teacher_max_tokens, temperature=self.teacher_temperature,
                           price_prompt_per_1k=self.price_prompt_per_1k,
                           price_completion_per_1k=self.price_completion_per_1k)

    def train_config(self, epochs: int, seed: int, scale: float = 1.0) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, learning_rate=self.learning_rate * scale,
                           head_learning_rate=self.head_learning_rate * scale, max_length=self.max_length,
                           patience=2 if epochs > 3 else 1, seed=seed)


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# -- The steps of a cycle. The embedded loop below and the services (steps.py) call the same ones. --

def make_policy(config: DistillConfig) -> StopPolicy:
    return StopPolicy(patience=config.patience, max_cycles=config.max_cycles, sample_budget=config.sample_budget,
                      min_delta=config.min_delta, metric=config.metric, lower_is_better=config.metric == "loss",
                      target_score=config.target_score, token_budget=config.token_budget,
                      cost_budget=config.cost_budget)


def round_config(config: DistillConfig, cycle: int, warm: bool | None = None) -> TrainConfig:
    """From the pretrained encoder at cycle 0; later rounds are warm-started, shorter and gentler
    (as is a cycle 0 that starts from an earlier student: `warm`)."""
    warm = cycle > 0 and config.warm_start if warm is None else warm
    return config.train_config(config.cycle_epochs if warm else config.epochs, config.seed + cycle,
                               config.cycle_learning_rate_scale if warm else 1.0)


def fresh_student(config: DistillConfig, labels: list[str], cycle: int, embed=None):
    """The student a round starts from when it is not warm-started."""
    return create_student(config.student, labels, seed=config.seed + cycle, device=config.device, embed=embed)


def evaluate_student(student: "Student", samples: list[Sample], labels: list[str]) -> tuple[EvalReport, np.ndarray]:
    probs = student.predict_proba([s.text for s in samples])
    return evaluate([s.label for s in samples], probs, labels), probs


def mine_mistakes(config: DistillConfig, validation: list[Sample], probs: np.ndarray, labels: list[str],
                  cycle: int) -> MiningResult:
    return mine(validation, probs, labels, config.hard_negatives, config.misclassified, config.correct,
                seed=config.seed + cycle)


def samples_wanted(config: DistillConfig, generated_total: int) -> int:
    if config.sample_budget is None:
        return config.samples_per_cycle
    return min(config.samples_per_cycle, config.sample_budget - generated_total)


def teacher_request(config: DistillConfig, labels: list[str], train: list[Sample], mined: MiningResult,
                    report: EvalReport, n: int, cycle: int) -> GenerationRequest:
    return build_request(labels, train, mined, report, n=n, cycle=cycle, seed=config.seed,
                         with_report=config.guidance != "no-report",
                         with_hard_negatives=config.guidance != "no-hard-negatives")


def known_texts(splits: Splits, train: list[Sample]) -> set[str]:
    """Texts a teacher sample must not repeat: the training set so far, validation and test."""
    return {normalize_text(s.text) for s in train + splits.validation + splits.test}


def make_teacher(config: DistillConfig, splits: Splits, embed=None, cache_store=None):
    """A simulated teacher by name, or an LLM teacher by URL whose answers are cached in `cache_store`
    (default: the store named by --teacher-cache)."""
    if is_llm_teacher(config.teacher):
        if cache_store is None and config.teacher_cache != "none":
            cache_store = ArtifactStore(config.teacher_cache.replace("~", str(Path.home()), 1))
        return LLMTeacher(config.teacher, config.llm_settings(),
                          cache=ResponseCache(cache_store) if cache_store is not None else None, seed=config.seed)
    return make_simulated_teacher(config.teacher, splits.pool, seed=config.seed, label_noise=config.label_noise,
                                  embed=embed)


def dataset_duplicates(splits: Splits) -> dict[str, int]:
    return count_duplicates({"train": splits.train + splits.validation + splits.pool, "test": splits.test})


def assemble_report(config: DistillConfig, dataset: Dataset, splits: Splits, train: list[Sample], student,
                    teacher: dict, cycles: list[CycleRecord], baseline: Scores, best: BestScores,
                    stop_reason: str, seconds: float) -> RunReport:
    return RunReport(
        pgkd_version=__version__,
        dataset={"name": dataset.name, "path": dataset.path, "classes": len(splits.labels), "sizes": splits.sizes(),
                 "train_label_counts": label_counts(train), "duplicates": dataset_duplicates(splits),
                 "notes": dataset.notes},
        student={"spec": config.student, "parameters": student.parameter_count(), "device": str(student.device)},
        teacher=teacher, teacher_usage=sum((c.teacher_usage for c in cycles), TeacherUsage()), seed=config.seed,
        config=config.model_dump(), cycles=cycles, baseline=baseline, best=best, stop_reason=stop_reason,
        seconds=seconds, environment=environment())


def log_cycle(config: DistillConfig, record: CycleRecord, history: list[float], best_cycle: int, write=None) -> None:
    line = (f"cycle {record.cycle:>2}: train {record.train_size:>5}  val {config.metric} {history[-1]:.4f}  "
            f"acc {record.validation['accuracy']:.4f}  best {history[best_cycle]:.4f} @ {best_cycle}  "
            f"accepted {record.accepted}/{record.generated}"
            + (f" rejected {record.rejected}" if record.rejected else "") + f"  {record.seconds:.0f}s")
    (write or log)(line)


def run(config: DistillConfig, out: str | Path, progress: bool = True, embed=None,
        keep_model: bool = True) -> RunReport:
    """Run PGKD and write OUT/report.json, OUT/best/ and OUT/history.png.

    `embed` is the sentence encoder of the simulated guided teacher (default: MiniLM). An
    EmbeddingCache is shared with the frozen-encoder student, so each text is encoded once.
    Without `keep_model` (benchmarks) OUT/best/ is not written."""
    started = time.perf_counter()
    output = RunOutput(out)
    staging = output.open()                       # checks OUT before any work
    try:
        return _run(config, output, staging, Path(out).name, started, progress, embed, keep_model)
    except BaseException:
        output.abort()
        raise


def _run(config: DistillConfig, output: RunOutput, staging: Path, run_name: str, started: float, progress: bool,
         embed, keep_model: bool) -> RunReport:
    dataset = load_dataset(config.data, config.text_column, config.label_column, seed=config.seed)
    splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
    labels = splits.labels
    # One sentence encoder for the frozen student and the guided teacher; it loads on first use.
    cache = embed if isinstance(embed, EmbeddingCache) else EmbeddingCache(progress=progress) if embed is None else None
    student = create_student(config.student, labels, seed=config.seed, device=config.device, embed=cache)
    teacher = make_teacher(config, splits, embed=embed or cache)
    log(f"pgkd: {dataset.name}: {len(labels)} classes, {splits.sizes()}; student {config.student} "
        f"({student.parameter_count() / 1e6:.1f}M parameters, {student.device}); teacher {teacher.name}"
        + (" (a simulation of an LLM teacher)" if teacher.simulated else ""))
    if hasattr(teacher, "check"):
        log(f"pgkd: reaching the teacher at {teacher.name} (up to {teacher.check_timeout:g} s an attempt)")
        try:
            teacher.check()
        except TeacherUnavailable as e:
            raise UserError(str(e)) from None
    policy = make_policy(config)
    for note in dataset.notes:
        log(f"pgkd: note: {note}")
    duplicates = dataset_duplicates(splits)
    if any(duplicates.values()):
        log(f"pgkd: note: duplicate texts in the data (kept): {duplicates}")

    # The stop policy reads the same metric names here as from Prometheus when the services run.
    registry = CollectorRegistry()
    metrics, reader = LoopMetrics(registry), RegistryReader(registry)
    run_usage = TeacherUsage()
    train, validation = list(splits.train), splits.validation
    known = known_texts(splits, train)
    cycles: list[CycleRecord] = []
    history: list[float] = []
    generated_total = 0
    best_state = None
    cycle = 0
    provenance = Provenance()
    while True:
        cycle_started = time.perf_counter()
        # 1. Train: from the pretrained encoder at cycle 0, then warm-started from the best student.
        if cycle > 0:
            if config.warm_start:
                student.load_state(best_state)
            else:
                student = fresh_student(config, labels, cycle, embed=cache)
        trained = student.train(train, validation, round_config(config, cycle), progress=progress,
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
        cycles.append(cycle_record(config, cycle, len(train), report, test_report, provenance, trained,
                                   improved, time.perf_counter() - cycle_started))
        log_cycle(config, cycles[-1], history, policy.best_cycle(history))
        metrics.trained(run_name, cycle, trained)
        metrics.cycle_evaluated(run_name, cycle, report.headline(), config.metric, history,
                                policy.best_cycle(history), cycles[-1].seconds)

        figures = reader.read(run_name, config.metric, cycle)
        decision = decide(policy, figures, generated_total)
        if decision.stop:
            break
        # 3. Mine the mistakes, 4. ask the teacher, 5. screen and add.
        cycle += 1
        mined = mine_mistakes(config, validation, probs, labels, cycle)
        request = teacher_request(config, labels, train, mined, report, samples_wanted(config, generated_total),
                                  cycle)
        try:
            batch = teacher.generate(request)
        except TeacherUnavailable as e:
            decision = Decision(stop=True, reason=f"{TEACHER_UNAVAILABLE}: {e}", source="teacher")
            break
        if not batch.samples and not batch.rejected:
            decision = Decision(stop=True, reason=TEACHER_EXHAUSTED, source="teacher")
            break
        screened = screen(batch.samples, labels, known)
        known.update(normalize_text(s.text) for s in screened.accepted)
        train = train + screened.accepted
        provenance = provenance_of(batch, screened)
        generated_total += provenance.generated
        run_usage = run_usage + batch.usage
        metrics.generated(run_name, batch.usage, provenance.accepted, provenance.rejected, run_usage)

    metrics.completed(run_name, "completed", decision.reason)
    log(f"pgkd: stop: {decision.reason} (decided from: {decision.source})")
    best_cycle = policy.best_cycle(history)
    student.load_state(best_state)
    best = BestScores(cycle=best_cycle, validation=best_report,
                      test=evaluate_student(student, splits.test, labels)[0])
    if keep_model:
        student.save(staging / "best")
    result = assemble_report(config, dataset, splits, train, student, teacher.describe(), cycles, baseline, best,
                             decision.reason, time.perf_counter() - started)
    plot_history(result, staging / "history.png")
    write_json_atomic(staging / "report.json", result.model_dump(mode="json"))
    output.commit()
    return result


def decide(policy: StopPolicy, figures: LoopFigures, generated_total: int) -> Decision:
    decision = policy.decide(figures.history, generated_total, figures.tokens, figures.cost)
    decision.source = figures.source
    return decision


TEACHER_EXHAUSTED = "teacher_exhausted: the teacher returned no samples"
TEACHER_UNAVAILABLE = "teacher_unavailable"


def provenance_of(batch: GeneratedBatch, screened: Screened) -> Provenance:
    """`generated` counts the samples the teacher's answers held; `rejected` also counts, by reason,
    answers that held none (unparseable_answer) and list items that were not samples."""
    return Provenance(generated=len(batch.samples), accepted=len(screened.accepted),
                      rejected={**batch.rejected, **screened.rejected_by_reason()}, teacher_usage=batch.usage)


def cycle_record(config: DistillConfig, cycle: int, train_size: int, report: EvalReport,
                 test_report: EvalReport | None, provenance: Provenance, trained, improved: bool,
                 seconds: float) -> CycleRecord:
    return CycleRecord(
        cycle=cycle, train_size=train_size, validation=report.headline(),
        test=test_report.headline() if config.track_test else None,
        generated=provenance.generated, accepted=provenance.accepted, rejected=provenance.rejected,
        teacher_usage=provenance.teacher_usage,
        training=TrainingRound.model_validate(trained, from_attributes=True), improved=improved, seconds=seconds)


def summary_table(report: RunReport) -> str:
    b, d = report.baseline.test, report.best.test
    rows = [("", "test accuracy", "test macro-F1"),
            ("baseline (cycle 0)", f"{b.accuracy:.4f}", f"{b.macro_f1:.4f}"),
            (f"distilled (cycle {report.best.cycle})", f"{d.accuracy:.4f}", f"{d.macro_f1:.4f}"),
            ("change", f"{d.accuracy - b.accuracy:+.4f}", f"{d.macro_f1 - b.macro_f1:+.4f}")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>13}  {r[2]:>13}" for r in rows)
