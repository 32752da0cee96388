"""The bus's cost: the same run embedded (`pgkd distill`) and through the four services as OS
processes over a local Kafka-protocol broker (Tansu: Kafka-compatible, not Apache Kafka), one after
the other on this machine; their wall times, and whether their reports are equal but for times.

    python -m pgkd_services.bench_bus --data ../shared/data/banking77

The embedded wall time is `pgkd distill`'s process, start to exit; the services' is `pgkd submit
--wait`'s, start to exit, on a cluster already started (broker, Prometheus, the services connected):
once on fresh service processes (cold), then the same run again on the same processes (warm: their
models loaded, the teacher's pool embedded).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pgkd.artifacts import ArtifactStore
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
        services_wall, services_report = {}, {}
        for run_id in ("cold", "warm"):
            started = time.perf_counter()
            submit = subprocess.run(cluster.pgkd_argv("submit", "--wait", "--run-id", run_id, *options),
                                    env=cluster.env, capture_output=True, text=True)
            services_wall[run_id] = time.perf_counter() - started
            if submit.returncode != 0:
                raise SystemExit(f"the services' {run_id} run failed: {submit.stderr[-2000:]}")
            services_report[run_id] = ArtifactStore(cluster.env["PGKD_ARTIFACTS"]).get_json(f"runs/{run_id}/report.json")

    embedded_out = out / "embedded"
    started = time.perf_counter()
    embedded = subprocess.run(cluster.pgkd_argv("distill", *options, "--out", str(embedded_out), "--no-progress"),
                              env=cluster.env, capture_output=True, text=True)
    embedded_wall = time.perf_counter() - started
    if embedded.returncode != 0:
        raise SystemExit(f"the embedded run failed: {embedded.stderr[-2000:]}")
    embedded_report = json.loads((embedded_out / "report.json").read_text())

    phases = lambda report: {phase: round(sum(c["timings"][phase] for c in report["cycles"]), 1)  # noqa: E731
                             for phase in report["cycles"][0]["timings"]}
    result = {"run_options": args.run_options, "data": args.data, "embedded_seconds": round(embedded_wall, 1),
              **{f"services_{k}_seconds": round(v, 1) for k, v in services_wall.items()},
              **{f"ratio_{k}": round(v / embedded_wall, 4) for k, v in services_wall.items()},
              "reports_equal_but_times": all(without_times(r) == without_times(embedded_report)
                                             for r in services_report.values()),
              "phase_seconds": {"embedded": phases(embedded_report),
                                **{k: phases(r) for k, r in services_report.items()}},
              "cycle_seconds": {"embedded": [round(c["seconds"], 1) for c in embedded_report["cycles"]],
                                **{k: [round(c["seconds"], 1) for c in r["cycles"]]
                                   for k, r in services_report.items()}},
              "validation": {"embedded": [c["validation"]["macro_f1"] for c in embedded_report["cycles"]],
                             **{k: [c["validation"]["macro_f1"] for c in r["cycles"]]
                                for k, r in services_report.items()}}}
    (out / "bus.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
