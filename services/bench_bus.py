"""The bus's cost: the same run embedded (`pgkd distill`) and through the four services as OS
processes over a local Kafka-protocol broker (Tansu: Kafka-compatible, not Apache Kafka), one after
the other on this machine; their wall times, and whether their reports are equal but for times.

    python -m pgkd_services.bench_bus --data ../shared/data/banking77

The embedded wall time is `pgkd distill`'s process, start to exit; the services' is `pgkd submit
--wait`'s, start to exit, on a cluster already started (broker, Prometheus, the services connected).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pgkd.distributed.artifacts import ArtifactStore
from pgkd.loop.report import without_times

from pgkd_services.local import LocalCluster

OPTIONS = ("--labeled 1000 --teacher pool-guided --student minilm --samples-per-cycle 32 --max-cycles 3 "
           "--patience 5 --seed 1")   # `make demo`'s, 3 cycles, the guided simulation in process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgkd_services.bench_bus", description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/bench/bus-services")
    parser.add_argument("--run-options", default=OPTIONS)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    options = ["--data", str(Path(args.data).resolve()), *args.run_options.split()]

    with LocalCluster(out / "cluster", quiet=True) as cluster:
        cluster.start_services()
        time.sleep(10)    # the consumer groups settle (Tansu answers joins after a few seconds)
        started = time.perf_counter()
        submit = subprocess.run(cluster.pgkd_argv("submit", "--wait", "--run-id", "bus", *options), env=cluster.env,
                                capture_output=True, text=True)
        services_wall = time.perf_counter() - started
        if submit.returncode != 0:
            raise SystemExit(f"the services' run failed: {submit.stderr[-2000:]}")
        services_report = ArtifactStore(cluster.env["PGKD_ARTIFACTS"]).get_json("runs/bus/report.json")

    embedded_out = out / "embedded"
    started = time.perf_counter()
    embedded = subprocess.run(cluster.pgkd_argv("distill", *options, "--out", str(embedded_out), "--no-progress"),
                              env=cluster.env, capture_output=True, text=True)
    embedded_wall = time.perf_counter() - started
    if embedded.returncode != 0:
        raise SystemExit(f"the embedded run failed: {embedded.stderr[-2000:]}")
    embedded_report = json.loads((embedded_out / "report.json").read_text())

    result = {"run_options": args.run_options, "data": args.data,
              "embedded_seconds": round(embedded_wall, 1), "services_seconds": round(services_wall, 1),
              "ratio": round(services_wall / embedded_wall, 4),
              "embedded_training_seconds": round(sum(c["training"]["seconds"] for c in embedded_report["cycles"]), 1),
              "services_training_seconds": round(sum(c["training"]["seconds"] for c in services_report["cycles"]), 1),
              "reports_equal_but_times": without_times(services_report) == without_times(embedded_report),
              "validation": {"embedded": [c["validation"]["macro_f1"] for c in embedded_report["cycles"]],
                             "services": [c["validation"]["macro_f1"] for c in services_report["cycles"]]}}
    (out / "bus.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
