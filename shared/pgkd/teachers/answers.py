"""Reading a teacher LLM's answer: a JSON list of {"text", "label"} objects, wherever it is.

LLMs wrap JSON in code fences, put a sentence before or after it, or answer with an object holding
the list. `parse_answer` finds the first JSON list of objects in the text and returns its samples,
with what it had to drop counted by reason; `AnswerError` means there was no such list (the caller
may ask once more, saying why).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

from pgkd.types import Sample

FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


class AnswerError(ValueError):
    """The answer holds no JSON list of samples."""


@dataclass
class ParsedAnswer:
    samples: list[Sample]
    dropped: Counter = field(default_factory=Counter)   # reason -> count of list items not taken


def _candidates(text: str) -> list:
    """JSON values found in the text: inside code fences first, then from each '[' or '{' on."""
    decoder = json.JSONDecoder()
    found = []
    for chunk in FENCE.findall(text) + [text]:
        for match in re.finditer(r"[\[{]", chunk):
            try:
                value, _ = decoder.raw_decode(chunk, match.start())
            except json.JSONDecodeError:
                continue
            found.append(value)
            if isinstance(value, list):
                break
    return found


def _as_list(value) -> list | None:
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return value
    if isinstance(value, dict):  # {"samples": [...]} or similar: the one list of objects inside
        lists = [v for v in value.values() if isinstance(v, list) and any(isinstance(x, dict) for x in v)]
        return lists[0] if len(lists) == 1 else None
    return None


def parse_answer(text: str) -> ParsedAnswer:
    for value in _candidates(text):
        items = _as_list(value)
        if items is None:
            continue
        parsed = ParsedAnswer(samples=[])
        for item in items:
            if not isinstance(item, dict):
                parsed.dropped["malformed_sample"] += 1
                continue
            item_text, label = item.get("text"), item.get("label")
            if not isinstance(item_text, str) or not isinstance(label, (str, int)):
                parsed.dropped["malformed_sample"] += 1
                continue
            parsed.samples.append(Sample(text=item_text, label=str(label)))
        return parsed
    snippet = " ".join(text.split())[:120]
    raise AnswerError(f"no JSON list of {{\"text\", \"label\"}} objects in the answer (it begins: {snippet!r})")


def parse_labels(text: str, taxonomy: list[str], n: int) -> list[str | None]:
    """A classification answer: {"labels": [...]} (or a bare list) of n labels in the texts' order.
    A label outside the taxonomy, a missing one, or one that is not text is None; no such list at all
    is AnswerError."""
    for value in _candidates(text):
        labels = value.get("labels") if isinstance(value, dict) else value
        if isinstance(labels, list) and (not labels or all(not isinstance(v, (dict, list)) for v in labels)):
            known = set(taxonomy)
            read = [str(v) if isinstance(v, (str, int)) and str(v) in known else None for v in labels[:n]]
            return read + [None] * (n - len(read))
    snippet = " ".join(text.split())[:120]
    raise AnswerError(f"no JSON list of labels in the answer (it begins: {snippet!r})")
