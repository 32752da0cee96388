"""`pgkd bench speed`: how fast the student trains and answers, next to the usual Hugging Face tools.

All in one run, on the same model, data, batch size and machine:
- training throughput of `FineTunedStudent.train` against `transformers.Trainer`;
- inference throughput and latency (p50 / p99 at batch 1 and 32) of `FineTunedStudent.predict_proba`
  against `pipeline("text-classification")`;
- the student exported to ONNX and run with ONNX Runtime, fp32 and dynamically quantized to int8
  (pgkd.serving.graph, as `pgkd export` writes them): throughput and the change in test accuracy;
- the hardware ceiling: this machine's measured matrix-multiply rate against the student's FLOPs per text.
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pgkd.data import load_dataset, make_splits
from pgkd.types import Sample, TrainConfig
from pgkd.loop.cycle import log
from pgkd.errors import UserError
from pgkd.files import write_json_atomic
from pgkd.serving.graph import export_onnx, quantize_int8
from pgkd.encoder import length_sorted_batches, pick_device
from pgkd.students.finetuned import FineTunedStudent
from pgkd.ownership import claim_folder


def processor() -> str:
    """The CPU's model name where Linux says it (`platform.processor()` is often just the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


def latency(predict, texts: list[str], batch: int, repeats: int) -> dict:
    """`repeats` calls of `batch` texts each: p50 / p99 of a call, and texts per second over them."""
    times = []
    for i in range(repeats):
        chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        started = time.perf_counter()
        predict(chunk)
        times.append(time.perf_counter() - started)
    return {"batch": batch, "calls": repeats, "p50_ms": percentile_ms(times, 50), "p99_ms": percentile_ms(times, 99),
            "texts_per_second": batch * repeats / sum(times)}


def _throughput(predict, texts: list[str]) -> float:
    started = time.perf_counter()
    predict(texts)
    return len(texts) / (time.perf_counter() - started)


def _accuracy(probs: np.ndarray, samples: list[Sample], labels: list[str]) -> float:
    return float(np.mean([labels[i] == s.label for i, s in zip(probs.argmax(1), samples, strict=True)]))


def train_with_hf_trainer(student: FineTunedStudent, train: list[Sample], config: TrainConfig) -> dict:
    """The same model, data and hyperparameters through transformers.Trainer."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    ids = student.tokenizer([s.text for s in train], truncation=True, max_length=config.max_length)["input_ids"]
    rows = [{"input_ids": i, "labels": student.label_index[s.label]} for i, s in zip(ids, train, strict=True)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=config.batch_size,
                                 num_train_epochs=config.epochs, learning_rate=config.learning_rate,
                                 weight_decay=config.weight_decay, warmup_steps=config.warmup_ratio,  # a float: a ratio
                                 max_grad_norm=config.max_grad_norm, lr_scheduler_type="linear", seed=config.seed,
                                 logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=student.device.type == "cpu",
                                 bf16=student.device.type == "cuda")
        trainer = Trainer(model=student.model, args=args, train_dataset=rows,
                          data_collator=DataCollatorWithPadding(student.tokenizer))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    samples = len(train) * config.epochs
    return {"samples": samples, "seconds": seconds, "samples_per_second": samples / seconds}


def onnx_predictor(student: FineTunedStudent, path: Path, batch_size: int = 64):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def predict(texts: list[str]) -> np.ndarray:
        ids = student.tokenizer(list(texts), truncation=True, max_length=128)["input_ids"]
        out = np.zeros((len(ids), len(student.labels)), dtype=np.float32)
        for index in length_sorted_batches(ids, batch_size):
            batch = student.tokenizer.pad({"input_ids": [ids[i] for i in index]}, return_tensors="np")
            logits = session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                        "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
            e = np.exp(logits - logits.max(1, keepdims=True))
            out[index] = e / e.sum(1, keepdims=True)
        return out
    return predict


def matmul_rate(device: torch.device, size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 (CPU) or bf16 (CUDA) matrix-multiply rate in FLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - started)


def student_flops_per_text(student: FineTunedStudent, tokens: float) -> float:
    """Forward FLOPs of one text of `tokens` tokens: 2 per weight per token outside the embedding
    tables, plus attention's two T x T products per layer."""
    config = student.model.config
    embedding = sum(p.numel() for n, p in student.model.named_parameters() if "embeddings" in n)
    dense = sum(p.numel() for p in student.model.parameters()) - embedding
    attention = 4 * config.num_hidden_layers * tokens * tokens * config.hidden_size
    return 2 * dense * tokens + attention


def run_speed(data: Path, out: Path, student_spec: str = "minilm", train_samples: int = 800, epochs: int = 2,
              inference_texts: int = 1000, batch_size: int = 32, latency_calls: int = 100, device: str = "auto",
              onnx: bool = True, seed: int = 1, model: Path | None = None) -> dict:
    """`model`: a saved student (e.g. runs/demo/best) to measure inference and accuracy on; by default
    the student the training measurement just trained."""
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    dev = pick_device(device)
    dataset = load_dataset(data)
    splits = make_splits(dataset, min(len(dataset.train), max(train_samples * 5 // 4, len(dataset.labels))), seed)
    shipped = FineTunedStudent.load(model, device=device) if model is not None else None
    if shipped is not None and shipped.labels != splits.labels:
        raise UserError(f"--model {model}: its labels are not the classes of {data}")
    train = splits.train[:train_samples]
    test = splits.test[:inference_texts]
    texts = [s.text for s in test]
    config = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed)
    result: dict = {"machine": {"processor": processor(),
                                "cpu_threads": torch.get_num_threads(), "device": str(dev),
                                "torch": torch.__version__},
                    "config": {"data": str(data), "student": student_spec, "train_samples": len(train),
                               "epochs": epochs, "batch_size": batch_size, "inference_texts": len(texts),
                               "latency_calls": latency_calls, "seed": seed,
                               "inference_model": str(model) if model else "the student trained above"}}

    log("speed: training with FineTunedStudent.train ...")
    ours = FineTunedStudent.create(student_spec, splits.labels, seed=seed, device=device)
    trained = ours.train(train, [], config, progress=False)
    log("speed: training with transformers.Trainer ...")
    theirs = FineTunedStudent.create(student_spec, splits.labels, seed=seed, device=device)
    hf = train_with_hf_trainer(theirs, train, config)
    result["training"] = {
        "pgkd_samples_per_second": trained.samples_per_second, "trainer_samples_per_second": hf["samples_per_second"],
        "ratio": trained.samples_per_second / hf["samples_per_second"],
        "note": "same model, data, batch size, epochs, learning rate and schedule; FineTunedStudent.train freezes the word "
                "embeddings and batches texts of similar length, the Trainer trains every weight in random batches"}

    if shipped is not None:
        ours = shipped
    log("speed: inference ...")
    from transformers import pipeline
    pipe = pipeline("text-classification", model=ours.model, tokenizer=ours.tokenizer, device=ours.device,
                    top_k=None)

    def pipe_predict(batch: list[str], size: int = batch_size):
        return pipe(batch, batch_size=size, truncation=True, max_length=128)

    ours.predict_proba(texts[:64])
    pipe_predict(texts[:64])     # warm both up
    ours_tput = _throughput(lambda t: ours.predict_proba(t, batch_size=batch_size), texts)
    pipe_tput = _throughput(pipe_predict, texts)
    result["inference"] = {
        "pgkd_texts_per_second": ours_tput, "pipeline_texts_per_second": pipe_tput, "ratio": ours_tput / pipe_tput,
        "latency": {
            "pgkd": [latency(lambda t: ours.predict_proba(t, batch_size=b), texts, b, n)
                     for b, n in ((1, latency_calls), (batch_size, max(10, latency_calls // 5)))],
            "pipeline": [latency(lambda t: pipe_predict(t, b), texts, b, n)
                         for b, n in ((1, latency_calls), (batch_size, max(10, latency_calls // 5)))]}}

    torch_probs = ours.predict_proba([s.text for s in splits.test])
    torch_accuracy = _accuracy(torch_probs, splits.test, splits.labels)
    result["accuracy"] = {"test_samples": len(splits.test), "torch": torch_accuracy}
    if onnx and dev.type == "cpu":
        log("speed: ONNX Runtime, fp32 and int8 ...")
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(ours, Path(tmp) / "student.onnx")
            int8 = quantize_int8(fp32, Path(tmp) / "student.int8.onnx")
            for name, path in (("onnx_fp32", fp32), ("onnx_int8", int8)):
                predict = onnx_predictor(ours, path, batch_size=batch_size)
                predict(texts[:64])
                tput = _throughput(predict, texts)
                accuracy = _accuracy(predict([s.text for s in splits.test]), splits.test, splits.labels)
                result["inference"][f"{name}_texts_per_second"] = tput
                result["inference"][f"{name}_ratio_to_pipeline"] = tput / pipe_tput
                result["accuracy"][name] = accuracy
                result["accuracy"][f"{name}_change_points"] = 100 * (accuracy - torch_accuracy)

    tokens = statistics.fmean(len(i) for i in ours.tokenizer(texts, truncation=True, max_length=128)["input_ids"])
    rate = matmul_rate(dev)
    flops = student_flops_per_text(ours, tokens)
    result["ceiling"] = {"matmul_gflops": rate / 1e9, "mean_tokens_per_text": tokens,
                         "student_gflops_per_text": flops / 1e9, "ceiling_texts_per_second": rate / flops,
                         "pgkd_share_of_ceiling": ours_tput / (rate / flops)}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "speed.json", result)
    (out / "speed.md").write_text(markdown(result), encoding="utf-8")
    return result


def markdown(r: dict) -> str:
    t, i, a, c = r["training"], r["inference"], r["accuracy"], r["ceiling"]
    lines = [f"Machine: {r['machine']['processor']}, {r['machine']['cpu_threads']} threads, {r['machine']['device']}, "
             f"torch {r['machine']['torch']}; student {r['config']['student']}, batch {r['config']['batch_size']}; "
             f"inference on {r['config']['inference_model']}.",
             "", "| measure | pgkd | Hugging Face | ratio |", "|---|---|---|---|",
             f"| training, samples/s | {t['pgkd_samples_per_second']:.1f} | {t['trainer_samples_per_second']:.1f} "
             f"(Trainer) | {t['ratio']:.2f}x |",
             f"| inference, texts/s | {i['pgkd_texts_per_second']:.1f} | {i['pipeline_texts_per_second']:.1f} "
             f"(pipeline) | {i['ratio']:.2f}x |"]
    for ours, theirs in zip(i["latency"]["pgkd"], i["latency"]["pipeline"], strict=True):
        lines.append(f"| latency at batch {ours['batch']}, p50 / p99 ms | {ours['p50_ms']:.1f} / "
                     f"{ours['p99_ms']:.1f} | {theirs['p50_ms']:.1f} / {theirs['p99_ms']:.1f} | "
                     f"{theirs['p50_ms'] / ours['p50_ms']:.2f}x |")
    for name in ("onnx_fp32", "onnx_int8"):
        if f"{name}_texts_per_second" in i:
            lines.append(f"| {name.replace('_', ' ')} (ONNX Runtime), texts/s | {i[f'{name}_texts_per_second']:.1f} | "
                         f"{i['pipeline_texts_per_second']:.1f} (pipeline) | {i[f'{name}_ratio_to_pipeline']:.2f}x |")
    lines += ["", f"Test accuracy ({a['test_samples']} texts): torch {a['torch']:.4f}"
              + "".join(f", {n.replace('_', ' ')} {a[n]:.4f} ({a[f'{n}_change_points']:+.2f} points)"
                        for n in ("onnx_fp32", "onnx_int8") if n in a) + ".",
              "", f"Ceiling: matrix multiply at {c['matmul_gflops']:.1f} GFLOP/s; the student needs "
              f"{c['student_gflops_per_text']:.3f} GFLOP per text ({c['mean_tokens_per_text']:.1f} tokens on average), "
              f"so at most {c['ceiling_texts_per_second']:.0f} texts/s; pgkd inference reaches "
              f"{100 * c['pgkd_share_of_ceiling']:.0f}% of that."]
    return "\n".join(lines) + "\n"
