"""The distributed loop's steps: one function per service, from one message to the next.

Each step reads what it needs of the run from the artifact store, calls the phase of the cycle the
embedded loop calls (pgkd.loop.cycle), writes its artifacts and returns the message to publish. The
steps know nothing of the bus; services/ wires them to it.

What a run keeps in the store, under runs/<run_id>/:
    request.json            the RunRequested message (configuration and source dataset)
    train/v0003.jsonl       the training set of cycle 3: the seed set plus each accepted batch
    checkpoints/cycle-0003.json  the student of cycle 3: a manifest of its Hugging Face folder's files,
                            each a content-addressed blob under blobs/sha256/ of the store (shared by
                            every checkpoint that holds the same bytes: the frozen word embeddings)
    cycles/0003.json        the cycle's record and full validation report
    probs/0003.npy          the student's validation probabilities, which the miner mines
    guidance/0003.json      the scores the miner showed the teacher after cycle 3 (out-of-fold guidance)
    teacher/state-0003.json the simulated teacher's state after answering cycle 3
    report.json, history.png, completed.json (the RunCompleted message) when the run ends
Everything a step writes is a function of its input message, so running a step twice (a
redelivered message) writes the same bytes again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from pgkd.distributed.artifacts import ArtifactRef, ArtifactStore, sha256_of
from pgkd.data import Dataset, Sample, Splits, load_dataset, make_splits
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import (
    cycle_record,
    evaluate_cycle,
    evaluate_student,
    finish,
    fresh_student,
    guidance_cycle,
    make_teacher,
    mine_cycle,
    round_student,
    stop_decision,
    teach,
    train_round,
)
from pgkd.loop.evaluation import EvalReport
from pgkd.distributed.messages import (
    CycleEvaluated,
    ModelTrained,
    NegativesMined,
    RunCompleted,
    RunRequested,
    SamplesGenerated,
    StudentPromoted,
)
from pgkd.distributed.metrics import LoopMetrics
from pgkd.distributed.runs import RunFiles, fail_run  # noqa: F401 -- the services and tests take them from here too
from pgkd.distributed.metrics_readers import MetricsUnavailable
from pgkd.loop.report import CycleRecord, Provenance, TrainingRound, plot_history
from pgkd.names import check_name
from pgkd.students import load_student
from pgkd.teachers.contract import TeacherUsage

if TYPE_CHECKING:
    from pgkd.students.frozen import EmbeddingCache

log = logging.getLogger("pgkd.distributed.steps")


class CycleState(BaseModel):
    """What the evaluator keeps of a cycle: the report row, the full validation report, and the
    student and training set it belongs to."""
    record: CycleRecord
    validation: EvalReport
    test: EvalReport | None
    checkpoint: ArtifactRef
    train_set: ArtifactRef
    validation_probs: ArtifactRef | None = None   # the student's, a row per validation sample (none in older runs)
    selection: EvalReport | None = None    # out-of-fold selection scores (--selection-source out-of-fold)

    @property
    def decisive(self) -> EvalReport:
        return self.selection if self.selection is not None else self.validation


def checkpoint_cache() -> Path:
    return Path(os.environ.get("PGKD_CACHE") or Path(tempfile.gettempdir()) / "pgkd-cache")


_embeddings: EmbeddingCache | None = None


def shared_embeddings() -> EmbeddingCache:
    """One sentence-embedding cache per process, for the frozen-encoder student and the guided
    teacher: MiniLM is loaded once and each text encoded once, however many cycles pass."""
    global _embeddings
    if _embeddings is None:
        from pgkd.students.frozen import EmbeddingCache   # torch: imported by the steps that embed, not at start
        _embeddings = EmbeddingCache()
    return _embeddings


def forget_process_state() -> None:
    """What a fresh process has: no sentence embeddings, no run contexts (benchmarks, tests)."""
    global _embeddings
    _embeddings = None
    _contexts.clear()


# -- submitting ----------------------------------------------------------------------------------------------

def new_run_id(dataset_name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset_name).strip("-_.")[:32] or "run"   # a name (pgkd.names)
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _dataset_json(dataset: Dataset) -> dict:
    rows = lambda samples: [s.model_dump() for s in samples]  # noqa: E731
    return {"name": dataset.name, "path": dataset.path, "notes": dataset.notes, "train": rows(dataset.train),
            "validation": rows(dataset.validation), "test": rows(dataset.test)}


def _put_dataset(store: ArtifactStore, data: dict) -> ArtifactRef:
    """Content-addressed: the same data submitted twice is stored once."""
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return store.put_json(f"datasets/{digest}.json", data)


def submit(config: DistillConfig, store: ArtifactStore, run_id: str | None = None) -> RunRequested:
    """Check and store the data, and record the run (in-process callers; `pgkd submit` records only
    once the bus is known to be reachable)."""
    request = prepare_request(config, store, run_id)
    record_request(store, request)
    return request


def prepare_request(config: DistillConfig, store: ArtifactStore, run_id: str | None = None) -> RunRequested:
    """Check the data here, where a mistake can still be one line on the submitter's terminal, then
    store it (content-addressed). The run itself is not recorded: `record_request` does that."""
    if run_id is not None:
        check_name(run_id, "run id")
    dataset = load_dataset(config.data, config.text_column, config.label_column, seed=config.seed)
    make_splits(dataset, config.labeled, config.seed, config.validation_fraction)  # raises on a bad --labeled
    return RunRequested(run_id=run_id or new_run_id(dataset.name), cycle=0, config=config.model_dump(),
                        dataset=_put_dataset(store, _dataset_json(dataset)))


def record_request(store: ArtifactStore, request: RunRequested) -> None:
    """The run's request in the store, where every service reads its configuration."""
    store.put_json(RunFiles(request.run_id).request, request.model_dump(mode="json"))


def submit_splits(config: DistillConfig, name: str, splits: Splits, store: ArtifactStore, run_id: str,
                  start_from: ArtifactRef | None = None) -> RunRequested:
    """A run on splits made elsewhere (a stream's grown dataset), not drawn from a file: the dataset
    artifact holds them as they are, and cycle 0 may warm-start from a checkpoint."""
    rows = lambda samples: [s.model_dump() for s in samples]  # noqa: E731
    data = {"name": name, "path": config.data, "notes": [], "splits": {
        "labels": splits.labels, "train": rows(splits.train), "validation": rows(splits.validation),
        "pool": rows(splits.pool), "test": rows(splits.test)}}
    request = RunRequested(run_id=run_id, cycle=0, config=config.model_dump(), dataset=_put_dataset(store, data),
                           start_from=start_from)
    store.put_json(RunFiles(run_id).request, request.model_dump(mode="json"))
    return request


# -- what every step needs of a run ------------------------------------------------------------------------

@dataclass
class RunContext:
    request: RunRequested
    config: DistillConfig
    dataset: Dataset
    splits: Splits
    files: RunFiles
    teacher: object | None = None     # made on the first request, then reset to a stored state per cycle
    teacher_initial: dict | None = None

    @property
    def labels(self) -> list[str]:
        return self.splits.labels


_contexts: OrderedDict[tuple[str, str], RunContext] = OrderedDict()


def run_context(store: ArtifactStore, run_id: str) -> RunContext:
    """The run's configuration and splits, rebuilt from the store (and kept for a few runs)."""
    cache_key = (store.url, run_id)
    if cache_key in _contexts:
        _contexts.move_to_end(cache_key)
        return _contexts[cache_key]
    files = RunFiles(run_id)
    request = store.get_model(files.request, RunRequested)
    config = DistillConfig.model_validate(request.config)
    raw = store.get_json(request.dataset)
    if "splits" in raw:  # made by submit_splits
        given = raw["splits"]
        rows = lambda name: [Sample.model_validate(r) for r in given[name]]  # noqa: E731
        splits = Splits(labels=given["labels"], train=rows("train"), validation=rows("validation"), pool=rows("pool"),
                        test=rows("test"))
        dataset = Dataset(name=raw["name"], path=raw["path"], train=splits.train + splits.pool,
                          validation=splits.validation, test=splits.test, notes=raw["notes"])
    else:
        rows = lambda name: [Sample.model_validate(r) for r in raw[name]]  # noqa: E731
        dataset = Dataset(name=raw["name"], path=raw["path"], train=rows("train"), validation=rows("validation"),
                          test=rows("test"), notes=raw["notes"])
        splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
    context = RunContext(request, config, dataset, splits, files)
    _contexts[cache_key] = context
    while len(_contexts) > 4:
        _contexts.popitem(last=False)
    return context


def _put_samples(store: ArtifactStore, key: str, samples: list[Sample]) -> ArtifactRef:
    return store.put_bytes(key, "".join(s.model_dump_json() + "\n" for s in samples).encode())


def read_samples_artifact(store: ArtifactStore, ref: ArtifactRef) -> list[Sample]:
    return [Sample.model_validate_json(line) for line in store.get_bytes(ref).decode().splitlines() if line]


def store_checkpoint(store: ArtifactStore, key: str, student) -> ArtifactRef:
    """The student's Hugging Face folder as a manifest of content-addressed files: only the files
    that changed are written (training leaves the word embeddings as they are), and the folder is
    left unpacked in this machine's checkpoint cache, so that no service here reads it back."""
    if hasattr(student, "checkpoint_files"):
        files = student.checkpoint_files()
    else:   # any other student: the folder its `save` writes
        with tempfile.TemporaryDirectory() as folder:
            student.save(folder)
            files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return store.put_files(key, files, cache=checkpoint_cache())


def load_checkpoint(store: ArtifactStore, ref: ArtifactRef, device: str):
    """A stored student, unpacked once into the local checkpoint cache."""
    student = load_student(store.get_folder(ref, checkpoint_cache()), device=device)
    if hasattr(student, "embed"):
        student.embed = shared_embeddings()
    return student


def export_checkpoint(store: ArtifactStore, uri: str, out: str | Path) -> Path:
    """A stored checkpoint, named by its URI alone, as a model folder of its own: each file is checked
    against the sha256 its manifest gives."""
    data = store.get_bytes(store.key_of(uri))
    ref = ArtifactRef(uri=uri, sha256=sha256_of(data), size=len(data))
    with tempfile.TemporaryDirectory() as cache:
        shutil.copytree(store.get_folder(ref, cache), out, ignore=shutil.ignore_patterns(".complete"),
                        dirs_exist_ok=True)
    return Path(out)


# -- trainer ---------------------------------------------------------------------------------------------

def train(message: RunRequested | SamplesGenerated, store: ArtifactStore, progress: bool = False) -> ModelTrained:
    """Cycle 0 from the labeled seed set; cycle k from version k-1 plus the accepted samples,
    warm-started from the best student so far."""
    ctx = run_context(store, message.run_id)
    config, cycle = ctx.config, message.cycle
    warm = None
    if isinstance(message, RunRequested):
        train_set, provenance, started = list(ctx.splits.train), Provenance(), message.submitted_at
        if message.start_from is not None:  # a stream's run: from its best student, its head grown to new labels
            student, warm = load_checkpoint(store, message.start_from, config.device).with_labels(ctx.labels), True
        else:
            student = fresh_student(config, ctx.labels, 0, embed=shared_embeddings())
    else:
        train_set = read_samples_artifact(store, message.train_set) + message.samples
        provenance, started = message.provenance, message.cycle_started
        student = round_student(config, ctx.labels, cycle, embed=shared_embeddings(),
                                best=lambda: load_checkpoint(store, message.best_checkpoint, config.device))
    train_ref = _put_samples(store, ctx.files.train_set(cycle), train_set)
    trained = train_round(config, student, train_set, ctx.splits.validation, cycle, warm, progress=progress,
                          name=f"{message.run_id} ")
    checkpoint = store_checkpoint(store, ctx.files.checkpoint(cycle), student)
    return ModelTrained(run_id=message.run_id, cycle=cycle, checkpoint=checkpoint, train_set=train_ref,
                        train_size=len(train_set), training=TrainingRound.model_validate(trained, from_attributes=True),
                        provenance=provenance, cycle_started=started)


# -- evaluator -------------------------------------------------------------------------------------------

def cycle_states(store: ArtifactStore, ctx: RunContext, up_to: int) -> list[CycleState]:
    """The evaluated cycles 0..up_to-1, in order; a gap means a message came out of order."""
    states = []
    for cycle in range(up_to):
        key = ctx.files.cycle_state(cycle)
        if not store.exists(key):
            raise RuntimeError(f"run {ctx.request.run_id}: cycle {cycle} was never evaluated")
        states.append(store.get_model(key, CycleState))
    return states


def evaluate(message: ModelTrained, store: ArtifactStore, metrics: LoopMetrics | None = None,
             reader=None) -> CycleEvaluated | RunCompleted:
    """Score the student on validation, record the cycle, export the run's metrics, and let the stop
    policy decide on what `reader` (Prometheus, or a metrics registry) reads back; without a reader,
    or when it cannot answer, on the run's own records, saying so."""
    ctx = run_context(store, message.run_id)
    config, cycle, policy = ctx.config, message.cycle, ctx.config.policy()
    student = load_checkpoint(store, message.checkpoint, config.device)
    train_set = read_samples_artifact(store, message.train_set) if config.selection_source == "out-of-fold" else None
    evaluation = evaluate_cycle(config, student, ctx.splits, cycle, train=train_set, embed=shared_embeddings())
    states = cycle_states(store, ctx, cycle)
    history = [s.decisive.metric(config.metric) for s in states] + [evaluation.decisive.metric(config.metric)]
    best_cycle = policy.best_cycle(history)
    record = cycle_record(config, cycle, message.train_size, evaluation, message.provenance, message.training,
                          best_cycle == cycle, time.time() - message.cycle_started)
    probs = io.BytesIO()
    np.save(probs, np.asarray(evaluation.probs), allow_pickle=False)
    state = CycleState(record=record, validation=evaluation.validation, test=evaluation.test, selection=evaluation.selection,
                       checkpoint=message.checkpoint, train_set=message.train_set,
                       validation_probs=store.put_bytes(ctx.files.validation_probs(cycle), probs.getvalue()))
    store.put_json(ctx.files.cycle_state(cycle), state.model_dump(mode="json"))
    states.append(state)
    if metrics is not None:  # every cycle again: a restarted evaluator exports the whole run
        for s in states:
            c = s.record.cycle
            metrics.cycle_evaluated(message.run_id, c, s.record.validation, config.metric, history[:c + 1],
                                    policy.best_cycle(history[:c + 1]), record.seconds if c == cycle else None,
                                    selection=s.record.selection)
    records = [s.record for s in states]
    decision = stop_decision(config, history, records)
    if reader is not None:
        try:
            read = reader.read(message.run_id, config.metric, cycle)
            # Spend: the larger of what the metrics and the records say (the generator's gauges can
            # only be ahead of the records, never behind, unless its metrics were lost).
            usage = sum((r.teacher_usage for r in records), TeacherUsage())
            decision = stop_decision(config, read.history, records, read.source,
                                     tokens=max(read.tokens, usage.prompt_tokens + usage.completion_tokens),
                                     cost=max(read.cost, usage.cost))
        except MetricsUnavailable as e:
            decision.source = f"run records, because {e}"
            log.warning("evaluator: run %s cycle %d: deciding on the run's records: %s", message.run_id, cycle, e)
    log.info("evaluator: run %s cycle %d: %s (decided from: %s)", message.run_id, cycle,
             decision.reason if decision.stop else "continue", decision.source)
    if decision.stop:
        if metrics is not None:
            metrics.completed(message.run_id, "completed", decision.reason)
        return complete_run(store, ctx, states, decision.reason, cycle, decided_from=decision.source)
    return CycleEvaluated(run_id=message.run_id, cycle=cycle, checkpoint=message.checkpoint,
                          train_set=message.train_set, best_checkpoint=states[best_cycle].checkpoint,
                          best_cycle=best_cycle, validation=evaluation.validation.headline(),
                          samples_generated=sum(r.generated for r in records))


def run_teacher_usage(store: ArtifactStore, run_id: str, provenance: Provenance) -> TeacherUsage:
    """The run's teacher usage so far: the evaluated cycles' records plus a cycle just generated."""
    ctx = run_context(store, run_id)
    keys = store.list(ctx.files.cycles)
    return sum((store.get_model(k, CycleState).record.teacher_usage for k in keys),
               provenance.teacher_usage)


def complete_run(store: ArtifactStore, ctx: RunContext, states: list[CycleState], reason: str,
                 cycle: int, decided_from: str = "teacher") -> RunCompleted:
    """Score the best student on test and write the run's report.json and history.png."""
    config = ctx.config
    best_cycle = config.policy().best_cycle([s.decisive.metric(config.metric) for s in states])
    best_state = states[best_cycle]
    student = load_checkpoint(store, best_state.checkpoint, config.device)
    teacher = (store.get_json(ctx.files.teacher) if store.exists(ctx.files.teacher)
               else make_teacher(config, ctx.splits).describe())
    records = [s.record for s in states]
    for record in records:
        if record.cycle < cycle:     # the miner showed the teacher this cycle's scores
            record.guidance = (record.validation if config.guidance_source == "validation"
                               else store.get_json(ctx.files.guidance(record.cycle)))
    report = finish(config, ctx.dataset, ctx.splits, student, best_cycle, records,
                    [s.validation for s in states], states[0].test, read_samples_artifact(store, states[-1].train_set),
                    teacher, reason, time.time() - ctx.request.submitted_at)
    with tempfile.TemporaryDirectory() as folder:
        plot_history(report, Path(folder) / "history.png")
        store.put_bytes(ctx.files.plot, (Path(folder) / "history.png").read_bytes())
    report_ref = store.put_json(ctx.files.report, report.model_dump(mode="json"))
    completed = RunCompleted(run_id=ctx.request.run_id, cycle=cycle, status="completed", reason=reason,
                             report=report_ref, best_checkpoint=best_state.checkpoint, best_cycle=best_cycle,
                             test=report.best.test.headline(), decided_from=decided_from)
    store.put_json(ctx.files.completed, completed.model_dump(mode="json"))
    return completed


# -- promotion to serving ---------------------------------------------------------------------------------

def latest_promotion_key(model: str) -> str:
    return f"promotions/{check_name(model, 'model')}/latest.json"


def record_promotion(store: ArtifactStore, promoted: StudentPromoted) -> StudentPromoted:
    """Keep `promoted` as its model's latest promotion (unless a later one is kept already): a
    deployer that starts beside a new server replica serves that one first."""
    key = latest_promotion_key(promoted.model)
    kept = latest_promotion(store, promoted.model)
    if kept is None or kept.promoted_at <= promoted.promoted_at:
        store.put_json(key, promoted.model_dump(mode="json"))
    return promoted


def latest_promotion(store: ArtifactStore, model: str) -> StudentPromoted | None:
    key = latest_promotion_key(model)
    return store.get_model(key, StudentPromoted) if store.exists(key) else None


def with_promotion(store: ArtifactStore, output):
    """A run submitted with --promote that completed: its RunCompleted and its best student's
    StudentPromoted. Any other output as it is."""
    if not isinstance(output, RunCompleted) or output.status != "completed":
        return output
    request = store.get_model(RunFiles(output.run_id).request, RunRequested)
    if not request.promote:
        return output
    best = store.get_model(RunFiles(output.run_id).cycle_state(output.best_cycle), CycleState)
    scores = {f"validation_{k}": v for k, v in best.validation.headline().items()}
    scores |= {f"test_{k}": v for k, v in (output.test or {}).items()}
    promoted = StudentPromoted(run_id=output.run_id, cycle=output.best_cycle, checkpoint=output.best_checkpoint,
                               scores=scores, source="run",
                               decision=f"run {output.run_id} completed ({output.reason}); submitted with --promote")
    return [output, record_promotion(store, promoted)]


# -- miner -----------------------------------------------------------------------------------------------

def mine(message: CycleEvaluated, store: ArtifactStore) -> NegativesMined:
    """The mistakes of the student just evaluated, for the next cycle's teacher request: mined from
    the validation probabilities the evaluator stored, as the embedded run mines its evaluation's
    (the student runs again only for a cycle recorded without them, or for another checkpoint); or,
    with out-of-fold guidance, from fold students' predictions on the labeled train samples."""
    ctx = run_context(store, message.run_id)
    config, cycle = ctx.config, message.cycle + 1
    state = store.get_model(ctx.files.cycle_state(message.cycle), CycleState)
    if state.validation_probs is not None and state.checkpoint == message.checkpoint:
        report, probs = state.validation, np.load(io.BytesIO(store.get_bytes(state.validation_probs)))
    else:
        student = load_checkpoint(store, message.checkpoint, config.device)
        report, probs = evaluate_student(student, ctx.splits.validation, ctx.labels)
    # The training set only where fold students need it (a read of the store less per message otherwise).
    train_set = read_samples_artifact(store, message.train_set) if config.guidance_source == "out-of-fold" else []
    guidance = guidance_cycle(config, ctx.splits, train_set, report, probs, cycle, embed=shared_embeddings())
    if config.guidance_source != "validation":
        store.put_json(ctx.files.guidance(message.cycle), guidance.report.headline())
    mined = mine_cycle(config, guidance.samples, guidance.probs, ctx.labels, cycle)
    return NegativesMined(run_id=message.run_id, cycle=cycle, mined=mined, report=guidance.report,
                          train_set=message.train_set, best_checkpoint=message.best_checkpoint,
                          wanted=ctx.config.samples_wanted(message.samples_generated), cycle_started=time.time())


# -- generator -------------------------------------------------------------------------------------------

def generate(message: NegativesMined, store: ArtifactStore) -> SamplesGenerated | RunCompleted:
    """Ask the teacher, screen its answer against every known text, and hand the rest on."""
    ctx = run_context(store, message.run_id)
    config, cycle = ctx.config, message.cycle
    train_set = read_samples_artifact(store, message.train_set)
    if ctx.teacher is None:
        ctx.teacher = make_teacher(config, ctx.splits, embed=shared_embeddings(), cache_store=store)
        ctx.teacher_initial = ctx.teacher.state()
    teacher = ctx.teacher
    # Start from the state the previous answer left, so a restarted generator answers the same.
    teacher.load_state(ctx.teacher_initial if cycle == 1 else store.get_json(ctx.files.teacher_state(cycle - 1)))
    lesson = teach(config, teacher, ctx.splits, train_set, message.mined, message.report, message.wanted, cycle)
    store.put_json(ctx.files.teacher, teacher.describe())
    if lesson.stop_reason:
        return complete_run(store, ctx, cycle_states(store, ctx, cycle), lesson.stop_reason, cycle)
    store.put_json(ctx.files.teacher_state(cycle), teacher.state())
    return SamplesGenerated(run_id=message.run_id, cycle=cycle, samples=lesson.accepted,
                            provenance=lesson.provenance, train_set=message.train_set,
                            best_checkpoint=message.best_checkpoint, cycle_started=message.cycle_started)
