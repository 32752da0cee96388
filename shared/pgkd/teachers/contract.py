"""The teacher contract: a structured generation request in, a batch of labeled samples out
(the request, batch and usage values live in pgkd.types).

LLM teachers render the request into the PGKD prompt (prompt.py); simulated teachers read its
fields directly. Either way the request is the whole guidance the student's performance gives.
"""
from __future__ import annotations

from typing import Protocol

from pgkd.types import GeneratedBatch, GenerationRequest


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
