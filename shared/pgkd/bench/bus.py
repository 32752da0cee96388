"""`pgkd bench bus`: what the distributed loop costs beyond the embedded run, side by side.

The same run, in this process, in turn: embedded (`pgkd distill`'s loop, pgkd.loop.embedded) and
through the services' steps (trainer, evaluator, miner, generator: pgkd.distributed.steps, each
step reading its input from the artifact store and writing its output there, as the services do),
without a bus. What separates the two is the steps' work on the store: the checkpoint the trainer
writes and the evaluator and the trainer read, the training sets, the cycle records. Each run starts
from what a fresh process has: no sentence embeddings, no run context, an empty checkpoint cache and
artifact store. On a shared machine the wall times are noisy: the runs alternate, and the ratio is
of their sums. (Services as separate processes over a real broker add the bus's round trips and a
process per service; `pgkd_services` measures those.)
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from pgkd.distributed import steps
from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import RunCompleted
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import log
from pgkd.loop.embedded import run
from pgkd.files import write_json_atomic
from pgkd.loop.report import without_times
from pgkd.ownership import claim_folder

STEPS = {"train": steps.train, "evaluate": steps.evaluate, "mine": steps.mine, "generate": steps.generate}



class TimedStore(ArtifactStore):
    """An artifact store that counts the seconds and bytes of its reads and writes."""

    def __init__(self, url: str):
        super().__init__(url)
        self.seconds = {"write": 0.0, "read": 0.0}
        self.bytes = {"write": 0, "read": 0}

    def put_bytes(self, key, data, digest=None):
        started = time.perf_counter()
        try:
            return super().put_bytes(key, data, digest)
        finally:
            self.seconds["write"] += time.perf_counter() - started
            self.bytes["write"] += len(data)

    def get_bytes(self, ref):
        started = time.perf_counter()
        data = super().get_bytes(ref)
        self.seconds["read"] += time.perf_counter() - started
        self.bytes["read"] += len(data)
        return data


@contextmanager
def timed_checkpoints(seconds: dict):
    """The seconds spent storing and loading checkpoints, whatever step does it."""
    originals = steps.store_checkpoint, steps.load_checkpoint

    def timer(name, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return timed
    steps.store_checkpoint, steps.load_checkpoint = timer("store_checkpoint", originals[0]), timer(
        "load_checkpoint", originals[1])
    try:
        yield
    finally:
        steps.store_checkpoint, steps.load_checkpoint = originals


def through_steps(config: DistillConfig, folder: Path, run_id: str) -> dict:
    """One run through the steps, each timed; the store and the checkpoint cache fresh in `folder`."""
    shutil.rmtree(folder, ignore_errors=True)
    store = TimedStore(f"file://{folder.resolve()}/artifacts")
    cache, os.environ["PGKD_CACHE"] = os.environ.get("PGKD_CACHE"), str(folder / "cache")
    steps.forget_process_state()
    seconds = {name: 0.0 for name in STEPS}
    started = time.perf_counter()
    try:
        with timed_checkpoints(seconds):
            message = steps.submit(config, store, run_id=run_id)
            while not isinstance(message, RunCompleted):
                name = steps.STEP_OF[type(message)].__name__
                step_started = time.perf_counter()
                message = STEPS[name](message, store)
                seconds[name] += time.perf_counter() - step_started
        wall = time.perf_counter() - started
        if message.status != "completed":
            raise UserError(f"bench bus: the run through the steps failed: {message.reason}")
        report = store.get_json(message.report)
        stored = sum(p.stat().st_size for p in (folder / "artifacts").rglob("*") if p.is_file())
    finally:
        if cache is None:
            os.environ.pop("PGKD_CACHE", None)
        else:
            os.environ["PGKD_CACHE"] = cache
        shutil.rmtree(folder, ignore_errors=True)
    return {"wall": wall, "report": report, "steps": seconds, "store_seconds": store.seconds,
            "store_bytes": store.bytes, "stored_bytes": stored}


def embedded(config: DistillConfig) -> dict:
    started = time.perf_counter()
    report = run(config, None, progress=False).report.model_dump(mode="json")
    return {"wall": time.perf_counter() - started, "report": report}


def outside_training(entry: dict) -> float:
    """The run's wall time less its students' training rounds."""
    return entry["wall"] - sum(c["training"]["seconds"] for c in entry["report"]["cycles"])


def run_bus_bench(config: DistillConfig, out: Path, repeats: int = 1) -> dict:
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    runs = []
    for repeat in range(repeats):
        log(f"bench bus: {repeat + 1}/{repeats}: embedded")
        runs.append({"kind": "embedded", **embedded(config)})
        log(f"bench bus: {repeat + 1}/{repeats}: embedded {runs[-1]['wall']:.1f} s; through the steps")
        runs.append({"kind": "steps", **through_steps(config, out / "work", f"bus-{repeat}")})
        log(f"bench bus: {repeat + 1}/{repeats}: through the steps {runs[-1]['wall']:.1f} s")
    first = without_times(runs[0]["report"])
    wall = {kind: [r["wall"] for r in runs if r["kind"] == kind] for kind in ("embedded", "steps")}
    outside = {kind: [outside_training(r) for r in runs if r["kind"] == kind] for kind in ("embedded", "steps")}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    steps_runs = [r for r in runs if r["kind"] == "steps"]
    result = {
        "config": config.model_dump(), "repeats": repeats, "wall": wall,
        "ratio": sum(wall["steps"]) / sum(wall["embedded"]),
        "outside_training": outside,
        "training": {kind: [r["wall"] - o for r, o in zip([r for r in runs if r["kind"] == kind], outside[kind])]
                     for kind in ("embedded", "steps")},
        "steps_seconds": {name: mean([r["steps"][name] for r in steps_runs]) for name in steps_runs[0]["steps"]},
        "store_seconds": {k: mean([r["store_seconds"][k] for r in steps_runs]) for k in ("write", "read")},
        "store_bytes": {k: mean([r["store_bytes"][k] for r in steps_runs]) for k in ("write", "read")},
        "stored_bytes": mean([r["stored_bytes"] for r in steps_runs]),
        "cycles": len(runs[0]["report"]["cycles"]),
        "reports_identical": all(without_times(r["report"]) == first for r in runs),
    }
    (out / "bus.md").write_text(markdown(result))
    write_json_atomic(out / "bus.json", result)
    return result


def markdown(result: dict) -> str:
    c = result["config"]
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    lines = [f"{Path(c['data']).name}, student {c['student']}, teacher {c['teacher']}, --labeled {c['labeled']}, "
             f"--samples-per-cycle {c['samples_per_cycle']}, --max-cycles {c['max_cycles']}, seed {c['seed']}: "
             f"{result['cycles']} cycles, {result['repeats']} run(s) of each, alternating.", "",
             "| | embedded | through the steps |", "|---|---|---|",
             f"| wall time, s | {fmt(result['wall']['embedded'])} | {fmt(result['wall']['steps'])} |",
             f"| of which training rounds, s | {fmt(result['training']['embedded'])} | "
             f"{fmt(result['training']['steps'])} |",
             f"| of which the rest, s | {fmt(result['outside_training']['embedded'])} | "
             f"{fmt(result['outside_training']['steps'])} |", "",
             f"Ratio of the wall times (steps / embedded): **{result['ratio']:.4f}**. Reports identical "
             f"(but for times): {'yes' if result['reports_identical'] else 'NO'}.", "",
             "Through the steps, per run: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["steps_seconds"].items())
             + f"; the store: {result['store_seconds']['write']:.2f} s writing "
               f"{result['store_bytes']['write'] / 1e6:.0f} MB, {result['store_seconds']['read']:.2f} s reading "
               f"{result['store_bytes']['read'] / 1e6:.0f} MB; {result['stored_bytes'] / 1e6:.0f} MB kept."]
    return "\n".join(lines) + "\n"
