"""`pgkd bench peers`: our students against what a user with the same labels would try instead.

On each dataset and seed, on the same seeded split of 1,000 labeled samples:
- **SetFit** (huggingface/setfit; the `bench` extra), the library made for few labels, on the same
  MiniLM body, trained on all 1,000 labeled samples (it needs no validation split);
- **our baseline**: the student on the 800 labeled train samples alone (cycle 0 of each run);
- **our distilled student**, guided and unguided (`pool-random`), at the same sample budget: runs
  of `pgkd bench quality`, whose folders this reuses.
Test accuracy, macro-F1 and training time for each. The literature's few-shot intent-detection
figures are printed beside ours and marked as theirs.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pgkd.bench.quality import DATASETS, run_quality
from pgkd.data import Splits, load_dataset, make_splits
from pgkd.errors import UserError
from pgkd.names import check_name
from pgkd.loop.cycle import log
from pgkd.loop.evaluation import evaluate
from pgkd.files import write_json_atomic
from pgkd.ownership import claim_folder

# Published 10-shot test accuracy (10 labeled samples per class): theirs, not ours, not on our splits,
# with larger encoders than MiniLM. CPFT: Zhang et al. 2021, "Few-Shot Intent Detection via Contrastive
# Pre-Training and Fine-Tuning" (RoBERTa-base, contrastive pre-training on other intent data; no LLM).
# ICDA: Lin et al. 2023, "Selective In-Context Data Augmentation for Intent Detection using Pointwise
# V-Information" (training data written by a fine-tuned OPT-66B, so an LLM teacher of its own kind).
LITERATURE = {
    "banking77": {"CPFT (10-shot)": 0.8720, "ICDA (10-shot, OPT-66B data)": 0.8979},
    "hwu64": {"CPFT (10-shot)": 0.8713, "ICDA (10-shot, OPT-66B data)": 0.8741},
    "clinc150": {"CPFT (10-shot)": 0.9418, "ICDA (10-shot, OPT-66B data)": 0.9484},
}


class SetFitRecipe:
    """SetFit's defaults (batch 16, one epoch, body learning rate 2e-5, a logistic-regression head)
    with `num_iterations` pairs per sample: the recipe of the SetFit paper (20) and of its examples.
    Its newer default, oversampling every positive pair, makes about a million pairs from 1,000
    samples, which no one runs on a CPU."""

    def __init__(self, num_iterations: int = 20, batch_size: int = 16, max_length: int = 128):
        self.num_iterations = num_iterations
        self.batch_size = batch_size
        self.max_length = max_length

    def describe(self) -> dict:
        return {"library": "setfit", "version": _version("setfit"), "body": "all-MiniLM-L6-v2",
                "num_iterations": self.num_iterations, "batch_size": self.batch_size, "num_epochs": 1,
                "body_learning_rate": 2e-5, "head": "LogisticRegression (SetFit's default)",
                "trained_on": "train + validation (all labeled samples)"}

    def run(self, splits: Splits, seed: int) -> dict:
        """Train on every labeled sample, score on test: the row of the peers table."""
        try:
            from datasets import Dataset as HFDataset
            from setfit import SetFitModel, Trainer, TrainingArguments
        except ImportError:
            raise UserError("bench peers needs SetFit: pip install -e '.[bench]'") from None
        from pgkd.encoder import minilm_path
        from pgkd.students.finetuned import seed_everything
        seed_everything(seed)
        index = {label: i for i, label in enumerate(splits.labels)}
        labeled = splits.train + splits.validation
        data = HFDataset.from_dict({"text": [s.text for s in labeled], "label": [index[s.label] for s in labeled]})
        started = time.perf_counter()
        model = SetFitModel.from_pretrained(str(minilm_path()), local_files_only=True)
        with tempfile.TemporaryDirectory() as folder:
            args = TrainingArguments(output_dir=folder, batch_size=self.batch_size, num_epochs=1,
                                     num_iterations=self.num_iterations, max_length=self.max_length, seed=seed,
                                     report_to="none", save_strategy="no", show_progress_bar=False)
            Trainer(model=model, args=args, train_dataset=data).train()
        seconds = time.perf_counter() - started
        probs = _full_probs(model, [s.text for s in splits.test], len(splits.labels))
        test = evaluate([s.label for s in splits.test], probs, splits.labels)
        return {"test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1, "train_seconds": seconds,
                "train_samples": len(labeled), "num_iterations": self.num_iterations}


def _full_probs(model, texts: list[str], classes: int) -> np.ndarray:
    """SetFit's probabilities as one column per class index (its head knows only the classes it saw)."""
    probs = np.asarray(model.predict_proba(texts, as_numpy=True))
    full = np.zeros((len(texts), classes), dtype=np.float32)
    full[:, np.asarray(model.model_head.classes_, dtype=int)] = probs
    return full


def _version(package: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def run_peers(data_dir: Path, datasets: list[str], out: Path, students: dict[str, list[int]],
              setfit_seeds: list[int], setfit: SetFitRecipe, run_options: dict, progress: bool = True,
              existing_only: bool = False) -> dict:
    """`students` maps each student spec to its seeds (the frozen one cheap, the fine-tuned one not);
    with `existing_only`, the table of what was run already, running nothing."""
    for name in datasets:
        check_name(name, "dataset")   # it names the results' folders
        if not (data_dir / name).is_dir():
            raise UserError(f"dataset {name}: no folder {data_dir / name}")
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    started = time.perf_counter()
    rows = []
    for spec, seeds in students.items():
        summary = run_quality(data_dir, datasets, ["baseline", "random", "guided"], seeds,
                              out / "runs" / spec, {**run_options, "student": spec}, progress=progress,
                              existing_only=existing_only)
        for r in summary["runs"]:
            name = {"baseline": "baseline", "random": "distilled, unguided", "guided": "distilled, guided"}
            rows.append({"dataset": r["dataset"], "method": f"{spec}: {name[r['arm']]}", "seed": r["seed"],
                         "test_accuracy": r["test_accuracy"], "test_macro_f1": r["test_macro_f1"],
                         "train_seconds": r["seconds"], "run": r["run"]})
    for name in datasets:
        for seed in setfit_seeds:
            path = out / "setfit" / name / f"seed{seed}-iterations{setfit.num_iterations}.json"
            if path.is_file():
                row = json.loads(path.read_text())
                log(f"bench peers: {path} done before, reused")
            elif existing_only:
                continue
            else:
                log(f"bench peers: SetFit on {name}, seed {seed} ({setfit.num_iterations} iterations)")
                dataset = load_dataset(str(data_dir / name), seed=seed)
                splits = make_splits(dataset, run_options.get("labeled", 1000), seed)
                row = {"dataset": name, "method": "SetFit", "seed": seed, **setfit.run(splits, seed)}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, row)
            rows.append(row)
    summary = {"config": {"datasets": datasets, "students": students, "setfit_seeds": setfit_seeds,
                          "setfit": setfit.describe(), **run_options},
               "seconds": time.perf_counter() - started, "runs": rows, "table": aggregate(rows),
               "literature": {d: LITERATURE[d] for d in datasets if d in LITERATURE}}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "peers.json", summary)
    (out / "peers.md").write_text(markdown(summary), encoding="utf-8")
    return summary


def aggregate(rows: list[dict]) -> list[dict]:
    table = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if not group:
                continue
            mean_std = {}
            for key in ("test_accuracy", "test_macro_f1", "train_seconds"):
                values = [r[key] for r in group if r.get(key) is not None]
                mean_std[key] = (statistics.fmean(values) if values else None,
                                 statistics.stdev(values) if len(values) > 1 else 0.0)
            table.append({"dataset": dataset, "method": method, "seeds": len(group),
                          **{f"{k}_mean": v[0] for k, v in mean_std.items()},
                          **{f"{k}_std": v[1] for k, v in mean_std.items()}})
    return table


def markdown(summary: dict) -> str:
    lines = ["| dataset | method | seeds | test accuracy | test macro-F1 | training time (s) |",
             "|---|---|---|---|---|---|"]
    for row in summary["table"]:
        seconds = "" if row["train_seconds_mean"] is None else f"{row['train_seconds_mean']:.0f}"
        lines.append(f"| {row['dataset']} | {row['method']} | {row['seeds']} | "
                     f"{row['test_accuracy_mean']:.4f} ± {row['test_accuracy_std']:.4f} | "
                     f"{row['test_macro_f1_mean']:.4f} ± {row['test_macro_f1_std']:.4f} | {seconds} |")
    if summary["literature"]:
        lines += ["", "Published, test accuracy (theirs, not ours: about 10 labeled samples per class, larger "
                      "encoders than MiniLM, their own splits):", "", "| dataset | method | test accuracy |",
                  "|---|---|---|"]
        lines += [f"| {d} | {m} | {a:.4f} |" for d, methods in summary["literature"].items()
                  for m, a in methods.items()]
    return "\n".join(lines) + "\n"


DEFAULT_DATASETS = DATASETS
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
