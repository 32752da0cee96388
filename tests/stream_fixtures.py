"""What the stream tests share: a completed base run in an artifact store, and streams of new
labeled samples drawn like the toy dataset's (so the student knows them) but never in it."""
import json
import random
from pathlib import Path

from conftest import TOY_CLASSES, make_toy_dataset, toy_text
from pgkd.distributed.steps import run_through_steps
from pgkd.distributed import steps
from pgkd.artifacts import ArtifactStore
from pgkd.data import normalize_text, read_samples
from pgkd.loop.config import DistillConfig
from pgkd.distributed.messages import RunCompleted
from pgkd.stream import SegmentLog

# MiniLM frozen with a logistic head: learns the toy classes perfectly in seconds, so a stream with
# remapped labels is plainly wrong to it.
BASE_CONFIG = dict(labeled=40, student="minilm-frozen", teacher="pool-random", samples_per_cycle=16, max_cycles=1,
                   patience=5, seed=1)
LABELS = sorted(TOY_CLASSES)
REMAP = dict(zip(LABELS, LABELS[1:] + LABELS[:1]))   # every label to the next one


def base_run(folder: Path, store: ArtifactStore, run_id: str = "base", **options) -> tuple[Path, RunCompleted]:
    data = make_toy_dataset(folder / "toy")
    config = DistillConfig(data=str(data), **{**BASE_CONFIG, **options})
    return data, run_through_steps(steps.submit(config, store, run_id=run_id), store)


def new_samples(data: Path, n: int, seed: int = 7, remap: dict | None = None) -> list[dict]:
    """`n` toy samples whose texts are in no split of `data` and distinct from each other."""
    rng = random.Random(seed)
    seen = {normalize_text(s.text) for split in ("train", "test") for s in read_samples(data / f"{split}.jsonl")}
    rows = []
    while len(rows) < n:
        label = LABELS[len(rows) % len(LABELS)]
        text = toy_text(rng, label)
        if normalize_text(text) not in seen:
            seen.add(normalize_text(text))
            rows.append({"text": text, "label": (remap or {}).get(label, label), "id": f"s{len(rows)}"})
    return rows


def body(row) -> bytes:
    return json.dumps(row).encode()


def stored_count(store: ArtifactStore, stream: str = "default") -> int:
    """How many samples the stream's manifest has committed (without reading them)."""
    log = SegmentLog(store, f"streams/{stream}/segments")
    log.load_manifest()
    return log.count


def stored(store: ArtifactStore, stream: str = "default") -> list:
    """The stream's committed samples, in order, as a restarted ingest reads them (StoredSample)."""
    log = SegmentLog(store, f"streams/{stream}/segments")
    log.load_manifest()
    return list(log.read())
