"""The served cascade's latency under load, beside the student served alone: a local cluster (Tansu, a
Kafka-compatible broker, not Apache Kafka, carrying the teacher's labels), the calibrated student on
Triton (`pgkd serve`), the simulated LLM on Triton (`pgkd teacher serve`: a simulation, not an LLM, that
takes `--llm-latency` seconds an answer, an assumption standing for a hosted LLM's), and `pgkd cascade
serve` in front; `--clients` threads each send one test text a request, one after the other, for
`--seconds`, first to the student alone, then to the cascade.

    python -m pgkd_services.bench_cascade --data ../shared/data/banking77

The student: the frozen-encoder student (MiniLM and a linear head) trained on `--labeled` labels (no
teaching cycles: the served path is what is measured), calibrated, its threshold chosen to send at most
`--max-teacher-share` of the held texts to the LLM.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import threading
import time
from pathlib import Path

import numpy as np

from pgkd.data import load_dataset
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.net import free_ports

from pgkd_services.local import LocalCluster, _http_ok


def load(url: str, model: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads, each sending one text a request in a closed loop for `seconds`: latencies,
    failures, and who answered (the cascade's `answered_by`)."""
    import tritonclient.http as client
    latencies, failures, answered, lock = [], [], {}, threading.Lock()
    stop = time.monotonic() + seconds

    def work(n: int) -> None:
        rng = random.Random(n)
        with client.InferenceServerClient(url, connection_timeout=60, network_timeout=60) as c:
            while time.monotonic() < stop:
                value = np.array([[rng.choice(texts).encode()]], dtype=object)
                inputs = [client.InferInput("text", [1, 1], "BYTES")]
                inputs[0].set_data_from_numpy(value)
                began = time.perf_counter()
                try:
                    result = c.infer(model, inputs)
                except Exception as e:  # noqa: BLE001 -- counted: the goal is that none fails
                    with lock:
                        failures.append(str(e)[:200])
                    continue
                took = time.perf_counter() - began
                who = result.as_numpy("answered_by")[0][0].decode() if model == "cascade" else "student"
                with lock:
                    latencies.append(took)
                    answered[who] = answered.get(who, 0) + 1
    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "failed": len(failures), "failures": failures[:5],
            "per_second": round(len(latencies) / seconds, 1), "answered_by": answered,
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "mean_ms": round(float(ms.mean()), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/banking77")
    parser.add_argument("--labeled", type=int, default=1000)
    parser.add_argument("--max-teacher-share", type=float, default=0.2)
    parser.add_argument("--llm-accuracy", type=float, default=0.95)
    parser.add_argument("--llm-latency", type=float, default=0.5, help="seconds the simulated LLM takes an answer")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--instances", type=int, default=16, help="the cascade's requests served at once")
    parser.add_argument("--teacher-concurrency", type=int, default=16, help="the cascade's teacher calls at once")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/cascade-serve")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    with LocalCluster(out, quiet=False, prometheus=False) as cluster:
        # No teaching cycle: guided out of fold, validation stays unseen and the threshold is chosen there.
        config = DistillConfig(data=args.data, labeled=args.labeled, student="minilm-frozen", teacher="pool-random",
                               max_cycles=0, seed=args.seed, max_teacher_share=args.max_teacher_share,
                               guidance_source="out-of-fold")
        result = run(config, out / "run", progress=False)
        exported = cluster.spawn("export", cluster.pgkd_argv("export", str(out / "run" / "best"), "--out",
                                                            str(out / "models")))
        if exported.wait() != 0:
            raise SystemExit(cluster.tail("export"))
        student_ports, teacher_ports, cascade_ports = free_ports(3), free_ports(3), free_ports(4)
        cluster.spawn("student-server", cluster.pgkd_argv(
            "serve", "--model", str(out / "models"), *ports_args(student_ports)),
            ready=_http_ok(f"http://127.0.0.1:{student_ports[0]}/v2/models/student/ready"), message="student")
        cluster.spawn("teacher", cluster.pgkd_argv(
            "teacher", "serve", "--kind", "pool-random", "--data", args.data, "--labeled", str(args.labeled),
            "--seed", str(args.seed), "--llm-accuracy", str(args.llm_accuracy), "--latency", str(args.llm_latency),
            *ports_args(teacher_ports)),
            ready=_http_ok(f"http://127.0.0.1:{teacher_ports[0]}/v2/models/teacher/ready"), message="teacher")
        cluster.ready()
        cluster.spawn("cascade", cluster.pgkd_argv(
            "cascade", "serve", "--student", f"http://127.0.0.1:{student_ports[0]}", "--teacher",
            f"triton://127.0.0.1:{teacher_ports[0]}/teacher", "--calibration", str(out / "models" / "student"),
            "--data", args.data, "--publish-labels", "--instances", str(args.instances),
            "--teacher-concurrency", str(args.teacher_concurrency), *ports_args(cascade_ports[:3]),
            "--cascade-metrics-port", str(cascade_ports[3])),
            ready=_http_ok(f"http://127.0.0.1:{cascade_ports[0]}/v2/models/cascade/ready"), message="cascade")
        cluster.ready()
        texts = [s.text for s in load_dataset(args.data).test]
        load(f"127.0.0.1:{cascade_ports[0]}", "cascade", texts, args.clients, 5)     # warm both paths
        student = load(f"127.0.0.1:{student_ports[0]}", "student", texts, args.clients, args.seconds)
        cascade = load(f"127.0.0.1:{cascade_ports[0]}", "cascade", texts, args.clients, args.seconds)
        metrics = {line.split()[0]: float(line.split()[1]) for line in
                   __import__("urllib.request").request.urlopen(
                       f"http://127.0.0.1:{cascade_ports[3]}/metrics", timeout=10).read().decode().splitlines()
                   if line.startswith("pgkd_cascade_") and not line.startswith("#") and "_bucket" not in line}
    record = {"command": "python -m pgkd_services.bench_cascade " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
              "simulated_llm": {"accuracy": args.llm_accuracy, "latency_s": args.llm_latency, "simulated": True},
              "threshold": result.report.calibration["deferral"], "student_alone": student, "cascade": cascade,
              "cascade_metrics": metrics}
    (out / "serve.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"student_alone": student, "cascade": cascade}, indent=2))
    return 0


def ports_args(ports: list[int]) -> list[str]:
    return ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]


if __name__ == "__main__":
    raise SystemExit(main())
