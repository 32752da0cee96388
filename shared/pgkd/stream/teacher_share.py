"""The bound on teacher labels in a triggered run's training set (PGKD_STREAM_MAX_TEACHER_LABEL_SHARE).

A teacher label is an LLM's answer on a text the served student deferred: not checked by a person,
so a run may train on some, never mostly on them. They are never in validation (samples.split_for),
so they never select or promote a student; this bounds what they weigh in training."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from pgkd.types import Sample


@dataclass
class TeacherShare:
    """A run's training set with its teacher labels bounded: `train` (the others, then the teacher
    labels kept, oldest first), how many teacher labels were kept and how many were left out."""
    train: list[Sample]
    kept: int
    left_out: int


def teacher_labels_allowed(others: int, available: int, share: float) -> int:
    """How many of `available` teacher labels a training set of `others` other samples may take so
    that they are at most `share` of the whole: k <= share * (others + k), so k <= share * others /
    (1 - share); all of them when `share` is 1."""
    if share >= 1:
        return available
    exact = Fraction(str(share))      # the share as written (0.3 is 3/10): no rounding at the bound
    return min(available, int(exact * others // (1 - exact)))


def bound_teacher_share(others: list[Sample], teacher: list[Sample], share: float) -> TeacherShare:
    """`others` (no teacher label among them) and as many of `teacher` (oldest first) as the share
    allows. The newest are kept: they answer the texts the current student defers now (what
    production sends today, and what it has not yet learned); the older ones were deferred by earlier
    students, whose runs may already have trained on them. What is left out stays stored, and a later
    run with more human labels may take it."""
    keep = teacher_labels_allowed(len(others), len(teacher), share)
    kept = teacher[len(teacher) - keep:]
    return TeacherShare(train=others + kept, kept=keep, left_out=len(teacher) - keep)
