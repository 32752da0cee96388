"""A stream's settings: PGKD_STREAM_* in the ingest service, and the stream's settings file
(PGKD_STREAM_SETTINGS_FILE), which an operator edits while ingest runs.

The file (YAML or JSON: a Kubernetes ConfigMap mounted as a file, a bind mount in compose) holds the
settings that may change while the stream goes on (RELOADABLE): the triggers, the drift check, the
share of teacher labels a run may train on, and `run`, the options of the runs it triggers (any
`pgkd distill` option but data and labeled, over the base run's). Ingest looks at the file before each batch; a changed file that does not validate is
one logged line, and the settings in force stay."""
from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError, field_validator

from pgkd.errors import UserError, dotted, invalid
from pgkd.loop.config import DistillConfig
from pgkd.settings import StreamFields, StreamVariables, read

RELOADABLE = ("trigger_count", "drift_window", "drift_margin", "drift_reference_windows", "new_labels",
              "max_teacher_label_share", "run")
FIXED_RUN_OPTIONS = ("data", "labeled")    # a stream run's data is the stream's


class StreamSettings(StreamFields):
    """How ingest treats a stream; from PGKD_STREAM_* in the service (see `from_env`; the fields and
    their variables are pgkd.settings.StreamFields), the RELOADABLE ones also from the stream's
    settings file (see `with_file`)."""

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
        """PGKD_STREAM_* (os.environ, or `env`); UserError naming the variable."""
        values = read(StreamVariables, env).model_dump()
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise invalid(e, name=lambda loc, value: f"{cls.variable(str(loc[0]))}={value!r}") from None

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
            raise UserError(f"{path}: {invalid(e, dotted())}") from None
        return merged, SettingsFile(path=str(path), sha256=hashlib.sha256(data).hexdigest(), values=values)

    def in_force(self) -> dict:
        """The RELOADABLE settings' values: what a run records it was triggered under."""
        return {name: getattr(self, name) for name in RELOADABLE}


class SettingsFile(BaseModel):
    path: str
    sha256: str
    values: dict
