"""What a run would send its teacher and spend at most, known before any training or teacher call
(`pgkd distill --dry-run`, `pgkd submit --dry-run`); and the check, before training, that a prompt
can fit `--teacher-max-prompt-tokens` at all.

The first prompt's mistakes are not known before the student trains, so the largest first prompt is
shown: the longest texts of the split the teacher is guided by stand in for the hard negatives, the
misclassified and the correct samples (as many as --hard-negatives, --misclassified, --correct ask for),
the longest label for each one predicted, the longest text of each class for the examples, every class
the report can list with placeholder scores, and as many confused pairs as a report shows. If even its
smallest trimmed form cannot fit, no later prompt can (the trimming never removes what it keeps).

The figures are upper bounds under the run's options: every cycle runs, every call (and the one repair
request each may need) sends a prompt of the full limit and takes the full answer. Tokens are as pgkd
counts them (pgkd.teachers.llm.TokenCounter), which the server's own count may exceed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pgkd.data import Splits
from pgkd.loop.config import DistillConfig
from pgkd.loop.cycle import build_request
from pgkd.loop.evaluation import TOP_CONFUSIONS
from pgkd.teachers.prompt import REPAIR_TOKENS, Prompt, fit
from pgkd.types import ClassScores, Confusion, EvalReport, GenerationRequest, MinedSample, MiningResult, Sample


@dataclass
class Plan:
    teacher: str
    simulated: bool
    prompt: Prompt                     # the largest first prompt, as it would be sent (trimmed to the limit)
    cycles: int                        # cycles of teaching at most
    calls_per_cycle: int               # parts of a cycle's request, each one call (and at most one repair)
    calls: int                         # answered calls at most, repair requests included
    prompt_tokens: int                 # at most, over the run
    completion_tokens: int
    cost: float | None                 # at the given prices; None: no prices given
    limit: int | None = None           # --teacher-max-prompt-tokens less the room kept for a repair request
    notes: list[str] = field(default_factory=list)

    @property
    def first_prompt_tokens(self) -> int | None:
        """A bound on the first prompt: the stand-in's own size, or the limit once it had to be trimmed
        (another request's trimming may keep a little more)."""
        return self.limit if self.prompt.trimmed and self.limit is not None else self.prompt.tokens

    def lines(self) -> list[str]:
        trimmed = (", left out to fit: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in self.prompt.trimmed.items())
                   if self.prompt.trimmed else "")
        out = [f"dry run: teacher {self.teacher}"
               + (" (a simulation of an LLM teacher: it calls no LLM and spends nothing)" if self.simulated else ""),
               f"first prompt: {self.first_prompt_tokens} tokens at most{trimmed}"
               + (" (what an LLM teacher would be sent)" if self.simulated else "")]
        if not self.simulated:
            out += [f"teacher calls at most: {self.calls} ({self.cycles} cycle{'s' if self.cycles != 1 else ''} x "
                    f"{self.calls_per_cycle} call{'s' if self.calls_per_cycle != 1 else ''}, each with its one repair "
                    "request)",
                    f"tokens at most: {self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion (as pgkd "
                    "counts them; a server that counts more spends more)",
                    "cost at most: " + (f"{self.cost:.4f} (at the given prices per 1,000 tokens, on pgkd's count)"
                                        if self.cost is not None
                                        else "unknown (no --price-prompt-per-1k or --price-completion-per-1k given)")]
        return out + [f"note: {n}" for n in self.notes]


def stand_in_request(config: DistillConfig, splits: Splits) -> GenerationRequest:
    """The first request at its largest (the module's docstring says how)."""
    labels = splits.labels
    guided_by = splits.train if config.guidance_source == "out-of-fold" else splits.validation
    longest = sorted(guided_by, key=lambda s: (-len(s.text), s.text))
    by_length = sorted(labels, key=lambda c: (-len(c), c))

    def other(label: str) -> str:
        return next(c for c in by_length if c != label)

    def mined(samples, wrong: bool) -> list[MinedSample]:
        return [MinedSample(text=s.text, label=s.label, confidence=0.8765432109876543,
                            predicted=other(s.label) if wrong else s.label) for s in samples]
    a, b, c = config.hard_negatives, config.misclassified, config.correct
    mining = MiningResult(hard_negatives=mined(longest[:a], True), misclassified=mined(longest[a:a + b], True),
                          correct=mined(longest[a + b:a + b + c], False))
    support: dict[str, int] = {}
    for s in guided_by:
        support[s.label] = support.get(s.label, 0) + 1
    shown = ClassScores(precision=0.5, recall=0.5, f1=0.5, support=0)
    report = EvalReport(accuracy=0.5, macro_precision=0.5, macro_recall=0.5, macro_f1=0.5, weighted_precision=0.5,
                        weighted_recall=0.5, weighted_f1=0.5, loss=10.0, samples=len(guided_by),
                        confusions=[Confusion(true=t, predicted=other(t), count=99)
                                    for t in by_length[:TOP_CONFUSIONS]],
                        per_class={label: shown.model_copy(update={"support": support.get(label, 0)})
                                   for label in labels})
    request = build_request(config, labels, splits.train, mining, report, first_part(config), 1,
                            taxonomy=splits.taxonomy)
    longest_of: dict[str, Sample] = {}
    file_examples = [Sample(text=t, label=c.label) for c in (splits.taxonomy.classes if splits.taxonomy else ())
                     for t in c.examples]
    present = {s.label for s in splits.train}
    for s in splits.train + [e for e in file_examples if e.label not in present]:   # as build_request picks them
        if s.label not in longest_of or len(s.text) > len(longest_of[s.label].text):
            longest_of[s.label] = s
    examples = sorted(longest_of.values(), key=lambda s: (-len(s.text), s.label))[:len(request.examples)]
    return request.model_copy(update={"examples": examples})


def first_part(config: DistillConfig) -> int:
    return min(config.samples_wanted(0), config.teacher_max_per_call)


def part_note(config: DistillConfig) -> str:
    """The note a request split into parts carries (as pgkd.teachers.llm adds it)."""
    from pgkd.teachers.llm import part_notes
    return part_notes(config.samples_wanted(0), config.teacher_max_per_call)[0]


def first_prompt(config: DistillConfig, splits: Splits, count_tokens) -> Prompt:
    """The largest first prompt, trimmed to --teacher-max-prompt-tokens (room kept for a repair
    request): PromptTooLong (one line, exit 2) when even the smallest cannot fit, which a run checks
    before it trains anything."""
    return fit(stand_in_request(config, splits), config.teacher_max_prompt_tokens, count_tokens,
               part_note(config), reserve=REPAIR_TOKENS)


def plan(config: DistillConfig, splits: Splits, teacher_name: str, simulated: bool, count_tokens) -> Plan:
    prompt = first_prompt(config, splits, count_tokens)
    cycles = config.max_cycles
    per_cycle = math.ceil(config.samples_per_cycle / config.teacher_max_per_call)
    calls = 2 * cycles * per_cycle                          # each part, and its one repair request
    limit, answer = config.teacher_max_prompt_tokens, config.teacher_max_tokens
    cycle_prompt, cycle_completion = 2 * per_cycle * limit, 2 * per_cycle * answer
    prompt_tokens, completion_tokens = cycles * cycle_prompt, cycles * cycle_completion
    notes = []
    if simulated:
        notes.append("the simulated teacher reads the request itself: no prompt is sent, nothing is spent")
        return Plan(teacher=teacher_name, simulated=True, prompt=prompt, cycles=cycles, calls_per_cycle=per_cycle,
                    calls=0, prompt_tokens=0, completion_tokens=0, cost=0.0, limit=limit - REPAIR_TOKENS, notes=notes)
    if config.token_budget is not None:   # the run stops after the cycle that reaches it
        prompt_tokens = min(prompt_tokens, config.token_budget + cycle_prompt)
        completion_tokens = min(completion_tokens, config.token_budget + cycle_completion)
        notes.append(f"--token-budget {config.token_budget}: the run stops after the cycle that reaches it, so at most "
                     "one cycle's tokens past it")
    p, c = config.price_prompt_per_1k / 1000, config.price_completion_per_1k / 1000
    cost = None
    if p or c:
        cost = prompt_tokens * p + completion_tokens * c
        if config.cost_budget is not None:
            cost = min(cost, config.cost_budget + cycle_prompt * p + cycle_completion * c)
            notes.append(f"--cost-budget {config.cost_budget:g}: the run stops after the cycle that reaches it, so at "
                         "most one cycle's cost past it")
    if config.sample_budget is not None:
        notes.append(f"--sample-budget {config.sample_budget} may stop the run sooner (it counts the samples answered)")
    if prompt.tokens is not None and not prompt.trimmed and prompt.tokens < limit - REPAIR_TOKENS:
        at_size = min(prompt_tokens, cycles * 2 * per_cycle * (prompt.tokens + REPAIR_TOKENS))
        notes.append(f"at the first prompt's size ({prompt.tokens} tokens) rather than the limit ({limit}), the prompt "
                     f"tokens would be at most {at_size:,}")
    notes.append("not counted: a failed call's retries (--teacher-retries; a server may bill a call it timed out) "
                 "and a refusal of the structured answer, which is not answered")
    notes.append("the student's mistakes are not known before it trains: the longest texts stand in for them and the "
                 "report's figures are placeholders, so the first prompt shown is the largest it can be")
    return Plan(teacher=teacher_name, simulated=simulated, prompt=prompt, cycles=cycles, calls_per_cycle=per_cycle,
                calls=calls, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost,
                limit=limit - REPAIR_TOKENS, notes=notes)


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
