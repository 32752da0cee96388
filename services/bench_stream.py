"""`pgkd bench stream --samples N`: the stream's storage at scale, over a local Kafka-protocol broker
(Tansu: Kafka-compatible, not Apache Kafka, in memory), the ingest service an OS process.

Synthetic labeled texts (distinct, in a 20-class taxonomy: the scale figures need many texts, not
realistic ones) go to the labeled-samples topic in stages, up to 10,000, 100,000 and N stored
samples. At each stage:
    ingest rate   samples stored per second, from ingest's first batch received to its last stored
                  (the stage's messages are in the topic before ingest starts: its capacity, not the
                  sender's), and the peak memory of the process while it ingests
    restart       ingest stopped (SIGTERM) and started again on what is stored: seconds from exec to
                  ready (the stream read back and its index loaded, of which the read-back alone),
                  its memory (RSS) then, and the seconds until a new batch is stored (the consumer
                  group's rejoin included)
    cut           seconds to cut a run's dataset from the stored samples (Stream.dataset) and to
                  write it as a run's dataset artifact
The drift and count triggers on a real dataset are `pgkd bench stream` without --samples.
"""
from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path

from pgkd import processes
from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import LabeledSample
from pgkd.distributed.steps import submit, submit_splits
from pgkd.loop.config import DistillConfig
from pgkd.files import write_json_atomic
from pgkd.stream import SegmentLog, Stream, StreamSettings

from pgkd_services.local import LocalCluster
from pgkd.ownership import claim_folder

TOPICS = [f"topic_{k:02d}" for k in range(20)]
WORDS = ["card", "refund", "transfer", "pin", "balance", "loan", "fee", "limit", "travel", "cash"]


def synthetic_row(i: int) -> dict:
    """The i-th synthetic sample: its number makes the text distinct."""
    label = TOPICS[i % len(TOPICS)]
    return {"text": f"customer {i} asks about {label.replace('_', ' ')} and the {WORDS[i % 10]} of order "
                    f"{(i * 7919) % 1_000_003}", "label": label}


def _base_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", range(10_000_000, 10_000_400)), ("test", range(10_000_400, 10_000_600))):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(synthetic_row(i)) + "\n" for i in rows))
    return folder


def _send(broker_url: str, topic: str, first: int, last: int) -> float:
    """Rows first..last-1 to the topic; returns seconds."""
    from kafka import KafkaProducer
    started = time.perf_counter()
    producer = KafkaProducer(bootstrap_servers=broker_url.removeprefix("kafka://"), acks=1, linger_ms=50,
                             batch_size=1 << 20, client_id="pgkd-bench-stream")
    try:
        for i in range(first, last):
            producer.send(topic, value=json.dumps(synthetic_row(i)).encode())
        producer.flush()
    finally:
        producer.close()
    return time.perf_counter() - started


def _memory(pid: int) -> dict:
    """The process's resident memory now and at its peak, MiB (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+) kB", status, re.M).group(1)) / 1024  # noqa: E731
    return {"rss_mib": round(field("VmRSS"), 1), "peak_rss_mib": round(field("VmHWM"), 1)}


def _log_times(text: str, pattern: str) -> list[float]:
    return [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for m in re.findall(rf"^(\S+ \S+) INFO .*{pattern}", text, re.M)]


def run_scale_bench(samples: int = 1_000_000, out: str | Path = "runs/bench/stream-scale",
                    stages: list[int] | None = None, batch_max: int = 500, progress: bool = True) -> dict:
    stages = sorted({s for s in (stages or [10_000, 100_000]) if s < samples} | {samples})
    out = claim_folder(Path(out)).resolve()   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    for name in ("stream-scale.json", "stream-scale.md"):   # the json is written last: no result until it is there
        (out / name).unlink(missing_ok=True)
    say = (lambda line: print(f"bench stream: {line}", flush=True)) if progress else (lambda line: None)
    data = _base_dataset(out / "data")
    started = time.perf_counter()
    rows, restarts = [], []
    with LocalCluster(out / "cluster", quiet=not progress) as cluster:
        store = ArtifactStore(cluster.env["PGKD_ARTIFACTS"])
        # A base run recorded, never run: no current student, so no drift check and no run (the
        # figures are the storage's; the triggers' are on a real dataset without --samples)
        submit(DistillConfig(data=str(data), labeled=400, student="tiny", teacher="pool-random"), store, run_id="base")
        env = {"PGKD_STREAM_BASE_RUN": "base", "PGKD_STREAM_BATCH_MAX": str(batch_max)}
        topic = f"pgkd.{LabeledSample.topic}"
        stored = 0
        for target in stages:
            say(f"sending {target - stored:,} samples to {topic}")
            send_seconds = _send(cluster.broker_url, topic, stored, target)
            restart = _start(cluster, env, stored)
            if stored:
                restarts.append(restart)
            say(f"ingest started on {stored:,} stored samples in {restart['ready_seconds']:.1f} s; ingesting")
            _wait_stored(store, target, cluster)
            received, done = _batch_times(cluster, restart, target - stored)
            memory = _memory(cluster.processes["ingest"].pid)
            _stop(cluster)
            rows.append({"stored": target, "sent_per_second": round((target - stored) / send_seconds),
                         "ingest_per_second": round((target - stored) / (done[-1] - received[0])),
                         "ingest_peak_rss_mib": memory["peak_rss_mib"], **_cut(store)})
            stored = target
            say(f"{target:,} stored: {rows[-1]['ingest_per_second']:,} samples/s; a run's dataset cut in "
                f"{rows[-1]['cut_seconds']:.1f} s")
        _send(cluster.broker_url, topic, stored, stored + 100)     # a batch to store after the last restart
        restarts.append(_start(cluster, env, stored))
        _wait_stored(store, stored + 100, cluster)
        _batch_times(cluster, restarts[-1], 100)
        _stop(cluster)
    for row, restart in zip(rows, restarts):
        row["restart"] = {k: v for k, v in restart.items() if k not in ("log_offset", "exec_at")}
    result = {"samples": samples, "stages": stages, "batch_max": batch_max,
              "segment_samples": StreamSettings().segment_samples,
              "broker": "Tansu (Kafka-compatible, not Apache Kafka), in memory, 3 partitions",
              "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    (out / "stream-scale.md").write_text(markdown(result))
    write_json_atomic(out / "stream-scale.json", result)
    return result


def _start(cluster: LocalCluster, env: dict, stored: int) -> dict:
    """Ingest started on `stored` samples: seconds to ready (its stream read back, its index loaded,
    its HTTP side up), the read-back alone, its memory then."""
    path = cluster.log_path("ingest")
    log_offset = len(path.read_text(errors="replace")) if path.exists() else 0
    exec_at, started = time.time(), time.perf_counter()
    cluster.start("ingest", **env)
    cluster.ready()
    ready = time.perf_counter() - started
    memory = _memory(cluster.processes["ingest"].pid)
    read_back = float(re.findall(r"read back in ([\d.]+) s", path.read_text(errors="replace")[log_offset:])[-1])
    return {"at_stored": stored, "ready_seconds": round(ready, 2), "read_back_seconds": read_back,
            "rss_mib": memory["rss_mib"], "log_offset": log_offset, "exec_at": exec_at}


def _batch_times(cluster: LocalCluster, restart: dict, expected: int,
                 timeout: float = 60) -> tuple[list[float], list[float]]:
    """When ingest's batches since `restart` were received and stored (its log's times); the first
    stored one's, from exec, goes into `restart`. Ingest logs a batch just after committing it, so the
    log is read until its lines account for the `expected` samples stored since the restart."""
    deadline = time.monotonic() + timeout
    while True:
        text = cluster.log_path("ingest").read_text(errors="replace")[restart["log_offset"]:]
        logged = sum(int(n) for n in re.findall(r"INFO .*: (\d+) stored, ", text))
        if logged >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    received, done = _log_times(text, r"sample message\(s\) received"), _log_times(text, " stored, ")
    if not done:
        raise SystemExit(f"ingest logged no stored batch since its restart:\n{cluster.tail('ingest')}")
    restart["first_batch_stored_seconds"] = round(done[0] - restart["exec_at"], 2)
    return received, done


def _count(store: ArtifactStore) -> int:
    log = SegmentLog(store, "streams/default/segments")
    log.load_manifest()
    return log.count


def _wait_stored(store: ArtifactStore, n: int, cluster: LocalCluster, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while _count(store) < n:
        if cluster.processes["ingest"].poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ingest stopped short of {n} stored samples:\n{cluster.tail('ingest')}")
        time.sleep(0.2)


def _stop(cluster: LocalCluster) -> None:
    processes.stop(cluster.processes.pop("ingest"), timeout=120)


def _cut(store: ArtifactStore) -> dict:
    """A run's dataset cut from what is stored, and written as a run's would be."""
    started = time.perf_counter()
    stream = Stream(store, StreamSettings(base_run="base"))
    stream.open()
    opened = time.perf_counter()
    splits = stream.dataset()
    cut = time.perf_counter()
    config = stream.run_config().model_copy(update={"data": "stream://default",
                                                                     "labeled": len(splits.train) + len(splits.validation)})
    submit_splits(config, "stream default", splits, store, f"cut-{stream.log.count}")
    return {"stream_open_seconds": round(opened - started, 2), "cut_seconds": round(cut - opened, 2),
            "write_seconds": round(time.perf_counter() - cut, 2), "train": len(splits.train),
            "validation": len(splits.validation)}


def markdown(result: dict) -> str:
    lines = [f"Stream storage at scale: {result['broker']}; ingest batches of up to {result['batch_max']}, "
             f"segments of {result['segment_samples']:,} samples; synthetic texts.", "",
             "| stored samples | ingest (samples/s) | ingest peak memory (MiB) | restart: ready (s) | "
             "of which read back (s) | memory after restart (MiB) | first batch stored after exec (s) | "
             "cut a run's dataset (s) | write it (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        restart = r["restart"]
        first = restart.get("first_batch_stored_seconds")
        lines.append(f"| {r['stored']:,} | {r['ingest_per_second']:,} | {r['ingest_peak_rss_mib']:.0f} | "
                     f"{restart['ready_seconds']:.1f} | {restart['read_back_seconds']:.2f} | {restart['rss_mib']:.0f} | "
                     f"{'-' if first is None else f'{first:.1f}'} | {r['cut_seconds']:.1f} | {r['write_seconds']:.1f} |")
    return "\n".join(lines) + f"\n\n({result['seconds']:.0f} s)\n"
