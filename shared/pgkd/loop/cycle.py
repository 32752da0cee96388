"""One PGKD cycle, phase by phase, written once: train, evaluate and decide, mine, teach (ask the
teacher and screen its answer), and finish the run. The embedded run (embedded.py) calls them in
order in one process; each service calls one of them (pgkd.distributed.steps), so both compute the
same run."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pgkd import __version__
from pgkd.data import Dataset, Splits, count_duplicates, label_counts, normalize_text
from pgkd.types import (EvalReport, GeneratedBatch, GenerationRequest, MiningResult, Sample, TeacherUnavailable,
                        TeacherUsage, TrainResult)
from pgkd.errors import Option, UserError
from pgkd.loop.config import DistillConfig
from pgkd.loop.evaluation import evaluate
from pgkd.loop.guidance import Guidance, out_of_fold_guidance, validation_guidance
from pgkd.loop.mining import mine
from pgkd.loop.report import (BestScores, CycleRecord, PhaseTimes, Provenance, RunReport, Scores, Selection,
                              TrainingRound, environment)
from pgkd.loop.screening import screen
from pgkd.calibration import Calibration, calibrate
from pgkd.students import create_student
from pgkd.taxonomy import Taxonomy

TEACHER_EXHAUSTED = "teacher_exhausted: the teacher returned no samples"
TEACHER_UNAVAILABLE = "teacher_unavailable"


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# -- 1. train ----------------------------------------------------------------------------------------------

def fresh_student(config: DistillConfig, labels: list[str], cycle: int, embed=None):
    """A student from the pretrained encoder, seeded by the cycle."""
    return create_student(config.student, labels, seed=config.seed + cycle, device=config.device, embed=embed)


def round_student(config: DistillConfig, labels: list[str], cycle: int, best, embed=None):
    """The student a cycle's round trains: warm-started from the best so far (`best()` gives it), or
    fresh with --no-warm-start."""
    return best() if config.warm_start else fresh_student(config, labels, cycle, embed)


def train_round(config: DistillConfig, student, train: list[Sample], validation: list[Sample], cycle: int,
                warm: bool | None = None, progress: bool = False, name: str = "") -> TrainResult:
    trained = student.train(train, validation, config.round_config(cycle, warm), progress=progress,
                            description=f"{name}cycle {cycle} train")
    return trained if trained is not None else TrainResult(samples=len(train))   # a student that reports nothing


# -- 2. evaluate and decide --------------------------------------------------------------------------------

def evaluate_student(student, samples: list[Sample], labels: list[str]) -> tuple[EvalReport, np.ndarray]:
    probs = student.predict_proba([s.text for s in samples])
    return evaluate([s.label for s in samples], probs, labels), probs


@dataclass
class Evaluation:
    validation: EvalReport
    probs: np.ndarray                # the student's validation probabilities, for mining
    test: EvalReport | None          # at cycle 0 (the baseline) and with --track-test only
    selection: EvalReport | None = None   # out-of-fold scores, with --selection-source out-of-fold

    @property
    def decisive(self) -> EvalReport:
        """The scores that pick the best cycle and stop the run."""
        return self.selection if self.selection is not None else self.validation


def evaluate_cycle(config: DistillConfig, student, splits: Splits, cycle: int, train: list[Sample] | None = None,
                   embed=None) -> Evaluation:
    """The student on validation (and on test at cycle 0); with out-of-fold selection, also fold
    students of its recipe on the labeled train samples, trained on the rest of `train`, the cycle's
    training set."""
    report, probs = evaluate_student(student, splits.validation, splits.labels)
    test = evaluate_student(student, splits.test, splits.labels)[0] if cycle == 0 or config.track_test else None
    selection = None
    if config.selection_source == "out-of-fold":
        selection = out_of_fold(config, splits, train, cycle, embed).report
    return Evaluation(report, probs, test, selection)


def fold_student_maker(config: DistillConfig, labels: list[str], cycle: int, embed=None):
    """The fresh students of out-of-fold computations: the run's recipe, or --guidance-student's."""
    spec = config.guidance_student or config.student
    if spec.startswith("python:"):
        raise UserError("out-of-fold guidance or selection trains fold students by name: with a student object, "
                        "name a recipe with guidance_student (for example 'minilm-frozen')")
    return lambda k: create_student(spec, labels, seed=config.seed + cycle, device=config.device, embed=embed)


def out_of_fold(config: DistillConfig, splits: Splits, train: list[Sample], cycle: int, embed=None) -> Guidance:
    """Fold students' predictions over the labeled train samples (the first of `train`), each trained
    on the other folds plus the teacher's samples (the rest of `train`), and their scores."""
    labeled = train[:len(splits.train)]
    return out_of_fold_guidance(labeled, train[len(splits.train):], splits.validation, splits.labels,
                                config.guidance_folds, seed=config.seed + cycle,
                                make_student=fold_student_maker(config, splits.labels, cycle, embed),
                                train_config=config.round_config(0, warm=False))


def cycle_record(config: DistillConfig, cycle: int, train_size: int, evaluation: Evaluation,
                 provenance: Provenance, trained: TrainingRound, improved: bool, timings: PhaseTimes) -> CycleRecord:
    return CycleRecord(
        cycle=cycle, train_size=train_size, validation=evaluation.validation.headline(),
        selection=evaluation.selection.headline() if evaluation.selection is not None else None,
        test=evaluation.test.headline() if config.track_test else None,
        generated=provenance.generated, accepted=provenance.accepted, rejected=provenance.rejected,
        teacher_usage=provenance.teacher_usage,
        training=trained, improved=improved, seconds=timings.total, timings=timings)


# -- 3. guide and mine -------------------------------------------------------------------------------------

def guidance_cycle(config: DistillConfig, splits: Splits, train: list[Sample], evaluation_report: EvalReport,
                   probs: np.ndarray, cycle: int, embed=None) -> Guidance:
    """What cycle `cycle`'s request shows the teacher (pgkd.loop.guidance): the validation report and
    probabilities as they are, or out-of-fold ones over the labeled train samples. `train` is the
    cycle's training set: the labeled train samples first, then the teacher's."""
    if config.guidance_source == "validation":
        return validation_guidance(splits.validation, evaluation_report, probs)
    return out_of_fold(config, splits, train, cycle, embed)


def mine_cycle(config: DistillConfig, samples: list[Sample], probs: np.ndarray, labels: list[str],
               cycle: int) -> MiningResult:
    """The student's hard negatives, misclassified and correct samples, for cycle `cycle`'s request."""
    return mine(samples, probs, labels, config.hard_negatives, config.misclassified, config.correct,
                seed=config.seed + cycle)


# -- 4. teach: ask the teacher, screen its answer ----------------------------------------------------------

def build_request(config: DistillConfig, labels: list[str], train: list[Sample], mined: MiningResult,
                  report: EvalReport, n: int, cycle: int, taxonomy: Taxonomy | None = None,
                  examples_per_class: int = 1, max_examples: int = 40) -> GenerationRequest:
    """The guidance of one cycle, less what --guidance leaves out. Few-shot examples come from the
    weakest classes first (by validation F1 when the report is shown), so a long taxonomy still fits
    a prompt; a class without train samples shows the examples of the taxonomy file, if it has any.
    The report keeps only the classes scored on --report-min-support samples or more."""
    with_report = config.guidance != "no-report"
    rng = random.Random(config.seed * 1_000_003 + cycle)
    by_label: dict[str, list[Sample]] = {}
    for s in train:
        by_label.setdefault(s.label, []).append(s)
    for c in (taxonomy.classes if taxonomy else ()):
        if c.label not in by_label and c.examples:
            by_label[c.label] = [Sample(text=t, label=c.label) for t in c.examples]
    order = list(labels)
    if with_report:
        order.sort(key=lambda c: report.per_class[c].f1 if c in report.per_class and report.per_class[c].support
                   else 1.0)
    examples: list[Sample] = []
    for label in order:
        group = by_label.get(label, [])
        examples.extend(rng.sample(group, min(examples_per_class, len(group))))
        if len(examples) >= max_examples:
            break
    shown = None
    if with_report:
        shown = report.model_copy(update={"per_class": {c: s for c, s in report.per_class.items()
                                                        if s.support >= config.report_min_support}})
    return GenerationRequest(taxonomy=labels, examples=examples[:max_examples], report=shown,
                             hard_negatives=mined.hard_negatives if config.guidance != "no-hard-negatives" else [],
                             misclassified=mined.misclassified, correct=mined.correct, n=n, cycle=cycle,
                             descriptions=taxonomy.descriptions if taxonomy else {},
                             report_min_support=config.report_min_support)


def known_texts(splits: Splits, train: list[Sample]) -> set[str]:
    """Texts a teacher sample must not repeat: the training set so far, validation and test."""
    return {normalize_text(s.text) for s in train + splits.validation + splits.test}


@dataclass
class Lesson:
    """What one request to the teacher gave: the screened samples, and their provenance; or why the
    run must stop (the teacher is unavailable, or has nothing left to give)."""
    accepted: list[Sample] = field(default_factory=list)
    provenance: Provenance = field(default_factory=Provenance)
    stop_reason: str | None = None


def teach(config: DistillConfig, teacher, splits: Splits, train: list[Sample], mined: MiningResult,
          report: EvalReport, wanted: int, cycle: int) -> Lesson:
    request = build_request(config, splits.labels, train, mined, report, wanted, cycle, taxonomy=splits.taxonomy)
    try:
        batch = teacher.generate(request)
    except TeacherUnavailable as e:
        return Lesson(stop_reason=f"{TEACHER_UNAVAILABLE}: {e}")
    if not batch.samples and not batch.rejected:
        return Lesson(stop_reason=TEACHER_EXHAUSTED)
    screened = screen(batch.samples, splits.labels, known_texts(splits, train))
    return Lesson(accepted=screened.accepted, provenance=provenance_of(batch, screened))


def provenance_of(batch: GeneratedBatch, screened) -> Provenance:
    """`generated` counts the samples the teacher's answers held; `rejected` also counts, by reason,
    answers that held none (unparseable_answer) and list items that were not samples."""
    return Provenance(generated=len(batch.samples), accepted=len(screened.accepted),
                      rejected={**batch.rejected, **screened.rejected_by_reason()}, teacher_usage=batch.usage)


# -- 5. finish ---------------------------------------------------------------------------------------------

def finish(config: DistillConfig, dataset: Dataset, splits: Splits, best_student, best_cycle: int,
           cycles: list[CycleRecord], best_validation: EvalReport, baseline: Scores,
           final_train: list[Sample], teacher: dict, stop_reason: str, seconds: float,
           calibration: Calibration | None = None) -> RunReport:
    """The run's report: the kept student (the best cycle's) scored once on test, against the baseline."""
    best = BestScores(cycle=best_cycle, validation=best_validation,
                      test=evaluate_student(best_student, splits.test, splits.labels)[0])
    return RunReport(
        pgkd_version=__version__,
        dataset={"name": dataset.name, "path": dataset.path, "classes": len(splits.labels), "sizes": splits.sizes(),
                 "train_label_counts": label_counts(final_train), "duplicates": dataset_duplicates(splits),
                 "notes": dataset.notes, **_taxonomy_record(dataset)},
        student={"spec": config.student, "parameters": parameter_count(best_student),
                 "device": str(getattr(best_student, "device", "cpu"))},
        teacher=teacher, teacher_usage=sum((c.teacher_usage for c in cycles), TeacherUsage()), seed=config.seed,
        config=config.model_dump(), cycles=cycles,
        baseline=baseline, best=best, stop_reason=stop_reason,
        seconds=seconds, environment=environment(),
        selection=selection_note(config, splits, cycles[best_cycle]),
        calibration=None if calibration is None else calibration.record())


def calibrate_student(config: DistillConfig, student, splits: Splits, shown: list[int]) -> Calibration:
    """Calibrate the kept student on the validation texts, and choose the cascade's threshold there when
    --target-accuracy or --max-teacher-share asks for one. Guided out of fold, the teacher never saw them;
    guided by validation, it was shown some (`shown`, its mistakes above all): T is still fit on all of them
    (leaving the shown ones out would keep mostly the texts the student gets right, a worse bias), the record
    says how many were shown, and no threshold is chosen on them (the config refuses a target then). They
    also selected the best cycle when validation selects. Test is never used. The student is left
    uncalibrated: the caller attaches it once test is scored as the baseline was."""
    held = splits.validation
    seen = len(set(shown))
    index = {label: i for i, label in enumerate(splits.labels)}
    source = (f"the {len(held)} validation texts"
              + (f", {seen} of which the teacher was shown (guided by validation)" if seen else
                 ", which the teacher never saw")
              + ("; they also selected the best cycle" if config.selection_source == "validation" else ""))
    if hasattr(student, "calibration"):
        student.calibration = None          # its own probabilities are what is calibrated
    probs = np.asarray(student.predict_proba([s.text for s in held])) if held else np.zeros((0, len(splits.labels)))
    return calibrate(probs, np.array([index[s.label] for s in held], dtype=np.int64), source,
                     config.target_accuracy, config.max_teacher_share, labels=splits.labels, shown_to_teacher=seen)


def _taxonomy_record(dataset: Dataset) -> dict:
    if dataset.taxonomy is None:
        return {}
    return {"taxonomy": dataset.taxonomy.record(sorted({s.label for s in dataset.train}))}


def selection_note(config: DistillConfig, splits: Splits, best: CycleRecord) -> Selection:
    if config.selection_source == "out-of-fold":
        return Selection(split=f"out-of-fold over the labeled train samples ({config.guidance_folds} folds)",
                         samples=len(splits.train), shown_to_teacher=False, scores=best.selection)
    return Selection(samples=len(splits.validation), shown_to_teacher=config.guidance_source == "validation",
                     scores=best.validation)


def parameter_count(student) -> int | None:
    return student.parameter_count() if callable(getattr(student, "parameter_count", None)) else None


def dataset_duplicates(splits: Splits) -> dict[str, int]:
    return count_duplicates({"train": splits.train + splits.validation + splits.pool, "test": splits.test})


def make_teacher(config: DistillConfig, splits: Splits, embed=None, cache_store=None):
    """A simulated teacher by name, or an LLM teacher by URL whose answers are cached in `cache_store`
    (default: the store named by --teacher-cache)."""
    from pgkd.teachers.llm import LLMTeacher, ResponseCache
    from pgkd.teachers.simulated import make_simulated_teacher
    from pgkd.teachers.transports import is_llm_teacher
    if config.teacher.startswith("python:"):
        raise UserError(Option("teacher", config.teacher), ": a teacher object is given to pgkd.distill, not named")
    if is_llm_teacher(config.teacher):
        if cache_store is None and config.teacher_cache != "none":
            from pgkd.artifacts import ArtifactStore
            cache_store = ArtifactStore(config.teacher_cache.replace("~", str(Path.home()), 1),
                                        named=Option("teacher_cache", config.teacher_cache))
            cache_store.claim()    # a folder of someone else's is refused now, before any training
        return LLMTeacher(config.teacher, config.llm_settings(),
                          cache=ResponseCache(cache_store) if cache_store is not None else None, seed=config.seed)
    return make_simulated_teacher(config.teacher, splits.pool, seed=config.seed, label_noise=config.label_noise,
                                  embed=embed)
