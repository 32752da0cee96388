"""The phases of a PGKD run, written once, each from one `RunState` to the next (pgkd.loop.state).

    start -> train -> evaluate -> (stopped? finish) -> mine -> teach -> (stopped? finish) -> train ...

`Distillation` holds what does not change during a run (its configuration, data, teacher, student
recipe) and where the run keeps its heavy things (a `Keeper`). The embedded run (embedded.py) calls
the phases top to bottom in one process, with the state in memory; each service calls one phase on
the state it loads from the artifact store (pgkd.distributed.steps). The work of each phase is in
cycle.py. Listeners (`events`) hear `trained`, `cycle_evaluated`, `taught` and `completed`, each
with the state, as the transformers Trainer's callbacks do: the embedded run prints its cycle
lines there, the services export their Prometheus metrics.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

import numpy as np

from pgkd.data import Dataset, Splits
from pgkd.types import MiningResult, Sample
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import (
    calibrate_student,
    cycle_record,
    evaluate_cycle,
    finish,
    fresh_student,
    guidance_cycle,
    mine_cycle,
    round_student,
    teach,
    train_round,
)
from pgkd.loop.report import PhaseTimes, RunReport, Scores, TrainingRound
from pgkd.loop.state import Best, Handle, RunState
from pgkd.loop.stopping import MetricsUnavailable, StopDecision

log = logging.getLogger("pgkd.loop")


class Keeper(Protocol):
    """Where a run keeps its students, training sets and probabilities, cycle by cycle; the state
    holds the handles these return."""
    def save_student(self, cycle: int, student) -> Handle: ...
    def load_student(self, handle: Handle): ...
    def keep_best(self, handle: Handle) -> None: ...      # the student of `handle` is the best so far
    def save_samples(self, cycle: int, samples: list[Sample]) -> Handle: ...
    def load_samples(self, handle: Handle) -> list[Sample]: ...
    def save_probs(self, cycle: int, probs: np.ndarray) -> Handle: ...
    def load_probs(self, handle: Handle) -> np.ndarray: ...


class MemoryKeeper:
    """The embedded run's keeper: everything stays in this process. A student trains in place, so
    the best one's weights are copied when it becomes the best, and restored when asked for."""

    def __init__(self):
        self.items: dict[str, object] = {}
        self.student: tuple[str, object] | None = None    # the latest student: (handle, object)
        self.best: tuple[str, object] | None = None       # the best student: (handle, its weights)

    def save_student(self, cycle: int, student) -> str:
        self.student = (f"student/{cycle}", student)
        return self.student[0]

    def load_student(self, handle: str):
        if self.student is None:
            raise KeyError(f"{handle}: not kept in memory")
        handle_now, student = self.student
        if self.best is not None and handle == self.best[0] and handle != handle_now:
            student.load_state(self.best[1])
            self.student = (handle, student)
        elif handle != handle_now:
            raise KeyError(f"{handle}: not kept in memory")
        return student

    def keep_best(self, handle: str) -> None:
        self.best = (handle, self.load_student(handle).state())

    def save_samples(self, cycle: int, samples: list[Sample]) -> str:
        self.items[f"train/{cycle}"] = list(samples)
        return f"train/{cycle}"

    def load_samples(self, handle: str) -> list[Sample]:
        return list(self.items[handle])

    def save_probs(self, cycle: int, probs: np.ndarray) -> str:
        self.items = {k: v for k, v in self.items.items() if not k.startswith("probs/")}   # the latest only
        self.items[f"probs/{cycle}"] = probs
        return f"probs/{cycle}"

    def load_probs(self, handle: str) -> np.ndarray:
        return self.items[handle]


def describe(teacher) -> dict:
    return teacher.describe() if hasattr(teacher, "describe") else {"name": getattr(teacher, "name", "")}


def shown_validation(validation: list[Sample], mined: MiningResult, shown: list[int]) -> list[int]:
    """`shown` and the validation texts this request shows the teacher (by index): the calibration says how
    many, and no threshold is chosen on scores the teacher saw. Mined out of fold, the request shows none
    (but for a text that is in both splits)."""
    texts = {m.text for m in (*mined.hard_negatives, *mined.misclassified, *mined.correct)}
    return sorted(set(shown) | {i for i, s in enumerate(validation) if s.text in texts})


class Distillation:
    """One run's phases. `make_teacher` makes the teacher on first use (the embedded run passes the
    one it checked already); `student`, when given, is cycle 0's student instead of a fresh one."""

    def __init__(self, config: DistillConfig, dataset: Dataset, splits: Splits, keeper: Keeper,
                 make_teacher: Callable[[], object], embed=None, student=None, events=(), progress: bool = False,
                 name: str = ""):
        self.config, self.dataset, self.splits, self.keeper = config, dataset, splits, keeper
        self.embed, self.events, self.progress, self.name = embed, list(events), progress, name
        self._make_teacher, self._teacher, self._teacher_initial = make_teacher, None, None
        self._first_student = student

    @property
    def labels(self) -> list[str]:
        return self.splits.labels

    def teacher(self):
        if self._teacher is None:
            self._teacher = self._make_teacher()
            if hasattr(self._teacher, "state"):
                self._teacher_initial = self._teacher.state()   # what cycle 1 answers from, however often asked
        return self._teacher

    def emit(self, event: str, state: RunState) -> None:
        for listener in self.events:
            handler = getattr(listener, f"on_{event}", None)
            if handler is not None:
                handler(state)

    # -- the phases ------------------------------------------------------------------------------------------
    def start(self, run_id: str, started_at: float | None = None, handed_at: float | None = None,
              promote: bool = False, start_from: Handle | None = None) -> RunState:
        """The run before cycle 0: its training set is the labeled seed set."""
        started_at = time.time() if started_at is None else started_at
        state = RunState(run_id=run_id, config=self.config, started_at=started_at,
                         handed_at=started_at if handed_at is None else handed_at, promote=promote,
                         start_from=start_from)
        return state.model_copy(update={"train_set": self.keeper.save_samples(0, self.splits.train),
                                        "train_size": len(self.splits.train)})

    def train(self, state: RunState) -> RunState:
        """Cycle 0 from the pretrained encoder (or the student it starts from); cycle k warm-started
        from the best student so far (or fresh, with --no-warm-start)."""
        state, began = state.taken(), time.perf_counter()
        config, cycle, warm = self.config, state.cycle, None
        if cycle == 0 and state.start_from is not None:    # a stream's run: its best student, grown to new labels
            student, warm = self.keeper.load_student(state.start_from).with_labels(self.labels), True
        elif cycle == 0:
            student = (self._first_student if self._first_student is not None
                       else fresh_student(config, self.labels, 0, embed=self.embed))
        else:
            student = round_student(config, self.labels, cycle, embed=self.embed,
                                    best=lambda: self.keeper.load_student(state.best.student))
        samples = self.keeper.load_samples(state.train_set)
        trained = train_round(config, student, samples, self.splits.validation, cycle, warm, progress=self.progress,
                              name=self.name)
        handle = self.keeper.save_student(cycle, student)
        training = TrainingRound.model_validate(trained, from_attributes=True)
        state = state.next("trained", student=handle, training=training,
                           timings=state.timings.plus(train=time.perf_counter() - began))
        self.emit("trained", state)
        return state

    def evaluate(self, state: RunState, reader=None) -> RunState:
        """Score the student on validation (and on test at cycle 0), record the cycle, keep it if it is
        the best so far, and let the stop policy decide: on what `reader` (Prometheus, or a metrics
        registry) reads back of the metrics the listeners exported, or on the state's own records."""
        state, began = state.taken(), time.perf_counter()
        config, cycle = self.config, state.cycle
        student = self.keeper.load_student(state.student)
        train = self.keeper.load_samples(state.train_set) if config.selection_source == "out-of-fold" else None
        evaluation = evaluate_cycle(config, student, self.splits, cycle, train=train, embed=self.embed)
        probs = self.keeper.save_probs(cycle, evaluation.probs)
        history = state.selection_history() + [evaluation.decisive.metric(config.metric)]
        improved = config.policy().best_cycle(history) == cycle
        best = state.best
        if improved:
            best = Best(cycle=cycle, student=state.student, train_set=state.train_set,
                        validation=evaluation.validation, selection=evaluation.selection)
            self.keeper.keep_best(state.student)
        baseline = Scores(validation=evaluation.validation, test=evaluation.test) if cycle == 0 else state.baseline

        def recorded(timings: PhaseTimes) -> RunState:
            record = cycle_record(config, cycle, state.train_size, evaluation, state.provenance, state.training,
                                  improved, timings)
            return state.next("evaluated", cycles=[*state.cycles, record], best=best, baseline=baseline, probs=probs,
                              validation=evaluation.validation, student=None, training=None,
                              timings=PhaseTimes(), provenance=type(state.provenance)())
        evaluated = recorded(state.timings.plus(evaluate=time.perf_counter() - began))
        self.emit("cycle_evaluated", evaluated)
        decision = self.decide(evaluated, reader)
        evaluated = recorded(state.timings.plus(evaluate=time.perf_counter() - began))   # the decision's time too
        return evaluated.model_copy(update={"stop_reason": decision.reason if decision.stop else None,
                                            "decided_from": decision.source})

    def decide(self, state: RunState, reader=None) -> StopDecision:
        """The stop policy on the history of the selecting scores and on the run's spend (samples
        generated, the teacher's tokens and cost): as `reader` reads them back, or as the state says."""
        policy, usage = self.config.policy(), state.usage
        tokens = usage.prompt_tokens + usage.completion_tokens
        decision = policy.decide(state.selection_history(), state.generated, tokens, usage.cost)
        if reader is not None:
            try:
                read = reader.read(state.run_id, self.config.metric, state.cycle)
                # Spend: the larger of what the metrics and the state say (the gauges can only be ahead).
                decision = policy.decide(read.history, state.generated, max(read.tokens, tokens),
                                         max(read.cost, usage.cost))
                decision.source = read.source
            except MetricsUnavailable as e:
                decision.source = f"run records, because {e}"
                log.warning("run %s cycle %d: deciding on the run's records: %s", state.run_id, state.cycle, e)
        return decision

    def mine(self, state: RunState) -> RunState:
        """Cycle k begins: the mistakes of student k-1 (on validation, or out of fold on the labeled
        train samples), for the teacher's request, and the scores it is shown."""
        waited, began = max(0.0, time.time() - state.handed_at), time.perf_counter()
        config, cycle = self.config, state.cycle + 1
        probs = self.keeper.load_probs(state.probs)
        train = self.keeper.load_samples(state.train_set) if config.guidance_source == "out-of-fold" else []
        guidance = guidance_cycle(config, self.splits, train, state.validation, probs, cycle, embed=self.embed)
        mined = mine_cycle(config, guidance.samples, guidance.probs, self.labels, cycle)
        record = state.cycles[-1].model_copy(update={"guidance": guidance.report.headline()})
        return state.next("mined", cycle=cycle, cycles=[*state.cycles[:-1], record], mined=mined,
                          shown=shown_validation(self.splits.validation, mined, state.shown),
                          guidance=guidance.report,
                          timings=PhaseTimes(queue=waited, mine=time.perf_counter() - began))

    def teach(self, state: RunState) -> RunState:
        """Ask the teacher for samples aimed at the mistakes, screen them, add them to the training
        set; or record why the run must stop (the teacher is exhausted or unavailable), for the
        evaluator to end it."""
        state, began = state.taken(), time.perf_counter()
        teacher = self.teacher()
        if hasattr(teacher, "load_state"):     # as the previous answer left it, so a restarted teacher answers the same
            teacher.load_state(state.teacher_state if state.teacher_state is not None else self._teacher_initial)
        train = self.keeper.load_samples(state.train_set)
        lesson = teach(self.config, teacher, self.splits, train, state.mined, state.guidance,
                       self.config.samples_wanted(state.generated), state.cycle)
        changes = {"teacher": describe(teacher), "mined": None, "guidance": None}
        if lesson.stop_reason:
            changes |= {"stop_reason": lesson.stop_reason, "decided_from": "teacher"}
        else:
            grown = train + lesson.accepted
            changes |= {"train_set": self.keeper.save_samples(state.cycle, grown), "train_size": len(grown),
                        "provenance": lesson.provenance,
                        "teacher_state": teacher.state() if hasattr(teacher, "state") else None}
        state = state.next("taught", timings=state.timings.plus(teacher=time.perf_counter() - began), **changes)
        self.emit("taught", state)
        return state

    def finish(self, state: RunState) -> tuple[RunState, RunReport, object]:
        """The kept student (the best cycle's) scored once on test, against the baseline: the report.
        Returns the completed state, the report and the kept student."""
        best = state.best
        student = self.keeper.load_student(best.student)
        calibration = calibrate_student(self.config, student, self.splits, state.shown)
        report = finish(self.config, self.dataset, self.splits, student, best.cycle, state.cycles, best.validation,
                        state.baseline, self.keeper.load_samples(state.train_set),
                        state.teacher or describe(self.teacher()), state.stop_reason,
                        time.time() - state.started_at, calibration)
        if hasattr(student, "calibration"):     # pgkd's students keep it, in memory and in their folder
            student.calibration = calibration
        state = state.next("completed")
        self.emit("completed", state)
        return state, report, student
