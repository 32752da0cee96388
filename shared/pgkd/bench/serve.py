"""`pgkd bench serve`: the student as it answers traffic, every path side by side in one run, on one machine.

Paths: in-process torch (`predict_proba`), in-process ONNX Runtime fp32 and int8 (the graphs `pgkd
export` writes), and the student served on a real Triton server (the bundled tritonserver here,
`pgkd serve`'s repository: ONNX fp32 in the Python-backend model) over HTTP and gRPC. For each:
- latency p50 / p99 of a call at batch 1, 32 and 64;
- throughput and accuracy over the whole test split, in calls of 64 texts;
- 16 concurrent clients each sending one text per call (the served paths batch them: dynamic
  batching; the in-process ones run them in threads over one model);
- the serving overhead at batch 64 against the same graph in process, and the cost per million
  texts at a stated price per CPU-hour.
The client and the server share this machine's cores, as they would not in production: the served
figures are a floor.

`--batching-delays 2000,500,0` measures the served model's dynamic-batching delay instead
(`run_batching_bench`): one server holding the same version under each delay, the delays measured in turn
in each of `--repeats` rounds, at 1 client (latency) and at `--clients` (throughput), over gRPC and HTTP,
with Triton's own queue time per request.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from pgkd.bench.speed import latency, onnx_predictor, percentile_ms, processor
from pgkd.data import load_dataset
from pgkd.errors import UserError
from pgkd.loop.cycle import log
from pgkd.files import write_json_atomic
from pgkd.serving.client import StudentClient
from pgkd.serving.graph import export_onnx, quantize_int8
from pgkd.serving.repository import MAX_QUEUE_DELAY_US, OWNER, config_text, model_folder, write_version
from pgkd.serving.server import explicit_control
from pgkd.serving.tritonserver import run_tritonserver
from pgkd.students import load_student
from pgkd.students.finetuned import FineTunedStudent
from pgkd.ownership import claim_folder

BATCHES = (1, 32, 64)

# The PGKD paper's Table 5, theirs, not measured here: a batch of 64 texts.
PAPER_TABLE_5 = {"student_gpu_seconds_per_64": 0.46, "claude3_seconds_per_64": 60.64, "speedup": 130,
                 "cost_ratio": 25}


def _concurrent(make_predict, texts: list[str], clients: int, calls: int) -> dict:
    """`clients` threads, each with its own predictor (its own connection for the served paths),
    `calls` one-text calls each."""
    times: list[float] = []
    lock = threading.Lock()
    predictors = [make_predict() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        predict, mine = predictors[k], []
        barrier.wait()
        for i in range(calls):
            started = time.perf_counter()
            predict([texts[(k * calls + i) % len(texts)]])
            mine.append(time.perf_counter() - started)
        with lock:
            times.extend(mine)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {"clients": clients, "calls_each": calls, "p50_ms": percentile_ms(times, 50),
            "p99_ms": percentile_ms(times, 99),
            "texts_per_second": clients * calls / seconds}


def _accuracy_and_throughput(predict_labels, texts: list[str], gold: list[str], batch: int = 64) -> dict:
    started = time.perf_counter()
    labels: list[str] = []
    for start in range(0, len(texts), batch):
        labels += predict_labels(texts[start:start + batch])
    seconds = time.perf_counter() - started
    return {"accuracy": float(np.mean([a == b for a, b in zip(labels, gold, strict=True)])),
            "texts_per_second": len(texts) / seconds, "labels": labels}


def run_serve_bench(model: Path, data: Path, out: Path, price_per_cpu_hour: float = 0.05, calls: int = 50,
                    clients: int = 16, client_calls: int = 20, test_texts: int | None = None) -> dict:
    if not Path(model).is_dir():
        raise UserError(f"--model {model}: no such student folder (make demo writes runs/demo/best)")
    student = load_student(model, device="cpu")
    if not isinstance(student, FineTunedStudent):
        raise UserError(f"--model {model}: bench serve measures a fine-tuned student (pgkd distill --student minilm)")
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    test = load_dataset(data).test
    test = test[:test_texts] if test_texts else test
    unknown = sorted({s.label for s in test} - set(student.labels))
    if unknown:
        raise UserError(f"--model {model}: its labels are not the classes of {data} (e.g. {unknown[0]!r})")
    texts, gold = [s.text for s in test], [s.label for s in test]
    cores = torch.get_num_threads()
    result: dict = {"machine": {"processor": processor(), "cpu_threads": cores,
                                "torch": torch.__version__},
                    "config": {"model": str(model), "data": str(data), "test_texts": len(texts), "calls": calls,
                               "clients": clients, "client_calls": client_calls,
                               "price_per_cpu_hour": price_per_cpu_hour},
                    "paper_table_5": PAPER_TABLE_5, "paths": {}}

    def to_labels(predict_proba):
        return lambda batch: [student.labels[i] for i in np.asarray(predict_proba(batch)).argmax(1)]

    with tempfile.TemporaryDirectory() as tmp:
        log("bench serve: exporting ONNX fp32 and int8 ...")
        fp32 = export_onnx(student, Path(tmp) / "fp32.onnx")
        int8 = quantize_int8(fp32, Path(tmp) / "int8.onnx")
        repository = Path(tmp) / "models"
        write_version(repository, student, {"folder": str(model), "bench": "serve"})
        # In process, the concurrent clients share one model (one session), as threads of one server would.
        in_process = {"torch": lambda batch: student.predict_proba(batch, batch_size=64),
                      "onnx_fp32": onnx_predictor(student, fp32, batch_size=64),
                      "onnx_int8": onnx_predictor(student, int8, batch_size=64)}
        for name, predict in in_process.items():
            result["paths"][name] = _measure(name, lambda predict=predict: predict, to_labels, texts, gold, calls,
                                             clients, client_calls)
        log("bench serve: starting the Triton server ...")
        with run_tritonserver(repository, models=["student"], extra_args=explicit_control()) as server:
            for name, url in (("served_http", f"http://{server.http_url}"), ("served_grpc", f"grpc://{server.grpc_url}")):
                def make(url=url):
                    client = StudentClient(url, timeout=120)
                    return lambda batch: client.infer(batch)["probabilities"]
                result["paths"][name] = _measure(name, make, to_labels, texts, gold, calls, clients, client_calls)

    paths = result["paths"]
    reference = paths["torch"]["test"]["labels"]
    for name, path in paths.items():
        path["test"]["agreement_with_torch"] = float(np.mean([a == b for a, b in
                                                             zip(path["test"].pop("labels"), reference, strict=True)]))
        path["test"]["accuracy_change_points"] = 100 * (path["test"]["accuracy"] - paths["torch"]["test"]["accuracy"])
        # cores busy for a million texts at the batch-64 throughput, at the stated price
        path["cost_per_million_texts"] = 1e6 / path["test"]["texts_per_second"] / 3600 * cores * price_per_cpu_hour
    at64 = {name: next(x for x in p["latency"] if x["batch"] == 64)["p50_ms"] for name, p in paths.items()}
    result["serving_overhead_at_batch_64"] = {
        f"{served}_vs_{base}": at64[served] / at64[base] - 1
        for served in ("served_http", "served_grpc") for base in ("onnx_fp32", "torch")}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "serve.json", result)
    (out / "serve.md").write_text(markdown(result), encoding="utf-8")
    return result


def _measure(name, make, to_labels, texts, gold, calls, clients, client_calls) -> dict:
    log(f"bench serve: {name} ...")
    predict = make()
    predict(texts[:64])   # warm up
    latencies = [latency(predict, texts, b, max(10, calls // (1 if b == 1 else 3))) for b in BATCHES]
    test = _accuracy_and_throughput(to_labels(predict), texts, gold)
    concurrent = _concurrent(make, texts, clients, client_calls)
    return {"latency": latencies, "test": test, "concurrent": concurrent}


NAMES = {"torch": "in-process torch", "onnx_fp32": "in-process ONNX fp32", "onnx_int8": "in-process ONNX int8",
         "served_http": "served (Triton), HTTP", "served_grpc": "served (Triton), gRPC"}


def markdown(r: dict) -> str:
    c, paths = r["config"], r["paths"]
    lines = [f"Machine: {r['machine']['processor']}, {r['machine']['cpu_threads']} threads, CPU, torch "
             f"{r['machine']['torch']}; student {c['model']}; test split of {c['data']} ({c['test_texts']} texts); "
             f"client and server on the same cores.", "",
             "| path | batch 1 p50 / p99 ms | batch 32 p50 / p99 ms | batch 64 p50 / p99 ms | texts/s (batches of 64) "
             f"| {c['clients']} clients, p50 / p99 ms, texts/s | test accuracy (change) | $ per 1M texts |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in paths.items():
        lat = " | ".join(f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f}" for x in p["latency"])
        cc = p["concurrent"]
        t = p["test"]
        lines.append(f"| {NAMES[name]} | {lat} | {t['texts_per_second']:.0f} | {cc['p50_ms']:.1f} / {cc['p99_ms']:.1f}, "
                     f"{cc['texts_per_second']:.0f} | {t['accuracy']:.4f} ({t['accuracy_change_points']:+.2f}) | "
                     f"{p['cost_per_million_texts']:.3f} |")
    o = r["serving_overhead_at_batch_64"]
    lines += ["", f"Serving overhead at batch 64 (p50, against the same ONNX graph in process): HTTP "
              f"{100 * o['served_http_vs_onnx_fp32']:+.1f}%, gRPC {100 * o['served_grpc_vs_onnx_fp32']:+.1f}% "
              f"(against in-process torch: HTTP {100 * o['served_http_vs_torch']:+.1f}%, gRPC "
              f"{100 * o['served_grpc_vs_torch']:+.1f}%).",
              f"Cost: {r['machine']['cpu_threads']} CPU threads busy at the batch-64 throughput, at "
              f"${c['price_per_cpu_hour']} per CPU-hour.",
              "", f"The paper's Table 5 (theirs, not measured here): a batch of 64 in "
              f"{PAPER_TABLE_5['student_gpu_seconds_per_64']} s for the student on GPU against "
              f"{PAPER_TABLE_5['claude3_seconds_per_64']} s for Claude 3: {PAPER_TABLE_5['speedup']}x faster, "
              f"{PAPER_TABLE_5['cost_ratio']}x cheaper."]
    return "\n".join(lines) + "\n"


# --- the batching delay ---------------------------------------------------------------------------------

def _queue_stats(http_url: str, model: str) -> tuple[int, int]:
    """(requests, nanoseconds they spent in Triton's queue) so far, from the model's statistics."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=30) as response:
        stats = json.loads(response.read())["model_stats"][0]["inference_stats"]
    return int(stats["queue"]["count"]), int(stats["queue"]["ns"])


def _delay_model(delay_us: int) -> str:
    return f"student_delay_{delay_us}us"


def run_batching_bench(model: Path, data: Path, out: Path, delays: list[int], repeats: int = 3, calls: int = 100,
                       clients: int = 16, client_calls: int = 20, test_texts: int | None = None) -> dict:
    """The served student under each dynamic-batching delay in `delays` (microseconds), side by side:
    one server, the same version as one model per delay; in each of `repeats` rounds every delay is
    measured in turn (the order rotating), over gRPC and HTTP, at 1 client (`calls` one-text calls: the
    latency) and at `clients` concurrent clients (`client_calls` one-text calls each: the throughput).
    The medians over the rounds go in batching.json and batching.md in `out`."""
    if not delays or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in delays) \
            or len(set(delays)) != len(delays):
        raise UserError(f"--batching-delays {','.join(map(str, delays))}: distinct whole microseconds, 0 or more")
    for name, value in (("--repeats", repeats), ("--calls", calls), ("--clients", clients),
                        ("--client-calls", client_calls)):
        if value < 1:
            raise UserError(f"{name} {value}: must be 1 or more")
    if not Path(model).is_dir():
        raise UserError(f"--model {model}: no such student folder (make demo writes runs/demo/best)")
    student = load_student(model, device="cpu")
    out = claim_folder(out)
    test = load_dataset(data).test
    texts = [s.text for s in (test[:test_texts] if test_texts else test)]
    result: dict = {"machine": {"processor": processor(), "cpu_threads": torch.get_num_threads()},
                    "config": {"model": str(model), "data": str(data), "texts": len(texts), "delays_us": delays,
                               "default_delay_us": MAX_QUEUE_DELAY_US, "repeats": repeats, "calls": calls,
                               "clients": clients, "client_calls": client_calls},
                    "rounds": []}
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        log("bench serve: exporting the student ...")
        version = write_version(repository, student, {"folder": str(model), "bench": "serve --batching-delays"})
        names = [_delay_model(d) for d in delays]
        for delay, name in zip(delays, names):   # the same version, under another delay
            folder = model_folder(repository, name)
            shutil.copytree(version.path, folder / str(version.number))
            for extra in ("labels.txt", OWNER):
                shutil.copyfile(version.path.parent / extra, folder / extra)
            (folder / "config.pbtxt").write_text(config_text(name, max_queue_delay_us=delay), encoding="utf-8")
        shutil.rmtree(version.path.parent)
        log(f"bench serve: starting the Triton server ({len(delays)} models: delays {delays} us) ...")
        with run_tritonserver(repository, models=names, extra_args=explicit_control(names[0]) +
                              [f"--load-model={n}" for n in names[1:]]) as server:
            urls = {"grpc": f"grpc://{server.grpc_url}", "http": f"http://{server.http_url}"}

            def make(protocol: str, name: str):
                def new():
                    client = StudentClient(urls[protocol], model=name, timeout=120)
                    return lambda batch: client.infer(batch)
                return new
            for name in names:    # warm up: each model's first calls load its session's kernels
                predict = make("grpc", name)()
                for i in range(20):
                    predict([texts[i % len(texts)]])
            for round_number in range(repeats):
                order = delays[round_number % len(delays):] + delays[:round_number % len(delays)]
                for delay in order:
                    name = _delay_model(delay)
                    for protocol in urls:
                        log(f"bench serve: round {round_number + 1}/{repeats}, delay {delay} us, {protocol} ...")
                        row = {"round": round_number + 1, "delay_us": delay, "protocol": protocol}
                        for key, run in (("one_client", lambda: _concurrent(make(protocol, name), texts, 1, calls)),
                                         ("clients", lambda: _concurrent(make(protocol, name), texts, clients,
                                                                         client_calls))):
                            before = _queue_stats(server.http_url, name)
                            row[key] = run()
                            after = _queue_stats(server.http_url, name)
                            count = after[0] - before[0]
                            row[key]["queue_ms"] = (after[1] - before[1]) / count / 1e6 if count else 0.0
                        result["rounds"].append(row)
    result["summary"] = _batching_summary(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "batching.json", result)
    (out / "batching.md").write_text(batching_markdown(result), encoding="utf-8")
    return result


def _batching_summary(result: dict) -> list[dict]:
    """Per delay and protocol, the median over the rounds of each figure (and its spread: min, max)."""
    rows = []
    for delay in result["config"]["delays_us"]:
        for protocol in ("grpc", "http"):
            mine = [r for r in result["rounds"] if r["delay_us"] == delay and r["protocol"] == protocol]
            row = {"delay_us": delay, "protocol": protocol}
            for key in ("one_client", "clients"):
                for figure in ("p50_ms", "p99_ms", "texts_per_second", "queue_ms"):
                    values = [r[key][figure] for r in mine]
                    row[f"{key}_{figure}"] = statistics.median(values)
                    row[f"{key}_{figure}_range"] = [min(values), max(values)]
            rows.append(row)
    return rows


def batching_markdown(r: dict) -> str:
    c = r["config"]
    lines = [f"Machine: {r['machine']['processor']}, {r['machine']['cpu_threads']} threads, CPU; student {c['model']}; "
             f"{c['texts']} test texts of {c['data']}; one server, the same version under each delay; "
             f"{c['repeats']} rounds, the delays in turn in each; medians over the rounds (min-max in brackets for "
             "texts/s); client and server on the same cores.", "",
             f"| delay | protocol | 1 client: p50 / p99 ms | 1 client: queue ms | 1 client: texts/s | {c['clients']} "
             f"clients: p50 / p99 ms | {c['clients']} clients: queue ms | {c['clients']} clients: texts/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["summary"]:
        low, high = row["clients_texts_per_second_range"]
        lines.append(
            f"| {row['delay_us']} us{' (default)' if row['delay_us'] == c['default_delay_us'] else ''} | "
            f"{row['protocol']} | {row['one_client_p50_ms']:.1f} / {row['one_client_p99_ms']:.1f} | "
            f"{row['one_client_queue_ms']:.2f} | {row['one_client_texts_per_second']:.0f} | "
            f"{row['clients_p50_ms']:.1f} / {row['clients_p99_ms']:.1f} | {row['clients_queue_ms']:.2f} | "
            f"{row['clients_texts_per_second']:.0f} ({low:.0f}-{high:.0f}) |")
    return "\n".join(lines) + "\n"
