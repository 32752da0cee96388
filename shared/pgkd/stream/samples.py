"""One streamed sample: validated (a bad one is Rejected with a reason), keyed by its normalised
text, routed to train or validation by a stable hash; a teacher label (pgkd.distributed.messages.
source_kind) always to train (segments.py stores it)."""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ValidationError

from pgkd.data import normalize_text
from pgkd.distributed.messages import LabeledSample, source_kind
from pgkd.distributed.metrics import INGEST_REJECTIONS
from pgkd.errors import dotted, invalid
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
    model: str | None = None      # a teacher label's model
    arrived_at: float

    @property
    def is_teacher(self) -> bool:
        return source_kind(self.source) == "teacher"


def parse_sample(body: bytes | None, settings: StreamSettings) -> LabeledSample:
    """The message as a sample, or Rejected with why: no value at all (a tombstone), not UTF-8, not
    JSON, wrong fields, empty, too short or too long. `body` is the record's value, None for a null one."""
    if body is None:
        raise Rejected("tombstone", "the record has no value (null): a delete marker, not a sample")
    if len(body) > 4 * settings.max_chars + 4096:   # no need to parse a huge body to know
        raise Rejected("oversized", f"message of {len(body)} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("not_utf8", f"byte 0x{body[e.start]:02x} at offset {e.start} is not UTF-8 ({e.reason}); "
                                   f"the message starts {body[:24]!r}") from None
    text = text.removeprefix("\ufeff")   # a leading byte order mark, as json.loads(bytes) takes it
    try:
        row = json.loads(text)
    except ValueError as e:
        raise Rejected("not_json", _not_json(body, text, e)) from None
    if not isinstance(row, dict):
        raise Rejected("not_json", f"expected a JSON object, got {type(row).__name__}")
    try:
        sample = LabeledSample.model_validate(row)
    except ValidationError as e:
        raise Rejected("invalid_fields", str(invalid(e, dotted("message"), limit=3))) from None
    text = " ".join(sample.text.split())
    if not text:
        raise Rejected("empty_text", "the text is empty")
    if len(text) < settings.min_chars:
        raise Rejected("too_short", f"{len(text)} characters, fewer than {settings.min_chars}")
    if len(text) > settings.max_chars:
        raise Rejected("oversized", f"{len(text)} characters, more than {settings.max_chars}")
    if not sample.label.strip():
        raise Rejected("invalid_fields", "label: empty")
    return sample.model_copy(update={"text": text, "label": sample.label.strip(),
                                     "model": (sample.model or "").strip() or None})


def _not_json(body: bytes, text: str, e: ValueError) -> str:
    """Why a UTF-8 message is not JSON, with the bytes where it went wrong: a message that is empty or
    blank, and one that starts with bytes no JSON starts with, each said as such."""
    if not text.strip():
        return "the message is empty" if not body else f"the message is blank ({len(body)} bytes of whitespace)"
    if not isinstance(e, json.JSONDecodeError):
        return str(e)[:120]
    where = f"{e.msg} at line {e.lineno} column {e.colno}"
    offset = len(body) - len(text.encode()) + len(text[:e.pos].encode())   # bytes: a byte order mark counts
    if not text[:e.pos].strip():
        return f"{where}; the message starts {body[:24]!r}"
    return f"{where}; near byte {offset}: {body[max(offset - 8, 0):offset + 16]!r}"


def text_key(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


def route(text: str, validation_percent: int) -> Literal["train", "validation"]:
    """Train or validation, by a hash of the normalised text: the same text always goes the same way."""
    return "validation" if int(text_key(text)[:8], 16) % 100 < validation_percent else "train"


def split_for(sample: LabeledSample, validation_percent: int) -> Literal["train", "validation"]:
    """Where a sample is stored: a teacher label always in train (validation, which selects and
    promotes students and measures drift, holds human labels only); a human label by `route`."""
    return "train" if sample.is_teacher else route(sample.text, validation_percent)

