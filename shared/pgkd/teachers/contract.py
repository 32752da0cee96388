"""The teacher contract: a structured generation request in, a batch of labeled samples out.

LLM teachers render the request into the PGKD prompt (prompt.py); simulated teachers read its
fields directly. Either way the request is the whole guidance the student's performance gives.
"""
from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field

from pgkd.data import Sample
from pgkd.loop.evaluation import EvalReport
from pgkd.loop.mining import MinedSample


class GenerationRequest(BaseModel):
    taxonomy: list[str]
    examples: list[Sample]
    report: EvalReport | None          # None: the teacher is not shown the validation report
    hard_negatives: list[MinedSample]
    misclassified: list[MinedSample]
    correct: list[MinedSample]
    n: int = Field(gt=0)
    cycle: int = 0

    def prompt(self) -> str:
        """The PGKD prompt an LLM teacher is sent for this request (pgkd.teachers.prompt)."""
        from pgkd.teachers.prompt import render_prompt
        return render_prompt(self)


class TeacherUsage(BaseModel):
    """What asking the teacher cost. `seconds` is the sum of the calls' round-trip times."""
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0                  # from the configured prices per 1k tokens
    retries: int = 0
    cache_hits: int = 0                # answers read from the response cache instead of the teacher
    errors: dict[str, int] = {}        # failed calls by kind (timeout, transport, server_error, ...)
    call_seconds: list[float] = []     # the round trip of each answered call

    def __add__(self, other: "TeacherUsage") -> "TeacherUsage":
        errors = dict(self.errors)
        for kind, count in other.errors.items():
            errors[kind] = errors.get(kind, 0) + count
        return TeacherUsage(calls=self.calls + other.calls, prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                            completion_tokens=self.completion_tokens + other.completion_tokens,
                            seconds=self.seconds + other.seconds, cost=self.cost + other.cost,
                            retries=self.retries + other.retries, cache_hits=self.cache_hits + other.cache_hits,
                            errors=errors, call_seconds=self.call_seconds + other.call_seconds)


class GeneratedBatch(BaseModel):
    samples: list[Sample]
    teacher: str
    usage: TeacherUsage = TeacherUsage()
    rejected: dict[str, int] = {}      # answers or list items dropped before screening, by reason


class TeacherUnavailable(RuntimeError):
    """The teacher cannot be reached (its calls keep failing): the cycle cannot get samples."""


class Teacher(Protocol):
    """What the loop asks of a teacher. `check()` (reach it before any training) is optional. A
    user's object needs `generate` only: pgkd.api.ObjectTeacher gives it the rest."""
    name: str
    simulated: bool          # True for the simulations of an LLM teacher, said in every report

    def generate(self, request: GenerationRequest) -> GeneratedBatch: ...

    def describe(self) -> dict: ...

    def state(self) -> dict: ...                 # what carries over between requests (a restarted
                                                 # generator answers the same)
    def load_state(self, state: dict) -> None: ...
