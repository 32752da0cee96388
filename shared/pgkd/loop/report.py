"""report.json: what a run did and what it got, with everything needed to reproduce it."""
from __future__ import annotations

import platform
from importlib import metadata

from pydantic import BaseModel

from pgkd.types import EvalReport, TeacherUsage


class TrainingRound(BaseModel):
    epochs_run: int
    best_epoch: int
    train_loss: float
    validation_loss: float
    samples_per_second: float
    seconds: float


class Provenance(BaseModel):
    """Where a cycle's new training samples came from: the teacher's answer after screening."""
    generated: int = 0
    accepted: int = 0
    rejected: dict[str, int] = {}
    teacher_usage: TeacherUsage = TeacherUsage()


class PhaseTimes(BaseModel):
    """A cycle's wall seconds, phase by phase, measured the same way embedded and in the services.
    Cycle k's are the mining of student k-1's mistakes, the teacher's answer, student k's training
    round and its evaluation; cycle 0 has no mining or teacher. `queue`: the seconds between its
    phases, waiting for the next one to start (the bus, and for the services' cycle 0 the wait for a
    trainer to take the run; next to nothing in one process). The time a run takes to finish (its
    best student scored on test, the report written) is in no cycle."""
    mine: float = 0.0
    teacher: float = 0.0
    train: float = 0.0
    evaluate: float = 0.0
    queue: float = 0.0

    @property
    def total(self) -> float:
        return self.mine + self.teacher + self.train + self.evaluate + self.queue

    def plus(self, **seconds: float) -> "PhaseTimes":
        return self.model_copy(update={k: getattr(self, k) + v for k, v in seconds.items()})


class CycleRecord(BaseModel):
    cycle: int
    train_size: int
    validation: dict[str, float]     # headline metrics; the full per-class reports are in baseline/best
    selection: dict[str, float] | None = None   # out-of-fold selection scores (--selection-source out-of-fold)
    test: dict[str, float] | None = None   # only with track_test: a diagnostic, never used for decisions
    generated: int
    accepted: int
    rejected: dict[str, int]
    teacher_usage: TeacherUsage
    training: TrainingRound
    improved: bool
    seconds: float                   # timings.total: the cycle's wall seconds
    timings: PhaseTimes = PhaseTimes()
    # The scores the teacher was shown after this cycle (out-of-fold over the labeled train samples, or
    # the validation report itself); None when the run stopped here.
    guidance: dict[str, float] | None = None


class Scores(BaseModel):
    validation: EvalReport
    test: EvalReport


class BestScores(Scores):
    cycle: int


class Selection(BaseModel):
    """The scores that picked the best cycle and stopped the run: the validation split's, or out-of-fold
    scores over the labeled train samples (each cycle's `selection`)."""
    split: str = "validation"
    samples: int = 0
    shown_to_teacher: bool = True     # False: the scores are not biased by the teacher's aim
    scores: dict[str, float] | None = None   # the kept cycle's


class RunReport(BaseModel):
    pgkd_version: str
    dataset: dict
    student: dict
    teacher: dict
    teacher_usage: TeacherUsage        # the whole run's; each cycle's is in `cycles`
    seed: int
    config: dict
    cycles: list[CycleRecord]
    baseline: Scores
    best: BestScores
    stop_reason: str
    seconds: float
    environment: dict
    selection: Selection = Selection()
    # The kept student's calibration (pgkd.calibration.Calibration, less the held scores): its
    # temperature, the calibration error before and after, reliability bins, the cascade's threshold.
    calibration: dict | None = None


def without_times(report: dict) -> dict:
    """A report (as JSON) without what differs between any two runs of the same configuration: wall
    times and the environment. Two runs that compute the same thing are equal in it. A cycle's
    timings keep their shape: each phase's name, and whether it is non-negative."""
    report = {k: v for k, v in report.items() if k not in ("seconds", "environment")}
    report["cycles"] = [{**{k: v for k, v in c.items() if k not in ("seconds", "timings")},
                         "timings": {k: v >= 0 for k, v in c["timings"].items()},
                         "training": {k: v for k, v in c["training"].items()
                                      if k not in ("seconds", "samples_per_second")}} for c in report["cycles"]]
    return report


def environment() -> dict:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"
    return {"python": platform.python_version(), "platform": platform.platform(),
            **{p: version(p) for p in ("torch", "transformers", "numpy", "scikit-learn")}}


def plot_history(report: RunReport, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = [c.cycle for c in report.cycles]
    fig, ax = plt.subplots(figsize=(7, 4))
    for metric, label in (("macro_f1", "validation macro-F1"), ("accuracy", "validation accuracy")):
        ax.plot(cycles, [c.validation[metric] for c in report.cycles], marker="o", label=label)
    if all(c.test for c in report.cycles):  # --track-test
        ax.plot(cycles, [c.test["macro_f1"] for c in report.cycles], linestyle="--", color="black", alpha=0.6,
                label="test macro-F1 (diagnostic)")
    ax.axvline(report.best.cycle, color="grey", linestyle=":", label=f"best (cycle {report.best.cycle})")
    # Test scores of the two students evaluated on test: validation alone flatters the loop, since
    # the teacher is aimed at validation mistakes and the best cycle is chosen on validation.
    ax.scatter([0, report.best.cycle], [report.baseline.test.macro_f1, report.best.test.macro_f1], marker="X",
               s=80, color="black", zorder=3, label="test macro-F1 (baseline, best)")
    ax.set_xlabel("cycle (0 = baseline, before any teacher sample)")
    ax.set_ylabel("score")
    ax.set_xticks(cycles)
    ax.set_title(f"{report.dataset['name']}: {report.student['spec']} student, {report.teacher['name']} teacher"
                 + (" (simulated)" if report.teacher.get("simulated") else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(report: RunReport, path) -> None:
    """The kept student's reliability diagram on its held scores, before and after calibration: each
    bin's accuracy against its mean confidence (the diagonal is a perfectly calibrated student)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibration = report.calibration
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated perfectly")
    for key, label in (("before", "as trained"), ("after", f"temperature {calibration['temperature']:.2f}")):
        bins = [b for b in calibration[f"reliability_{key}"] if b["samples"]]
        ece = calibration[f"ece_{key}"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{label} (ECE {ece:.3f})")
    deferral = calibration.get("deferral")
    if deferral:
        ax.axvline(deferral["threshold"], color="black", alpha=0.5, linestyle="--",
                   label=f"threshold {deferral['threshold']:.3f} ({deferral['target']})")
    ax.set_xlabel("confidence (mean of the bin)")
    ax.set_ylabel("accuracy of the bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.dataset['name']}: {calibration['samples']} held validation texts", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(report: RunReport) -> str:
    b, d = report.baseline.test, report.best.test
    rows = [("", "test accuracy", "test macro-F1"),
            ("baseline (cycle 0)", f"{b.accuracy:.4f}", f"{b.macro_f1:.4f}"),
            (f"distilled (cycle {report.best.cycle})", f"{d.accuracy:.4f}", f"{d.macro_f1:.4f}"),
            ("change", f"{d.accuracy - b.accuracy:+.4f}", f"{d.macro_f1 - b.macro_f1:+.4f}")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{r[0]:<{width}}  {r[1]:>13}  {r[2]:>13}" for r in rows)
