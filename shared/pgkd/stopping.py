"""When the distillation loop stops: patience on a validation metric, a cycle limit, a sample budget."""
from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


class Decision(BaseModel):
    stop: bool
    reason: str = ""


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

    def best_cycle(self, history: list[float]) -> int:
        """The first cycle that reached the best value by more than min_delta over earlier ones."""
        best = 0
        for cycle, value in enumerate(history):
            if self._improves(value, history[best]) or cycle == 0:
                best = cycle
        return best

    def _improves(self, value: float, over: float) -> bool:
        return (over - value if self.lower_is_better else value - over) > self.min_delta

    def decide(self, history: list[float], samples_generated: int = 0) -> Decision:
        cycles_done = len(history) - 1
        since_best = cycles_done - self.best_cycle(history)
        if self.patience and since_best >= self.patience:
            return Decision(stop=True, reason=f"patience: no {self.metric} improvement for {since_best} cycles")
        if cycles_done >= self.max_cycles:
            return Decision(stop=True, reason=f"max_cycles: {self.max_cycles} cycles done")
        if self.sample_budget is not None and samples_generated >= self.sample_budget:
            return Decision(stop=True, reason=f"sample_budget: {samples_generated} of {self.sample_budget} "
                                              "samples generated")
        return Decision(stop=False)
