"""`pgkd bench quality`: does performance guidance pay? Arms side by side at equal sample budget.

Arms: `baseline` (the 800 labeled alone: cycle 0 of every run, so it costs nothing extra),
`pool-random` (unguided control), `pool-guided` (full PGKD), and the paper's two ablations,
`guided-no-report` and `guided-no-hard-negatives`, all guided by the validation split, which also
selects; `oof-guided`, `oof-no-report`, `oof-pairs` (the confusion-pair simulation) and
`oof-random`, guided by out-of-fold predictions over the labeled train samples, validation only
selecting (pgkd.loop.guidance); `guided-oof-selected`, `no-report-oof-selected` and
`random-oof-selected`, guided by validation but selected by out-of-fold scores; `guided` and
`random`, whatever `pgkd distill` defaults to. Each run also records its selection optimism: the
score that selected the kept student less its test score. Every run is an ordinary `distill.run`
whose report.json lands under OUT/runs/; a sweep interrupted part-way resumes from the runs written.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

from tqdm.auto import tqdm

from pgkd.loop.config import DistillConfig
from pgkd.data import Dataset, load_dataset, stratified_split
from pgkd.loop.cycle import evaluate_student, log
from pgkd.types import Sample
from pgkd.loop.embedded import run
from pgkd.errors import UserError
from pgkd.names import check_name
from pgkd.encoder import EmbeddingCache
from pgkd.files import write_json_atomic
from pgkd.loop.report import RunReport
from pgkd.ownership import claim_folder

VALIDATION = {"guidance_source": "validation", "selection_source": "validation"}
OUT_OF_FOLD = {"guidance_source": "out-of-fold", "selection_source": "validation"}
ARMS = {
    "pool-random": {"teacher": "pool-random", **VALIDATION},
    "pool-guided": {"teacher": "pool-guided", **VALIDATION},
    "guided-no-report": {"teacher": "pool-guided", "guidance": "no-report", **VALIDATION},
    "guided-no-hard-negatives": {"teacher": "pool-guided", "guidance": "no-hard-negatives", **VALIDATION},
    # The report shows a class only when scored on 3 (5) validation samples or more (--report-min-support).
    "guided-support-3": {"teacher": "pool-guided", "report_min_support": 3, **VALIDATION},
    "guided-support-5": {"teacher": "pool-guided", "report_min_support": 5, **VALIDATION},
    # Guidance from out-of-fold predictions over the labeled train samples; validation selects only.
    "oof-random": {"teacher": "pool-random", **OUT_OF_FOLD},
    "oof-guided": {"teacher": "pool-guided", **OUT_OF_FOLD},
    "oof-no-report": {"teacher": "pool-guided", "guidance": "no-report", **OUT_OF_FOLD},
    "oof-pairs": {"teacher": "pool-guided-pairs", **OUT_OF_FOLD},
    # Guided by validation as the method was written; the best cycle picked by out-of-fold scores instead.
    "guided-oof-selected": {"teacher": "pool-guided", "guidance_source": "validation",
                            "selection_source": "out-of-fold"},
    "no-report-oof-selected": {"teacher": "pool-guided", "guidance": "no-report", "guidance_source": "validation",
                               "selection_source": "out-of-fold"},
    "random-oof-selected": {"teacher": "pool-random", "guidance_source": "validation",
                            "selection_source": "out-of-fold"},
    # `pgkd distill`'s own defaults, whatever they are (bench peers runs these).
    "guided": {"teacher": "pool-guided"},
    "random": {"teacher": "pool-random"},
}
ALL_ARMS = ("baseline", *ARMS)
DATASETS = ("banking77", "clinc150", "hwu64", "ag_news")

# Published in Di Palo et al. 2024 (Claude 3 Sonnet teacher, BERT-base student, 1,000 labeled): theirs, not ours.
PAPER = [
    ("AG News", 4, 0.884, 0.895),
    ("Yahoo Answers", 10, 0.649, 0.685),
    ("HuffPost", 41, 0.474, 0.519),
    ("Amazon product categories", 335, 0.320, 0.443),
]


def _run_dir(out: Path, dataset: str, arm: str, seed: int) -> Path:
    return out / "runs" / dataset / arm / f"seed{seed}"


def _existing(folder: Path, config: DistillConfig) -> RunReport | None:
    """A finished run with exactly this configuration, or None."""
    path = folder / "report.json"
    if not path.is_file():
        return None
    report = RunReport.model_validate_json(path.read_text())
    # Read through today's options, so that a run written before an option existed counts as run with its default.
    return report if DistillConfig(**report.config).model_dump() == config.model_dump() else None


def _dev_split(dataset: Dataset, n: int) -> tuple[Dataset, list[Sample]]:
    rest, dev = stratified_split(dataset.train, min(n, len(dataset.train) // 2) / len(dataset.train),
                                 random.Random(0))
    return replace(dataset, train=rest, notes=dataset.notes + [f"{len(dev)} train samples held out as the "
                                                                "benchmark's dev set (seed 0)"]), dev


def _dev_scores(folder: Path, result, dev: list[Sample], labels: list[str]) -> dict:
    report, _ = evaluate_student(result.student, dev, labels)
    scores = {"dev_accuracy": report.accuracy, "dev_macro_f1": report.macro_f1, "dev_samples": len(dev)}
    write_json_atomic(folder / "dev.json", scores)
    return scores


def run_quality(data_dir: Path, datasets: list[str], arms: list[str], seeds: list[int], out: Path,
                run_options: dict, progress: bool = True, existing_only: bool = False, dev_samples: int = 0) -> dict:
    """Every arm on every dataset and seed; with `existing_only`, only the runs written already (a
    summary of a sweep that has not finished, or was cut short)."""
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ALL_ARMS)}")
    for name in datasets:   # its folder's name names the results' folders
        check_name(Path(name).name, "dataset")
    out = claim_folder(out)   # pgkd's own, or refused before anything in it is touched (pgkd.ownership)
    paths = {name: (data_dir / name if not Path(name).is_dir() else Path(name)) for name in datasets}
    for name, path in paths.items():
        if not path.is_dir():
            raise UserError(f"dataset {name}: no folder {path}")
    teacher_arms = [a for a in arms if a != "baseline"] or ["pool-random"]  # the baseline comes from any run
    results = []
    started = time.perf_counter()
    jobs = [(name, arm, seed) for name in datasets for seed in seeds for arm in teacher_arms]
    if dev_samples and "baseline" in arms:   # the baseline's kept student is cycle 0's: a run of it alone
        jobs = [(name, "baseline", seed) for name in datasets for seed in seeds] + jobs
    bar = tqdm(jobs, desc="bench quality", unit="run", disable=not progress)
    caches: dict[str, EmbeddingCache] = {}
    baselines: set[tuple[str, int]] = set()
    held: dict[str, tuple[Dataset, list[Sample]]] = {}
    for name, arm, seed in bar:
        bar.set_postfix_str(f"{name} {arm} seed {seed}")
        options = ({**run_options, **ARMS["pool-random"], "max_cycles": 0} if arm == "baseline"
                   else {**run_options, **ARMS[arm]})
        config = DistillConfig(data=str(paths[name]), seed=seed, **options)
        folder = _run_dir(out, Path(name).name, arm, seed)
        report = _existing(folder, config)
        if report is not None and dev_samples and not (folder / "dev.json").is_file():
            report = None
        if report is None and existing_only:
            continue
        dev: dict = {}
        if report is None:
            if name not in caches:
                caches[name] = EmbeddingCache(path=out / "cache" / f"{Path(name).name}.npz", progress=progress)
            cache = caches[name]
            dataset = None
            if dev_samples:
                if name not in held:
                    held[name] = _dev_split(load_dataset(paths[name]), dev_samples)
                dataset = held[name][0]
            result = run(config, folder, progress=False, embed=cache, keep_model=False, dataset=dataset)
            report = result.report
            if dev_samples:
                dev = _dev_scores(folder, result, held[name][1], held[name][0].labels)
            cache.save()
        else:
            log(f"bench: {folder} done before, reused")
            if dev_samples:
                dev = json.loads((folder / "dev.json").read_text())
        rows = []
        if arm == "baseline":
            rows.append(("baseline", report.baseline.test, dev))
            baselines.add((name, seed))
        else:
            # Without a dev set the baseline is cycle 0 of any run of this dataset and seed: the first one read.
            if (name, seed) not in baselines and "baseline" in arms:
                rows.append(("baseline", report.baseline.test, {}))
                baselines.add((name, seed))
            if arm in arms:
                rows.append((arm, report.best.test, dev))
        for arm_name, test, dev_scores in rows:
            results.append({"dataset": Path(name).name, "arm": arm_name, "seed": seed, **dev_scores,
                            "test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1,
                            "selection_macro_f1": selection_score(report, arm_name == "baseline"),
                            "best_cycle": 0 if arm_name == "baseline" else report.best.cycle,
                            "cycles": len(report.cycles) - 1,
                            "generated": 0 if arm_name == "baseline" else sum(c.generated for c in report.cycles),
                            "stop_reason": "" if arm_name == "baseline" else report.stop_reason,
                            # wall time: the first round's alone for the baseline, the whole run otherwise
                            "seconds": report.cycles[0].seconds if arm_name == "baseline" else report.seconds,
                            "run": str(folder / "report.json")})
    summary = {"config": {"datasets": datasets, "arms": arms, "seeds": seeds, "dev_samples": dev_samples,
                          **run_options},
               "seconds": time.perf_counter() - started, "runs": results, "table": aggregate(results, arms)}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "quality.json", summary)
    (out / "quality.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, out / "quality.png")
    return summary


def selection_score(report: RunReport, baseline: bool) -> float:
    """The macro-F1 that selected the kept student (for the baseline: cycle 0's)."""
    cycle = report.cycles[0 if baseline else report.best.cycle]
    return (cycle.selection or cycle.validation)["macro_f1"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict], arms: list[str]) -> list[dict]:
    table = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        base = {r["seed"]: r for r in results if r["dataset"] == dataset and r["arm"] == "baseline"}
        for arm in arms:
            rows = [r for r in results if r["dataset"] == dataset and r["arm"] == arm]
            if not rows:
                continue
            acc, f1 = _mean_std([r["test_accuracy"] for r in rows]), _mean_std([r["test_macro_f1"] for r in rows])
            gains = [r["test_macro_f1"] - base[r["seed"]]["test_macro_f1"] for r in rows if r["seed"] in base]
            optimism = [r["selection_macro_f1"] - r["test_macro_f1"] for r in rows if "selection_macro_f1" in r]
            dev = [r["dev_macro_f1"] for r in rows if "dev_macro_f1" in r]
            dev_gains = [r["dev_macro_f1"] - base[r["seed"]]["dev_macro_f1"] for r in rows
                         if "dev_macro_f1" in r and "dev_macro_f1" in base.get(r["seed"], {})]
            table.append({"dataset": dataset, "arm": arm, "seeds": len(rows),
                          "test_accuracy_mean": acc[0], "test_accuracy_std": acc[1],
                          "test_macro_f1_mean": f1[0], "test_macro_f1_std": f1[1],
                          "macro_f1_gain_mean": statistics.fmean(gains) if gains else None,
                          "macro_f1_gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                          "selection_optimism_mean": statistics.fmean(optimism) if optimism else None,
                          **({"dev_macro_f1_mean": _mean_std(dev)[0], "dev_macro_f1_std": _mean_std(dev)[1],
                              "dev_gain_mean": statistics.fmean(dev_gains) if dev_gains else None,
                              "dev_gain_std": statistics.stdev(dev_gains) if len(dev_gains) > 1 else 0.0}
                             if dev else {})})
    return table


def markdown(summary: dict) -> str:
    lines = []
    if any("dev_macro_f1_mean" in row for row in summary["table"]):
        lines += [f"Dev: {summary['config'].get('dev_samples')} train samples no run drew from (stratified, seed 0), "
                  "the figures choices are made on:", "",
                  "| dataset | arm | seeds | dev macro-F1 | dev gain over baseline |", "|---|---|---|---|---|"]
        for row in summary["table"]:
            if "dev_macro_f1_mean" in row:
                gain = ("" if row["arm"] == "baseline" or row.get("dev_gain_mean") is None
                        else f"{row['dev_gain_mean']:+.4f} ± {row['dev_gain_std']:.4f}")
                lines.append(f"| {row['dataset']} | {row['arm']} | {row['seeds']} | "
                             f"{row['dev_macro_f1_mean']:.4f} ± {row['dev_macro_f1_std']:.4f} | {gain} |")
        lines += ["", "Test, for the record (no choice is made on it):", ""]
    lines += ["| dataset | arm | seeds | test accuracy | test macro-F1 | macro-F1 gain over baseline "
              "| selection optimism |", "|---|---|---|---|---|---|---|"]
    for row in summary["table"]:
        gain = ("" if row["macro_f1_gain_mean"] is None or row["arm"] == "baseline"
                else f"{row['macro_f1_gain_mean']:+.4f} ± {row['macro_f1_gain_std']:.4f}")
        lines.append(f"| {row['dataset']} | {row['arm']} | {row['seeds']} | "
                     f"{row['test_accuracy_mean']:.4f} ± {row['test_accuracy_std']:.4f} | "
                     f"{row['test_macro_f1_mean']:.4f} ± {row['test_macro_f1_std']:.4f} | {gain} | "
                     + ("" if row.get("selection_optimism_mean") is None else f"{row['selection_optimism_mean']:+.4f}")
                     + " |")
    lines += ["", "Selection optimism: the macro-F1 that selected the kept student less its test macro-F1 (mean "
                  "over seeds). In pool-guided and guided-no-report the teacher was aimed at the validation "
                  "mistakes that then select; the oof-* arms select on validation the teacher never saw, the "
                  "*-oof-selected arms on out-of-fold scores over the labeled train samples.",
              "", "Published by the paper (theirs, not ours: Claude 3 Sonnet teacher, BERT-base student, "
                  "1,000 labeled), test accuracy:", "",
              "| dataset | classes | baseline | PGKD | gain |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {k} | {a:.3f} | {b:.3f} | {b - a:+.3f} |" for name, k, a, b in PAPER]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in summary["table"] if r["arm"] != "baseline" and r["macro_f1_gain_mean"] is not None]
    datasets = list(dict.fromkeys(r["dataset"] for r in table))
    arms = list(dict.fromkeys(r["arm"] for r in table))
    if not table:
        return
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(datasets) + 2), 4.5))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        rows = {r["dataset"]: r for r in table if r["arm"] == arm}
        xs = [i + j * width for i, d in enumerate(datasets) if d in rows]
        ax.bar(xs, [rows[d]["macro_f1_gain_mean"] for d in datasets if d in rows], width,
               yerr=[rows[d]["macro_f1_gain_std"] for d in datasets if d in rows], capsize=3, label=arm)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(arms) - 1) / 2 for i in range(len(datasets))], datasets)
    ax.set_ylabel("test macro-F1 gain over baseline\n(mean over seeds, bars: std)")
    ax.set_title(f"PGKD arms at equal budget ({summary['config'].get('student')} student; simulated teachers)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(4, len(arms)), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
