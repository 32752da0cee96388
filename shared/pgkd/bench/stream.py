"""`pgkd bench stream`: what a stream of new labeled data does to the student, on a real dataset.

A base run distills the few-label setting; then a stream of `size` messages arrives: labeled
samples the base student never saw (the base run's pool, standing in for new human labels) with
`bad_percent` of bad messages among them (empty, unknown label, oversized, not JSON). Each message
goes through the stream exactly as the ingest service handles it (pgkd.stream.Stream.take); a trigger
runs the warm-started run on the grown dataset here, in this process (the steps the services
run), and the stream decides whether its student replaces the current one. The test scores are
a diagnostic beside the decision, never part of it.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from pgkd.artifacts import ArtifactStore
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import evaluate_student, log
from pgkd.files import write_json_atomic
from pgkd.distributed.messages import StudentPromoted
from pgkd.distributed.steps import load_checkpoint, run_context, run_through_steps, submit
from pgkd.stream import Stream, StreamSettings, StreamStep
from pgkd.ownership import claim_folder


def bad_messages(n: int, labels: list[str], rng: random.Random) -> list[bytes]:
    """`n` bad messages, the four kinds in turn."""
    kinds = [lambda i: json.dumps({"text": " ", "label": rng.choice(labels)}),
             lambda i: json.dumps({"text": f"please close my account, ticket {i}", "label": "close_account"}),
             lambda i: json.dumps({"text": "my card was charged twice " * 120, "label": rng.choice(labels)}),
             lambda i: '{"text": "cut off mid-line", "label": '[:20 + i % 10]]
    return [kinds[i % len(kinds)](i).encode() for i in range(n)]


def run_stream_bench(data: Path, out: Path, student: str = "minilm-frozen", labeled: int = 1000,
                     size: int = 1000, bad_percent: float = 5.0, trigger_count: int = 500, max_cycles: int = 3,
                     seed: int = 1, progress: bool = True) -> dict:
    started = time.perf_counter()
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    for name in ("stream.json", "stream.md"):   # stream.json is written last: no result until it is there
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "artifacts", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    store = ArtifactStore(f"file://{out.resolve()}/artifacts")   # kept: the runs, the stream, its decisions
    config = DistillConfig(data=str(data), student=student, labeled=labeled, max_cycles=max_cycles, seed=seed,
                           teacher="pool-guided")
    log(f"bench stream: base run on {data} ({labeled} labels, student {student}, up to {max_cycles} cycles)")
    base = run_through_steps(submit(config, store, run_id="base"), store)
    splits = run_context(store, "base").splits
    rng = random.Random(seed)
    n_bad = round(size * bad_percent / 100)
    good = [json.dumps(s.model_dump() | {"source": "pool"}).encode()
            for s in rng.sample(splits.pool, min(size - n_bad, len(splits.pool)))]
    messages = good + bad_messages(n_bad, splits.labels, rng)
    rng.shuffle(messages)

    stream = Stream(store, StreamSettings(stream="bench", base_run="base", trigger_count=trigger_count))
    stream.open()
    outcomes, rejected, runs, promoted = Counter(), Counter(), [], []
    for body in tqdm(messages, desc="stream", unit="message", disable=not progress):
        step = stream.take(body)             # what the ingest service does with each message
        outcomes[step.outcome] += 1
        if step.rejected is not None:
            rejected[step.rejected.reason] += 1
        while step.publish:                  # a run, and any that its end lets start
            message = step.publish.pop(0)
            if isinstance(message, StudentPromoted):   # no student server here: the promotion is only counted
                stream.promotion_published(message.run_id)
                promoted.append(message.run_id)
                continue
            entry, step = _run_and_decide(stream, store, message, step.started, base.best_checkpoint)
            runs.append(entry)
    result = {"data": str(data), "student": student, "labeled": labeled, "seed": seed, "max_cycles": max_cycles,
              "trigger_count": trigger_count, "sent": len(messages), "accepted": outcomes["accepted"],
              "duplicates": outcomes["duplicate"], "rejected": dict(sorted(rejected.items())),
              "stored": {"train": stream.log.split_count("train"),
                         "validation": stream.log.split_count("validation")},
              "drift_checks": [c.model_dump() for c in stream.state.drift_checks], "runs": runs,
              "current_student": stream.state.current.run_id, "promoted": promoted, "seconds": time.perf_counter() - started}
    (out / "stream.md").write_text(markdown(result))
    write_json_atomic(out / "stream.json", result)
    return result


def _run_and_decide(stream: Stream, store: ArtifactStore, request, trigger, base_checkpoint) -> tuple[dict, StreamStep]:
    """The triggered run, here in this process through the services' steps, and the stream's decision."""
    stream.published(request.run_id)
    log(f"bench stream: {request.run_id} ({trigger})")
    current_checkpoint = request.start_from
    completed = run_through_steps(request, store)
    after = stream.finished(completed)
    decision = after.decision
    ctx = run_context(store, request.run_id)
    test = {name: evaluate_student(load_checkpoint(store, ref, ctx.config.device), ctx.splits.test,
                                   ctx.labels)[0].headline()
            for name, ref in (("current", current_checkpoint), ("new", completed.best_checkpoint))}
    entry = next(r for r in stream.state.runs if r.run_id == request.run_id)
    return {"run_id": request.run_id, "trigger": str(trigger), "train_size": entry.train_size,
            "validation_size": entry.validation_size, "best_cycle": completed.best_cycle,
            "stop_reason": completed.reason, "decision": decision.model_dump(), "test": test,
            "from_base": current_checkpoint == base_checkpoint}, after


def markdown(result: dict) -> str:
    rejected = ", ".join(f"{reason} {n}" for reason, n in result["rejected"].items()) or "none"
    lines = [f"Stream on {Path(result['data']).name} ({result['labeled']} labels to start, student "
             f"{result['student']}, seed {result['seed']}): {result['sent']} messages sent, {result['accepted']} "
             f"accepted ({result['stored']['train']} train, {result['stored']['validation']} validation), "
             f"{result['duplicates']} duplicates, rejected: {rejected}.", "",
             "| run | trigger | train | validation | metric | current student | new student | replaced | "
             "test acc current | test acc new |", "|---|---|---|---|---|---|---|---|---|---|"]
    score = lambda x: "failed" if x is None else f"{x:.4f}"  # noqa: E731
    for run in result["runs"]:
        d = run["decision"]
        lines.append(f"| {run['run_id']} | {run['trigger'].split(':')[0]} | {run['train_size']} | "
                     f"{d['validation_size']} | validation {d['metric']} | {score(d['current_score'])} | "
                     f"{score(d['new_score'])} | {'yes' if d['replaced'] else 'no'} | "
                     f"{run['test']['current']['accuracy']:.4f} | {run['test']['new']['accuracy']:.4f} |")
    return "\n".join(lines) + f"\n\n({result['seconds']:.0f} s)\n"
