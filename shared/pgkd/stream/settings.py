"""A stream's settings: PGKD_STREAM_* in the ingest service, and the stream's settings file
(PGKD_STREAM_SETTINGS_FILE), which an operator edits while ingest runs.

The file (YAML or JSON: a Kubernetes ConfigMap mounted as a file, a bind mount in compose) holds the
settings that may change while the stream goes on (RELOADABLE): the triggers, the drift check, and
`run`, the options of the runs it triggers (any `pgkd distill` option but data and labeled, over the
base run's). Ingest looks at the file before each batch; a changed file that does not validate is
one logged line, and the settings in force stay."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from pgkd.errors import UserError
from pgkd.names import NAME_PATTERN
from pgkd.loop.config import DistillConfig

RELOADABLE = ("trigger_count", "drift_window", "drift_margin", "drift_reference_windows", "new_labels", "run")
FIXED_RUN_OPTIONS = ("data", "labeled")    # a stream run's data is the stream's


class StreamSettings(BaseModel):
    """How ingest treats a stream; from PGKD_STREAM_* in the service (see `from_env`), the RELOADABLE
    ones also from the stream's settings file (see `with_file`)."""
    stream: str = Field("default", pattern=NAME_PATTERN, max_length=40)   # a name (pgkd.names)
    base_run: str | None = Field(None, pattern=NAME_PATTERN)   # the run whose data and best student the stream starts from
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(2000, ge=1)    # longer texts are rejected (oversized), not truncated
    new_labels: Literal["reject", "extend"] = "reject"    # extend: a new label grows the taxonomy
    validation_percent: int = Field(20, ge=0, le=100)
    trigger_count: int = Field(500, gt=0)
    drift_window: int = Field(200, gt=0)
    drift_margin: float = Field(0.1, ge=0, le=1)
    # The drift reference: the current student's accuracy on its first windows of new samples
    drift_reference_windows: int = Field(3, gt=0)
    run: dict = {}                        # options of the runs the stream triggers, over the base run's
    serving_model: str = Field("student", pattern=NAME_PATTERN)   # the served model it keeps current
    settings_file: str | None = None      # where the RELOADABLE settings may also come from
    segment_samples: int = Field(10_000, gt=0)   # samples a segment file holds (segments.py)
    batch_max: int = Field(500, gt=0)            # messages ingest takes in one batch, at most
    batch_seconds: float = Field(0.2, gt=0)      # and how long it waits to fill one

    @field_validator("run")
    @classmethod
    def _run_options(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(DistillConfig.model_fields))
        if unknown:
            raise ValueError(f"not options of a run: {', '.join(unknown)}")
        fixed = sorted(set(value) & set(FIXED_RUN_OPTIONS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: a stream run's data is the stream's")
        return value

    @classmethod
    def from_env(cls, env=None) -> "StreamSettings":
        env = os.environ if env is None else env
        values = {field: env[cls.variable(field)] for field in cls.model_fields if env.get(cls.variable(field))}
        if "run" in values:
            try:
                values["run"] = json.loads(values["run"])
            except ValueError:
                raise UserError(f"PGKD_STREAM_RUN={values['run']!r}: not a JSON object") from None
        try:
            return cls(**values)
        except ValidationError as e:
            field = str(e.errors()[0]["loc"][0])
            message = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise UserError(f"{cls.variable(field)}={values.get(field)!r}: {message}") from None

    @staticmethod
    def variable(field: str) -> str:
        """The environment variable of a setting: PGKD_STREAM, PGKD_STREAM_BASE_RUN, ..."""
        return "PGKD_STREAM" if field == "stream" else f"PGKD_STREAM_{field.upper()}"

    def with_file(self) -> tuple["StreamSettings", "SettingsFile | None"]:
        """These settings with the file's over them, and what was read; UserError (one line naming the
        file) when it is unreadable, not a mapping, names a setting it may not hold, or does not validate."""
        if not self.settings_file:
            return self, None
        path = Path(self.settings_file)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read the stream's settings ({e.strerror})") from None
        try:
            values = yaml.safe_load(data) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not YAML or JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
        fixed = sorted(set(values) - set(RELOADABLE))
        if fixed:
            raise UserError(f"{path}: {', '.join(map(str, fixed))}: not settings this file holds (it holds "
                            f"{', '.join(RELOADABLE)}; the others are PGKD_STREAM_* in the environment)")
        try:
            merged = self.model_validate({**self.model_dump(), **values})
        except ValidationError as e:
            error = e.errors()[0]
            message = error["msg"].removeprefix("Value error, ")
            raise UserError(f"{path}: {'.'.join(str(x) for x in error['loc'])}: {message}") from None
        return merged, SettingsFile(path=str(path), sha256=hashlib.sha256(data).hexdigest(), values=values)

    def in_force(self) -> dict:
        """The RELOADABLE settings' values: what a run records it was triggered under."""
        return {name: getattr(self, name) for name in RELOADABLE}


class SettingsFile(BaseModel):
    path: str
    sha256: str
    values: dict
