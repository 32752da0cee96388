"""When the distillation loop stops: patience on a validation metric, a target score, a cycle limit,
a sample budget, a teacher budget in tokens or cost. The policies combine: the first that applies
stops the run, with its reason."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


class MetricsUnavailable(RuntimeError):
    """The metrics cannot be read, or do not show the current cycle yet: the stop policy decides on
    the run's own records (a metrics reader raises it: pgkd.distributed.metrics_readers)."""


class StopDecision(BaseModel):
    stop: bool
    reason: str = ""
    source: str = "run records"   # where the figures came from: "prometheus", "metrics registry", ...


@dataclass
class StopPolicy:
    """`decide` sees the metric after every trained cycle (index 0: the baseline) and the samples
    the teacher has produced so far. Higher is better for the metric unless `lower_is_better`."""
    patience: int = 5
    max_cycles: int = 10
    sample_budget: int | None = None
    min_delta: float = 0.0
    metric: str = "macro_f1"
    lower_is_better: bool = False
    target_score: float | None = None
    token_budget: int | None = None     # teacher tokens, prompt and completion
    cost_budget: float | None = None    # teacher cost, in the configured price's currency

    def best_cycle(self, history: list[float]) -> int:
        """The first cycle that reached the best value by more than min_delta over earlier ones."""
        best = 0
        for cycle, value in enumerate(history):
            if self._improves(value, history[best]) or cycle == 0:
                best = cycle
        return best

    def _improves(self, value: float, over: float) -> bool:
        return (over - value if self.lower_is_better else value - over) > self.min_delta

    def decide(self, history: list[float], samples_generated: int = 0, tokens: int = 0,
               cost: float = 0.0) -> StopDecision:
        cycles_done = len(history) - 1
        since_best = cycles_done - self.best_cycle(history)
        best = history[self.best_cycle(history)]
        if self.target_score is not None and (best <= self.target_score if self.lower_is_better
                                              else best >= self.target_score):
            return StopDecision(stop=True, reason=f"target_score: {self.metric} {best:.4f} reached {self.target_score}")
        if self.patience and since_best >= self.patience:
            return StopDecision(stop=True, reason=f"patience: no {self.metric} improvement for {since_best} cycles")
        if cycles_done >= self.max_cycles:
            return StopDecision(stop=True, reason=f"max_cycles: {self.max_cycles} cycles done")
        if self.sample_budget is not None and samples_generated >= self.sample_budget:
            return StopDecision(stop=True, reason=f"sample_budget: {samples_generated} of {self.sample_budget} "
                                              "samples generated")
        if self.token_budget is not None and tokens >= self.token_budget:
            return StopDecision(stop=True, reason=f"token_budget: {tokens} of {self.token_budget} teacher tokens spent")
        if self.cost_budget is not None and cost >= self.cost_budget:
            return StopDecision(stop=True, reason=f"cost_budget: {cost:.4f} of {self.cost_budget} spent on the teacher")
        return StopDecision(stop=False)
