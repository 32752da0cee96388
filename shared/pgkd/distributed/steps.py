"""The distributed loop's steps: one function per service, from one message to the next.

Each step reads what it needs of the run from the artifact store, calls the phase of the cycle the
embedded loop calls (pgkd.loop.cycle), writes its artifacts and returns the message to publish. The
steps know nothing of the bus; services/ wires them to it.

What a run keeps in the store, under runs/<run_id>/:
    request.json            the RunRequested message (configuration and source dataset)
    state/0003-4-evaluated-<sha256 prefix>.json  the run's state (pgkd.loop.state.RunState) after
                            each phase of each cycle: what the next phase loads, `pgkd status` and
                            `--wait` read; named by its content, so a step run twice never overwrites it
    train/v0003.jsonl       the training set of cycle 3: the seed set plus each accepted batch
    checkpoints/cycle-0003.json  the student of cycle 3: a manifest of its Hugging Face folder's files,
                            each a content-addressed blob under blobs/sha256/ of the store (shared by
                            every checkpoint that holds the same bytes: the frozen word embeddings)
    probs/0003.npy          the student's validation probabilities, which the miner mines
    report.json, history.png, completed.json (the RunCompleted message) when the run ends
Everything a step writes is a function of its input message, so running a step twice (a
redelivered message) writes the same artifacts again (but for the times its state records).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from pgkd.artifacts import ArtifactError, ArtifactRef, ArtifactStore, json_bytes, sha256_of
from pgkd.data import Dataset, Splits, load_dataset, make_splits, with_taxonomy
from pgkd.taxonomy import Taxonomy
from pgkd.types import Sample
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import make_teacher
from pgkd.loop.distillation import Distillation
from pgkd.loop.dryrun import check_fits
from pgkd.loop.state import STATE_SCHEMA, RunState, StateError
from pgkd.distributed.messages import (
    CycleEvaluated,
    LoopMessage,
    ModelTrained,
    NegativesMined,
    RunCompleted,
    RunRequested,
    SamplesGenerated,
    StudentPromoted,
    TeacherStopped,
)
from pgkd.distributed.runs import RunFiles
from pgkd.loop.report import plot_history, plot_reliability
from pgkd.errors import UserError, dotted, invalid
from pgkd.names import check_name
from pgkd.settings import ArtifactSettings, one
from pgkd.students import load_student

if TYPE_CHECKING:
    from pgkd.encoder import EmbeddingCache

log = logging.getLogger("pgkd.distributed.steps")


def checkpoint_cache() -> Path:
    """PGKD_CACHE (pgkd.settings.ArtifactSettings), TMPDIR/pgkd-cache by default."""
    return Path(one(ArtifactSettings, "cache") or Path(tempfile.gettempdir()) / "pgkd-cache")


_embeddings: EmbeddingCache | None = None


def shared_embeddings() -> EmbeddingCache:
    """One sentence-embedding cache per process, for the frozen-encoder student and the guided
    teacher: MiniLM is loaded once and each text encoded once, however many cycles pass."""
    global _embeddings
    if _embeddings is None:
        from pgkd.encoder import EmbeddingCache   # torch: imported by the steps that embed, not at start
        _embeddings = EmbeddingCache()
    return _embeddings


def warm() -> None:
    """What a service's first message would pay for, paid before it consumes: the students' modules
    (torch, transformers: seconds to import on a small machine)."""
    import pgkd.students.finetuned  # noqa: F401
    import pgkd.students.frozen  # noqa: F401,F811


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
            "validation": rows(dataset.validation), "test": rows(dataset.test),
            **({"taxonomy": dataset.taxonomy.model_dump(mode="json")} if dataset.taxonomy else {})}


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
    return checked_request(config, run_id)(store)


def checked_request(config: DistillConfig, run_id: str | None = None) -> Callable[[ArtifactStore], RunRequested]:
    """The data checked, nothing written yet: a function that stores it and returns the run's request
    (`pgkd submit` calls it once the broker is known to answer, so that an unreachable one leaves
    nothing behind)."""
    if run_id is not None:
        check_name(run_id, "run id")
    dataset = load_dataset(config.data, config.text_column, config.label_column, seed=config.seed)
    dataset = with_taxonomy(dataset, config.taxonomy)   # read here: the services never see the submitter's file
    splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)  # raises on a bad --labeled
    check_fits(config, splits)   # an LLM teacher's prompt can fit --teacher-max-prompt-tokens
    run_id = run_id or new_run_id(dataset.name)
    return lambda store: RunRequested(run_id=run_id, cycle=0, config=config.model_dump(),
                                      dataset=_put_dataset(store, _dataset_json(dataset)))


def record_request(store: ArtifactStore, request: RunRequested, new: bool = False) -> bool:
    """The run's request in the store, where every service reads its configuration. With `new`, only where
    no run of its id is recorded yet, in one step (ArtifactStore.put_new): False when one is."""
    data = json_bytes(request.model_dump(mode="json"))
    if new:
        return store.put_new(RunFiles(request.run_id).request, data) is not None
    store.put_bytes(RunFiles(request.run_id).request, data)
    return True


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
    run: Distillation | None = None   # its phases, with the teacher this process made for it

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
                          test=rows("test"), notes=raw["notes"],
                          taxonomy=Taxonomy.model_validate(raw["taxonomy"]) if raw.get("taxonomy") else None)
        splits = make_splits(dataset, config.labeled, config.seed, config.validation_fraction)
    context = RunContext(request, config, dataset, splits, files)
    _contexts[cache_key] = context
    while len(_contexts) > 4:
        _contexts.popitem(last=False)
    return context


class StoreKeeper:
    """The services' keeper (pgkd.loop.distillation.Keeper): a run's students, training sets and
    probabilities in the artifact store, each file a function of its run and cycle."""

    def __init__(self, store: ArtifactStore, files: RunFiles, device: str):
        self.store, self.files, self.device = store, files, device

    def save_student(self, cycle: int, student) -> ArtifactRef:
        return store_checkpoint(self.store, self.files.checkpoint(cycle), student)

    def load_student(self, ref: ArtifactRef):
        return load_checkpoint(self.store, ref, self.device)

    def keep_best(self, ref: ArtifactRef) -> None:
        """Stored already: the state's reference keeps it."""

    def save_samples(self, cycle: int, samples: list[Sample]) -> ArtifactRef:
        return _put_samples(self.store, self.files.train_set(cycle), samples)

    def load_samples(self, ref: ArtifactRef) -> list[Sample]:
        return read_samples_artifact(self.store, ref)

    def save_probs(self, cycle: int, probs: np.ndarray) -> ArtifactRef:
        data = io.BytesIO()
        np.save(data, np.asarray(probs), allow_pickle=False)
        return self.store.put_bytes(self.files.validation_probs(cycle), data.getvalue())

    def load_probs(self, ref: ArtifactRef) -> np.ndarray:
        return np.load(io.BytesIO(self.store.get_bytes(ref)), allow_pickle=False)


def distillation(store: ArtifactStore, run_id: str, events=()) -> Distillation:
    """The run's phases over the artifact store, made once per run in this process (its teacher
    with them); `events` are this call's listeners (a service's metrics)."""
    ctx = run_context(store, run_id)
    if ctx.run is None:
        config = ctx.config
        ctx.run = Distillation(config, ctx.dataset, ctx.splits, StoreKeeper(store, ctx.files, config.device),
                               make_teacher=lambda: make_teacher(config, ctx.splits, embed=shared_embeddings(),
                                                                 cache_store=store),
                               embed=shared_embeddings(), name=f"{run_id} ")
    ctx.run.events = list(events)
    return ctx.run


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


# -- the run's state in the store ---------------------------------------------------------------------------

# The phase whose state each loop message points to.
PHASE_OF = {ModelTrained: "trained", CycleEvaluated: "evaluated", NegativesMined: "mined", SamplesGenerated: "taught",
            TeacherStopped: "taught"}


def save_state(store: ArtifactStore, state: RunState) -> ArtifactRef:
    data = (json.dumps(state.model_dump(mode="json"), indent=1, ensure_ascii=False) + "\n").encode()
    digest = sha256_of(data)
    return store.put_bytes(RunFiles(state.run_id).state(state.cycle, state.phase, digest), data, digest=digest)


def load_state(store: ArtifactStore, message: LoopMessage) -> RunState:
    """The state `message` points to. One that is missing, damaged, of a newer schema or of another
    run is a StateError naming the run and the file (the message goes to the dead-letter topic)."""
    try:
        where = store.location(message.state)
    except UserError:                          # a reference outside the store: named as the message gives it
        where = message.state.uri
    try:
        data = store.get_json(message.state)
    except (ArtifactError, UserError) as e:    # missing, not JSON, not its sha256, outside the store
        raise StateError(message.run_id, where, str(e).removeprefix(f"{where}: ")) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > STATE_SCHEMA:
        raise StateError(message.run_id, where, f"of a newer schema ({version}); this pgkd reads {STATE_SCHEMA}: "
                                                "upgrade this service")
    try:
        state = RunState.model_validate(data)
    except ValidationError as e:
        raise StateError(message.run_id, where, f"damaged: {invalid(e, dotted('state'))}") from None
    if state.run_id != message.run_id:
        raise StateError(message.run_id, where, f"of run {state.run_id}, not of this run")
    expected = PHASE_OF[type(message)]
    if (state.phase, state.cycle) != (expected, message.cycle):
        raise StateError(message.run_id, where, f"of cycle {state.cycle} {state.phase}, not the cycle {message.cycle} "
                                                f"{expected} the message names")
    return state


def latest_state(store: ArtifactStore, run_id: str) -> RunState | None:
    """The run's last saved state (what `pgkd status` and `pgkd submit --wait` show), if any."""
    keys = sorted(store.list(RunFiles(run_id).states))
    if not keys:
        return None
    state = store.get_model(keys[-1], RunState)
    if state.run_id != run_id:     # a file copied (or edited) in: never shown as this run's
        raise StateError(run_id, store.uri(keys[-1]), f"of run {state.run_id}, not of this run")
    return state


# -- the phases, one per service -----------------------------------------------------------------------------

def train(message: RunRequested | SamplesGenerated, store: ArtifactStore, events=()) -> ModelTrained:
    """trainer: cycle 0 from the labeled seed set; cycle k on the training set the generator grew."""
    run = distillation(store, message.run_id, events)
    if isinstance(message, RunRequested):
        state = run.start(message.run_id, started_at=message.submitted_at, promote=message.promote,
                          start_from=message.start_from)
    else:
        state = load_state(store, message)
    return ModelTrained(run_id=message.run_id, cycle=message.cycle, state=save_state(store, run.train(state)))


def evaluate(message: ModelTrained | TeacherStopped, store: ArtifactStore, events=(),
             reader=None) -> CycleEvaluated | RunCompleted:
    """evaluator: record the cycle and let the stop policy decide (on what `reader` reads back, or on
    the state); end the run when it says stop, or when the teacher stopped. The one service that ends
    a run."""
    run = distillation(store, message.run_id, events)
    state = load_state(store, message)
    if isinstance(message, ModelTrained):
        state = run.evaluate(state, reader)
        log.info("evaluator: run %s cycle %d: %s (decided from: %s)", message.run_id, message.cycle,
                 state.stop_reason or "continue", state.decided_from)
    if state.stopped:
        return complete_run(store, run, state)
    return CycleEvaluated(run_id=message.run_id, cycle=message.cycle, state=save_state(store, state))


def mine(message: CycleEvaluated, store: ArtifactStore, events=()) -> NegativesMined:
    """miner: the mistakes of the student just evaluated, for the next cycle's teacher request."""
    run = distillation(store, message.run_id, events)
    state = run.mine(load_state(store, message))
    return NegativesMined(run_id=message.run_id, cycle=state.cycle, state=save_state(store, state))


def generate(message: NegativesMined, store: ArtifactStore, events=()) -> SamplesGenerated | TeacherStopped:
    """generator: ask the teacher, screen its answer against every known text, grow the training set;
    or tell the evaluator the teacher stopped."""
    run = distillation(store, message.run_id, events)
    state = run.teach(load_state(store, message))
    kind = TeacherStopped if state.stopped else SamplesGenerated
    return kind(run_id=message.run_id, cycle=state.cycle, state=save_state(store, state))


def complete_run(store: ArtifactStore, run: Distillation, state: RunState) -> RunCompleted:
    """Score the best student on test and write the run's report.json, history.png and final state;
    with --promote, its best student goes to serving (the RunCompleted carries the StudentPromoted)."""
    state, report, student = run.finish(state)
    files = RunFiles(state.run_id)
    with tempfile.TemporaryDirectory() as folder:
        plot_history(report, Path(folder) / "history.png")
        store.put_bytes(files.plot, (Path(folder) / "history.png").read_bytes())
        if report.calibration and report.calibration["samples"]:
            plot_reliability(report, Path(folder) / "reliability.png")
            store.put_bytes(files.reliability, (Path(folder) / "reliability.png").read_bytes())
    report_ref = store.put_json(files.report, report.model_dump(mode="json"))
    best = state.best
    if getattr(student, "calibration", None) is not None:   # the kept student as served: with its calibration
        best = best.model_copy(update={"student": store_checkpoint(store, files.best, student)})
    state = state.model_copy(update={"report": report_ref, "best": best})
    promotion = None
    if state.promote:
        scores = {f"validation_{k}": v for k, v in best.validation.headline().items()}
        scores |= {f"test_{k}": v for k, v in report.best.test.headline().items()}
        promotion = record_promotion(store, StudentPromoted(
            run_id=state.run_id, cycle=best.cycle, checkpoint=best.student, scores=scores, source="run",
            decision=f"run {state.run_id} completed ({state.stop_reason}); submitted with --promote"))
    completed = RunCompleted(run_id=state.run_id, cycle=state.cycle, status="completed", reason=state.stop_reason,
                             report=report_ref, best_checkpoint=best.student, best_cycle=best.cycle,
                             test=report.best.test.headline(), decided_from=state.decided_from,
                             state=save_state(store, state), promotion=promotion)
    store.put_json(files.completed, completed.model_dump(mode="json"))
    return completed


# The phase each message of the loop goes to (the services consume them so: services/*/__init__.py).
STEP_OF = {RunRequested: train, SamplesGenerated: train, ModelTrained: evaluate, TeacherStopped: evaluate,
           CycleEvaluated: mine, NegativesMined: generate}


def run_through_steps(message: RunRequested, store: ArtifactStore, events=(), reader=None) -> RunCompleted:
    """A submitted run's phases one after another, as the services call them, in this process (the
    stream's benchmark and tests: a stream's runs are runs of the services)."""
    while not isinstance(message, RunCompleted):
        step = STEP_OF[type(message)]
        message = step(message, store, events, reader=reader) if step is evaluate else step(message, store, events)
    return message


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
