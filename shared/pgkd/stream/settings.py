"""A stream's settings, from PGKD_STREAM_* in the ingest service."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from pgkd.errors import UserError


class StreamSettings(BaseModel):
    """How ingest treats a stream; from PGKD_STREAM_* in the service (see `from_env`)."""
    stream: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    base_run: str | None = None           # the run whose data and best student the stream starts from
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(2000, ge=1)    # longer texts are rejected (oversized), not truncated
    new_labels: Literal["reject", "extend"] = "reject"    # extend: a new label grows the taxonomy
    validation_percent: int = Field(20, ge=0, le=100)
    trigger_count: int = Field(500, gt=0)
    drift_window: int = Field(200, gt=0)
    drift_margin: float = Field(0.1, ge=0, le=1)
    serving_model: str = Field("student", pattern=r"^[A-Za-z0-9_.-]{1,64}$")   # the served model it keeps current

    @classmethod
    def from_env(cls, env=None) -> "StreamSettings":
        env = os.environ if env is None else env
        values = {field: env[cls.variable(field)] for field in cls.model_fields if env.get(cls.variable(field))}
        try:
            return cls(**values)
        except ValidationError as e:
            field = str(e.errors()[0]["loc"][0])
            raise UserError(f"{cls.variable(field)}={values.get(field)!r}: {e.errors()[0]['msg']}") from None

    @staticmethod
    def variable(field: str) -> str:
        """The environment variable of a setting: PGKD_STREAM, PGKD_STREAM_BASE_RUN, ..."""
        return "PGKD_STREAM" if field == "stream" else f"PGKD_STREAM_{field.upper()}"
