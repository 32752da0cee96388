"""The teacher contract: a structured generation request in, a batch of labeled samples out.

LLM teachers render the request into the PGKD prompt (prompt.py); simulated teachers read its
fields directly. Either way the request is the whole guidance the student's performance gives.
"""
from __future__ import annotations

import random
from typing import Protocol

from pydantic import BaseModel, Field

from .data import Sample
from .evaluation import EvalReport
from .mining import MinedSample, MiningResult


class GenerationRequest(BaseModel):
    taxonomy: list[str]
    examples: list[Sample]
    report: EvalReport | None          # None: the teacher is not shown the validation report
    hard_negatives: list[MinedSample]
    misclassified: list[MinedSample]
    correct: list[MinedSample]
    n: int = Field(gt=0)
    cycle: int = 0


class TeacherUsage(BaseModel):
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class GeneratedBatch(BaseModel):
    samples: list[Sample]
    teacher: str
    usage: TeacherUsage = TeacherUsage()


class Teacher(Protocol):
    name: str
    simulated: bool

    def generate(self, request: GenerationRequest) -> GeneratedBatch: ...

    def describe(self) -> dict: ...


def build_request(taxonomy: list[str], train: list[Sample], mined: MiningResult, report: EvalReport | None,
                  n: int, cycle: int, seed: int, examples_per_class: int = 1, max_examples: int = 40,
                  with_report: bool = True, with_hard_negatives: bool = True) -> GenerationRequest:
    """Assemble the guidance for one cycle. Few-shot examples come from the weakest classes first
    (by validation F1 when there is a report), so a long taxonomy still fits a prompt."""
    rng = random.Random(seed * 1_000_003 + cycle)
    by_label: dict[str, list[Sample]] = {}
    for s in train:
        by_label.setdefault(s.label, []).append(s)
    order = list(taxonomy)
    if report is not None and with_report:
        order.sort(key=lambda c: report.per_class[c].f1 if report.per_class[c].support else 1.0)
    examples: list[Sample] = []
    for label in order:
        group = by_label.get(label, [])
        examples.extend(rng.sample(group, min(examples_per_class, len(group))))
        if len(examples) >= max_examples:
            break
    return GenerationRequest(taxonomy=taxonomy, examples=examples[:max_examples],
                             report=report if with_report else None,
                             hard_negatives=mined.hard_negatives if with_hard_negatives else [],
                             misclassified=mined.misclassified, correct=mined.correct, n=n, cycle=cycle)
