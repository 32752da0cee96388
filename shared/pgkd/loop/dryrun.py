"""What a run would send its teacher and spend at most, known before any training or teacher call
(`pgkd distill --dry-run`, `pgkd submit --dry-run`); and the check, before training, that a prompt
can fit `--teacher-max-prompt-tokens` at all.

The first prompt's mistakes are not known before the student trains, so the largest first prompt is
shown: the longest validation texts stand in for the hard negatives, the misclassified and the correct
samples (as many as --hard-negatives, --misclassified, --correct ask for), and the report lists every
class with errors. The figures are upper bounds under the run's options: every cycle runs (or as many as
--sample-budget allows), every call sends a prompt of the full limit and takes the full answer, and
every answer needs its one repair request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pgkd.data import Splits
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import build_request
from pgkd.teachers.prompt import REPAIR_TOKENS, Prompt, fit
from pgkd.types import ClassScores, EvalReport, GenerationRequest, MinedSample, MiningResult


@dataclass
class Plan:
    teacher: str
    simulated: bool
    prompt: Prompt                     # the largest first prompt, as it would be sent (trimmed to the limit)
    cycles: int                        # cycles of teaching at most
    calls_per_cycle: int
    calls: int                         # calls at most, repair requests included
    prompt_tokens: int                 # at most, over the run
    completion_tokens: int
    cost: float | None                 # at the given prices; None: no prices given
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        kind = " (a simulation of an LLM teacher: it calls no LLM and costs nothing)" if self.simulated else ""
        trimmed = (", left out to fit: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.prompt.trimmed.items())
                   if self.prompt.trimmed else "")
        out = [f"dry run: teacher {self.teacher}{kind}",
               f"first prompt: {self.prompt.tokens} tokens at most{trimmed}",
               f"teacher calls at most: {self.calls} ({self.cycles} cycles x {self.calls_per_cycle} "
               f"call{'s' if self.calls_per_cycle != 1 else ''}, each with its one repair request)",
               f"tokens at most: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion",
               "cost at most: " + (f"{self.cost:.4f} (at the given prices per 1,000 tokens)" if self.cost is not None
                                   else "unknown (no --price-prompt-per-1k or --price-completion-per-1k given)")]
        return out + [f"note: {n}" for n in self.notes]


def stand_in_request(config: DistillConfig, splits: Splits) -> GenerationRequest:
    """The first request at its largest (the module's docstring says how)."""
    labels, validation = splits.labels, splits.validation
    longest = sorted(validation, key=lambda s: (-len(s.text), s.text))

    def mined(samples, wrong: bool) -> list[MinedSample]:
        return [MinedSample(text=s.text, label=s.label, confidence=0.99,
                            predicted=next(c for c in labels if c != s.label) if wrong else s.label) for s in samples]
    a, b, c = config.hard_negatives, config.misclassified, config.correct
    mining = MiningResult(hard_negatives=mined(longest[:a], True), misclassified=mined(longest[a:a + b], True),
                          correct=mined(longest[a + b:a + b + c], False))
    support: dict[str, int] = {}
    for s in validation:
        support[s.label] = support.get(s.label, 0) + 1
    half = ClassScores(precision=0.5, recall=0.5, f1=0.5, support=0)
    report = EvalReport(accuracy=0.5, macro_precision=0.5, macro_recall=0.5, macro_f1=0.5, weighted_precision=0.5,
                        weighted_recall=0.5, weighted_f1=0.5, loss=1.0, samples=len(validation), confusions=[],
                        per_class={label: half.model_copy(update={"support": support.get(label, 0)})
                                   for label in labels})
    wanted = config.samples_wanted(0)
    return build_request(config, labels, splits.train, mining, report, min(wanted, config.teacher_max_per_call), 1,
                         taxonomy=splits.taxonomy)


def first_prompt(config: DistillConfig, splits: Splits, count_tokens) -> Prompt:
    """The largest first prompt, trimmed to --teacher-max-prompt-tokens: PromptTooLong (one line,
    exit 2) when even the smallest cannot fit, which a run checks before it trains anything."""
    return fit(stand_in_request(config, splits), config.teacher_max_prompt_tokens, count_tokens)


def plan(config: DistillConfig, splits: Splits, teacher_name: str, simulated: bool, count_tokens) -> Plan:
    prompt = first_prompt(config, splits, count_tokens)
    cycles = config.max_cycles
    if config.sample_budget is not None:
        cycles = min(cycles, math.ceil(config.sample_budget / config.samples_per_cycle))
    per_cycle = math.ceil(config.samples_per_cycle / config.teacher_max_per_call)
    asks = cycles * per_cycle                       # first requests; each may need one repair request
    limit, answer = config.teacher_max_prompt_tokens, config.teacher_max_tokens
    prompt_tokens = asks * limit + asks * (limit + answer + REPAIR_TOKENS)
    completion_tokens = 2 * asks * answer
    notes = []
    per_cycle_tokens = (prompt_tokens + completion_tokens) // max(cycles, 1)
    if config.token_budget is not None and config.token_budget + per_cycle_tokens < prompt_tokens + completion_tokens:
        scale = (config.token_budget + per_cycle_tokens) / (prompt_tokens + completion_tokens)
        prompt_tokens, completion_tokens = int(prompt_tokens * scale), int(completion_tokens * scale)
        notes.append(f"--token-budget {config.token_budget} stops the run after the cycle that reaches it: at most one "
                     "cycle's tokens past it")
    priced = config.price_prompt_per_1k > 0 or config.price_completion_per_1k > 0
    cost = ((prompt_tokens * config.price_prompt_per_1k + completion_tokens * config.price_completion_per_1k) / 1000
            if priced else None)
    if cost is not None and config.cost_budget is not None and cost > config.cost_budget:
        per_cycle_cost = cost / max(cycles, 1)
        cost = min(cost, config.cost_budget + per_cycle_cost)
        notes.append(f"--cost-budget {config.cost_budget:g} stops the run after the cycle that reaches it: at most "
                     "one cycle's cost past it")
    if prompt.tokens is not None and prompt.tokens < limit:
        notes.append(f"at the first prompt's size ({prompt.tokens} tokens) rather than the limit ({limit}), the prompt "
                     f"tokens would be at most {2 * asks * prompt.tokens + asks * (answer + REPAIR_TOKENS):,}")
    notes.append("the student's mistakes are not known before it trains: the longest validation texts stand in for "
                 "them and the report's figures are placeholders (0.50), so the first prompt shown is the largest "
                 "it can be")
    return Plan(teacher=teacher_name, simulated=simulated, prompt=prompt, cycles=cycles, calls_per_cycle=per_cycle,
                calls=2 * asks, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost,
                notes=notes)


def check_fits(config: DistillConfig, splits: Splits, teacher=None) -> None:
    """Before any training: an LLM teacher's prompt can fit --teacher-max-prompt-tokens (PromptTooLong,
    one line and exit 2, if even the smallest cannot). Simulated teachers and teacher objects read no prompt."""
    from pgkd.teachers.transports import is_llm_teacher
    count = getattr(teacher, "count_tokens", None)
    if count is None and teacher is None and is_llm_teacher(config.teacher):
        from pgkd.teachers.llm import default_token_counter
        count = default_token_counter()
    if count is not None:
        first_prompt(config, splits, count)
