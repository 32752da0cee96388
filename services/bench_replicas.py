"""Runs completed per hour with one and with more trainer replicas: a local cluster (Tansu, a
Kafka-compatible broker, not Apache Kafka; Prometheus; the services as processes) per replica count,
the same runs submitted at once, the wall time from the first submit to the last completion.

    python -m pgkd_services.bench_replicas --data ../shared/data/banking77 --runs 6 --replicas 1 2

Each run's messages are keyed by its id, so a run stays on one partition; the ids are chosen to
spread the runs evenly over the partitions (Kafka's default partitioner: murmur2 of the key), and
the trainer replicas share the partitions of their consumer group.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from pgkd.artifacts import ArtifactStore

from pgkd_services.local import LocalCluster

PARTITIONS = 3   # `pgkd topics create`'s default


def spread_run_ids(count: int, partitions: int = PARTITIONS, prefix: str = "bench") -> list[str]:
    """`count` run ids, dealt round-robin over the partitions their messages land on."""
    from kafka.partitioner.default import murmur2
    by_partition: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while sum(len(v) for v in by_partition.values()) < count * partitions:
        run_id = f"{prefix}-{i}"
        by_partition[(murmur2(run_id.encode()) & 0x7FFFFFFF) % partitions].append(run_id)
        i += 1
    return [by_partition[k % partitions][k // partitions] for k in range(count)]


def measure(folder: Path, replicas: int, run_ids: list[str], options: list[str]) -> dict:
    with LocalCluster(folder, quiet=True) as cluster:
        for name in ("evaluator", "miner", "generator"):
            cluster.start(name)
        cluster.start("trainer")
        for k in range(2, replicas + 1):     # more replicas: the same service in the same consumer group
            cluster.start("trainer", label=f"trainer-{k}")
        cluster.ready()
        time.sleep(10)    # the consumer groups settle (Tansu answers joins after a few seconds)
        store = ArtifactStore(cluster.env["PGKD_ARTIFACTS"])
        started = time.perf_counter()
        for run_id in run_ids:        # at once; stopped with the cluster if interrupted
            cluster.spawn(f"submit-{run_id}", cluster.pgkd_argv("submit", "--run-id", run_id, *options))
        for run_id in run_ids:
            if cluster.processes[f"submit-{run_id}"].wait() != 0:
                raise SystemExit(f"submit failed: {cluster.tail(f'submit-{run_id}')}")
        done: dict[str, float] = {}
        while len(done) < len(run_ids):
            for run_id in run_ids:
                if run_id not in done and store.exists(f"runs/{run_id}/completed.json"):
                    done[run_id] = time.perf_counter() - started
                    status = store.get_json(f"runs/{run_id}/completed.json")["status"]
                    print(f"replicas {replicas}: {run_id} {status} after {done[run_id]:.0f} s", file=sys.stderr)
            time.sleep(0.5)
        wall = max(done.values())
        return {"trainer_replicas": replicas, "runs": len(run_ids), "wall_seconds": round(wall, 1),
                "runs_per_hour": round(len(run_ids) / wall * 3600, 1),
                "completed_after_seconds": {k: round(v, 1) for k, v in done.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgkd_services.bench_replicas", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/bench/replicas")
    parser.add_argument("--run-options", default="--labeled 1000 --student tiny --teacher pool-random "
                        "--samples-per-cycle 32 --max-cycles 3 --seed 1",
                        help="the options of every run (those of pgkd distill)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    options = ["--data", str(Path(args.data).resolve()), *args.run_options.split()]
    results = [measure(out / f"replicas-{n}", n, spread_run_ids(args.runs), options) for n in args.replicas]
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "data": args.data, "run_options": args.run_options, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicas.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['trainer_replicas']} trainer replica(s): {r['runs']} runs in {r['wall_seconds']:.0f} s, "
              f"{r['runs_per_hour']:.0f} runs/hour")
    print(f"written: {out / 'replicas.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
