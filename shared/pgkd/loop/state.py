"""A run's state: everything a run knows between two of its phases, as one value (`RunState`).

The phases (pgkd.loop.distillation) each take a state and return the next one. The embedded run keeps
it in memory; each service loads it from the artifact store, runs its one phase, saves the next one
and publishes a message that points to it. `pgkd status`, `pgkd submit --wait`, the report, the
logged cycle lines and the Prometheus gauges all read a state: the history of scores, the best cycle,
the spend and the stop reason are derived here, once.

Heavy things (students, training sets, probabilities) are not in the state: it holds a `Handle` to
each, which the run's keeper (pgkd.loop.distillation.Keeper) resolves: an artifact reference (the
services' artifact store) or a key of the process's memory (the embedded run).
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pgkd.artifacts import ArtifactRef
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.types import EvalReport, MiningResult, TeacherUsage
from pgkd.loop.report import CycleRecord, PhaseTimes, Provenance, Scores, TrainingRound
from pgkd.names import NAME_PATTERN

STATE_SCHEMA = 1
Handle = ArtifactRef | str    # where the run keeps a heavy thing: an artifact, or a key of the process's memory

# The phases in the order a cycle runs them; the number orders a run's stored states (pgkd.distributed.steps).
PHASES = ("requested", "mined", "taught", "trained", "evaluated", "completed")
Phase = Literal["requested", "mined", "taught", "trained", "evaluated", "completed"]


class Best(BaseModel):
    """The best cycle so far: its student, the training set it was trained on, and its full scores."""
    cycle: int
    student: Handle
    train_set: Handle
    validation: EvalReport
    selection: EvalReport | None = None    # out-of-fold scores (--selection-source out-of-fold)

    @property
    def decisive(self) -> EvalReport:
        """The scores that selected it."""
        return self.selection if self.selection is not None else self.validation


class StateError(UserError):
    """A stored state that cannot be the one a message points to: missing, damaged, of another run or
    of a newer schema. One line naming the run and the file."""

    def __init__(self, run_id: str, where: str, problem: str):
        super().__init__(f"run {run_id}: state {where}: {problem}")


class RunState(BaseModel):
    """Everything a run knows between two phases. `cycle` is the cycle being built: cycle k mines the
    mistakes of student k-1, asks the teacher, trains student k and evaluates it; cycle 0 trains on
    the labeled seed set."""
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = STATE_SCHEMA
    run_id: str = Field(pattern=NAME_PATTERN)
    config: DistillConfig
    phase: Phase = "requested"
    cycle: int = 0
    started_at: float = Field(default_factory=time.time)   # the run's request (the report's `seconds` start here)
    handed_at: float = Field(default_factory=time.time)    # when the last phase ended (what follows waits from here)
    promote: bool = False                  # completed, the best student goes to serving (a StudentPromoted)
    start_from: Handle | None = None       # the student cycle 0 is warm-started from (a stream's), if any

    # What has been recorded: one row per evaluated cycle, the baseline's full scores, the best so far.
    cycles: list[CycleRecord] = []
    baseline: Scores | None = None         # cycle 0's validation and test reports
    best: Best | None = None

    # The cycle being built.
    train_set: Handle | None = None        # its training set: the labeled samples, then each accepted batch
    train_size: int = 0
    timings: PhaseTimes = PhaseTimes()
    provenance: Provenance = Provenance()  # the teacher's answer, screened
    shown: list[int] = []                  # the validation texts (their indices) any request showed the teacher
    mined: MiningResult | None = None      # what the request shows the teacher ...
    guidance: EvalReport | None = None     # ... with these scores (validation, or out-of-fold)
    student: Handle | None = None          # trained, not yet evaluated
    training: TrainingRound | None = None  # its training round
    probs: Handle | None = None            # the last evaluated student's validation probabilities
    validation: EvalReport | None = None   # ... and its full validation report

    teacher: dict | None = None            # the teacher's description (the report's `teacher`)
    teacher_state: dict | None = None      # what a restarted teacher needs to answer as this one would

    stop_reason: str | None = None         # set by the evaluator's decision, or by the teacher (exhausted, down)
    decided_from: str | None = None        # where the stop policy last read its figures ("teacher": it stopped)
    report: Handle | None = None           # report.json, once completed

    # -- what is derived from the state, once --------------------------------------------------------------
    def selection_history(self) -> list[float]:
        """The run's metric per evaluated cycle, on the scores that select the best cycle and stop the
        run: out-of-fold with --selection-source out-of-fold, else validation."""
        metric = self.config.metric
        return [(c.selection or c.validation)[metric] for c in self.cycles]

    def validation_history(self) -> list[float]:
        """The run's metric per evaluated cycle, on validation (what the teacher is shown by default)."""
        return [c.validation[self.config.metric] for c in self.cycles]

    def best_cycle(self, upto: int | None = None) -> int:
        """The best of the cycles evaluated (or of the first `upto + 1`), as the stop policy picks it."""
        history = self.selection_history()
        return self.config.policy().best_cycle(history if upto is None else history[:upto + 1])

    @property
    def generated(self) -> int:
        """Samples the teacher gave, over the recorded cycles and the cycle being built."""
        return sum(c.generated for c in self.cycles) + self.provenance.generated

    @property
    def usage(self) -> TeacherUsage:
        """The teacher's usage so far: the recorded cycles' and the cycle being built's."""
        return sum((c.teacher_usage for c in self.cycles), TeacherUsage()) + self.provenance.teacher_usage

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def selection_scores(self) -> str:
        return "selection" if self.config.selection_source == "out-of-fold" else "validation"

    def cycle_line(self, cycle: int) -> str:
        """The line a run prints as its cycle `cycle` is recorded (embedded, `pgkd submit --wait`, `pgkd status`)."""
        record, history = self.cycles[cycle], self.selection_history()[:cycle + 1]
        best = self.best_cycle(cycle)
        scores = "selection" if record.selection is not None else "val"
        shown = record.selection if record.selection is not None else record.validation   # both figures of one set
        return (f"cycle {record.cycle:>2}: train {record.train_size:>5}  {scores} {self.config.metric} "
                f"{history[-1]:.4f}  acc {shown['accuracy']:.4f}  best {history[best]:.4f} @ {best}  "
                f"accepted {record.accepted}/{record.generated}"
                + (f" rejected {record.rejected}" if record.rejected else "") + f"  {record.seconds:.0f}s")

    # -- moving on -----------------------------------------------------------------------------------------
    def next(self, phase: Phase, **changes) -> "RunState":
        """The state after `phase`: a copy with `changes`, handed on now."""
        return self.model_copy(update={"phase": phase, "handed_at": time.time(), **changes})

    def taken(self) -> "RunState":
        """The state as a phase takes it: the seconds it waited since the last phase ended go to the
        cycle's queue time (the bus, in the services; next to nothing in one process)."""
        waited = max(0.0, time.time() - self.handed_at)
        return self.model_copy(update={"timings": self.timings.plus(queue=waited)})
