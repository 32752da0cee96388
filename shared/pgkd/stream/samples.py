"""One streamed sample: validated (a bad one is Rejected with a reason), keyed by its normalised
text, routed to train or validation by a stable hash (segments.py stores it)."""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ValidationError

from pgkd.data import normalize_text
from pgkd.distributed.messages import LabeledSample
from pgkd.distributed.metrics import INGEST_REJECTIONS
from pgkd.stream.settings import StreamSettings

REJECTION_REASONS = INGEST_REJECTIONS


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in REJECTION_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class StoredSample(BaseModel):
    text: str
    label: str
    split: Literal["train", "validation"]
    seq: int                      # arrival order among the stream's accepted samples, from 1
    source: str | None = None
    id: str | None = None
    arrived_at: float


def parse_sample(body: bytes, settings: StreamSettings) -> LabeledSample:
    """The message as a sample, or Rejected with why: not JSON, wrong fields, empty, too short or too long."""
    if len(body) > 4 * settings.max_chars + 4096:   # no need to parse a huge body to know
        raise Rejected("oversized", f"message of {len(body)} bytes")
    try:
        row = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Rejected("not_json", str(e)[:120]) from None
    if not isinstance(row, dict):
        raise Rejected("not_json", f"expected a JSON object, got {type(row).__name__}")
    try:
        sample = LabeledSample.model_validate(row)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'message'}: {err['msg']}"
                             for err in e.errors()[:3])
        raise Rejected("invalid_fields", problems) from None
    text = " ".join(sample.text.split())
    if not text:
        raise Rejected("empty_text", "the text is empty")
    if len(text) < settings.min_chars:
        raise Rejected("too_short", f"{len(text)} characters, fewer than {settings.min_chars}")
    if len(text) > settings.max_chars:
        raise Rejected("oversized", f"{len(text)} characters, more than {settings.max_chars}")
    if not sample.label.strip():
        raise Rejected("invalid_fields", "label: empty")
    return sample.model_copy(update={"text": text, "label": sample.label.strip()})


def text_key(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


def route(text: str, validation_percent: int) -> Literal["train", "validation"]:
    """Train or validation, by a hash of the normalised text: the same text always goes the same way."""
    return "validation" if int(text_key(text)[:8], 16) % 100 < validation_percent else "train"

