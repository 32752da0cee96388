"""Screening generated samples before they join the training set.

A sample is accepted when its label is in the taxonomy (case and whitespace normalised to the
taxonomy's spelling), its text is non-empty and within length bounds, and its text duplicates
neither a known text (train, validation, test) nor another sample of the same batch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pgkd.data import normalize_text
from pgkd.types import Sample

REASONS = ("unknown_label", "empty_text", "too_short", "too_long", "duplicate_of_known", "duplicate_in_batch")


@dataclass
class Screened:
    accepted: list[Sample]
    rejected: Counter = field(default_factory=Counter)

    def rejected_by_reason(self) -> dict[str, int]:
        return {reason: self.rejected[reason] for reason in REASONS if self.rejected[reason]}


def screen(samples: list[Sample], taxonomy: list[str], known_texts: set[str],
           min_chars: int = 3, max_chars: int = 1000) -> Screened:
    """`known_texts` holds normalize_text() keys of every text the run must not see again."""
    labels = {normalize_text(c): c for c in taxonomy}
    out = Screened(accepted=[])
    batch_keys: set[str] = set()
    for s in samples:
        text = " ".join(str(s.text).split())
        label = labels.get(normalize_text(str(s.label)))
        reason = None
        if label is None:
            reason = "unknown_label"
        elif not text:
            reason = "empty_text"
        elif len(text) < min_chars:
            reason = "too_short"
        elif len(text) > max_chars:
            reason = "too_long"
        else:
            key = normalize_text(text)
            if key in known_texts:
                reason = "duplicate_of_known"
            elif key in batch_keys:
                reason = "duplicate_in_batch"
            else:
                batch_keys.add(key)
        if reason:
            out.rejected[reason] += 1
        else:
            out.accepted.append(Sample(text=text, label=label))
    return out
