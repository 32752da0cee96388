"""Every PGKD_* environment variable, in one model: `pgkd settings` lists them with their defaults.

`Settings.from_env(env)` reads them all; `read(Section, env)` reads one section (a service reads the
sections it needs, so a bad variable of another part does not stop it). A section is a pydantic-settings
model whose fields carry their variable's name (`validation_alias`) and its meaning (`description`).
An empty variable counts as unset. A bad value is one UserError naming the variable (`PGKD_X='y': ...`,
exit 2 at the command line); a secret's value is never shown (a SecretStr: not in a repr, a log line
or an error), and each secret has a `*_FILE` variant that reads it from a mounted file.

This module imports only pydantic, pydantic-settings and the engine's leaf modules: the services, the
engine and `pgkd settings` all read it, and the engine never imports the bus.
"""
from __future__ import annotations

import math
import os
import re
import socket
from pathlib import Path
from collections.abc import Mapping
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator,
                      model_validator)
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgkd.errors import UserError, invalid
from pgkd.files import control_character
from pgkd.names import NAME_PATTERN, check_name
from pgkd.net import DEFAULT_HOST, parse_address, parse_host, parse_port

DEFAULT_ARTIFACTS = "file://./artifacts"
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SERVING_FORMATS = ("onnx", "torch")


def _checked(parse, *args):
    """A pgkd.net parser's UserError as the ValueError a validator raises: `read` names the variable."""
    try:
        return parse(*args)
    except UserError as e:
        raise ValueError(str(e).partition(": ")[2] or str(e)) from None


def var(name: str, default=None, description: str = "", secret: bool = False, **constraints):
    """A field read from the environment variable `name`; also settable by its field name in Python."""
    extra = {"variable": name, "secret": secret}
    return Field(default, validation_alias=AliasChoices(name), description=description,
                 json_schema_extra=extra, **constraints)


class Variables:
    """What a model of variables says of itself."""

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable of a field."""
        return cls.model_fields[field].json_schema_extra["variable"]

    @classmethod
    def variables(cls) -> dict[str, str]:
        """{variable: field}"""
        return {cls.variable(f): f for f in cls.model_fields}


class Section(Variables, BaseSettings):
    """A group of variables. Values come by variable name (from the environment) or by field name
    (Python callers, tests); an empty variable is unset. `read(Section, env)` is how one is read: the
    environment it is given (os.environ by default) is its one source, so a test's mapping is not
    mixed with the process's variables."""
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True, frozen=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,)


# -- the bus ---------------------------------------------------------------------------------------------
class BrokerSettings(Section):
    url: str = var("PGKD_BROKER_URL", "kafka://127.0.0.1:9092",
                   "the Kafka brokers: kafka://HOST:PORT[,HOST:PORT...]")
    topic_prefix: str = var("PGKD_TOPIC_PREFIX", "pgkd.", "prefix of every topic name (and consumer group)")
    connect_timeout: float = var("PGKD_CONNECT_TIMEOUT", 10.0,
                                 "seconds a command waits for the broker, and a starting service keeps trying it")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        scheme, _, rest = url.partition("://")
        servers = [s.strip() for s in rest.split(",") if s.strip()]
        if scheme != "kafka" or not servers:
            raise ValueError("expected kafka://host:port[,host:port...]")
        for server in servers:
            _checked(parse_address, server, "broker")
        return url

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, prefix: str) -> str:
        """Kafka's topic names: ASCII letters, digits, '.', '_' and '-', at most 249 characters in all."""
        if not re.fullmatch(r"[A-Za-z0-9._-]{0,200}", prefix):
            raise ValueError("a topic name's prefix takes letters, digits, '.', '_' and '-' (at most 200)")
        return prefix

    @field_validator("connect_timeout", mode="before")
    @classmethod
    def _seconds(cls, value):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = 0.0
        if not 0 < seconds < math.inf:
            raise ValueError("expected a number of seconds above 0")
        return seconds


class KafkaSecuritySettings(Section):
    """How the Kafka clients encrypt and authenticate; the checks across variables (a CA file with
    PLAINTEXT, SASL without a user) are pgkd_services.kafka_security's."""
    security_protocol: str = var("PGKD_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", f"{', '.join(KAFKA_PROTOCOLS)}")
    ca_file: str | None = var("PGKD_KAFKA_CA_FILE", None,
                              "PEM bundle of the CA that signed the brokers' certificates (else the system's)")
    cert_file: str | None = var("PGKD_KAFKA_CERT_FILE", None, "a client certificate (PEM), for TLS client auth")
    key_file: str | None = var("PGKD_KAFKA_KEY_FILE", None, "the client certificate's key (PEM)")
    sasl_mechanism: str | None = var("PGKD_KAFKA_SASL_MECHANISM", None, f"{', '.join(SASL_MECHANISMS)}")
    sasl_username: str | None = var("PGKD_KAFKA_SASL_USERNAME", None, "the SASL user")
    sasl_password: SecretStr | None = var("PGKD_KAFKA_SASL_PASSWORD", None, "the SASL user's password", secret=True)
    sasl_password_file: str | None = var("PGKD_KAFKA_SASL_PASSWORD_FILE", None,
                                         "a file holding the SASL password (a mounted Secret)")

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _one_of(cls, value, info):
        choices = KAFKA_PROTOCOLS if info.field_name == "security_protocol" else SASL_MECHANISMS
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    @field_validator("ca_file", "cert_file", "key_file", "sasl_username", "sasl_password_file", mode="before")
    @classmethod
    def _strip(cls, value):
        return (value.strip() or None) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _password_file(self):
        path = self.sasl_password_file
        if path is None:
            return self
        if self.sasl_password is not None:
            raise UserError("PGKD_KAFKA_SASL_PASSWORD and PGKD_KAFKA_SASL_PASSWORD_FILE are both set: give one")
        object.__setattr__(self, "sasl_password", SecretStr(read_secret_file("PGKD_KAFKA_SASL_PASSWORD_FILE", path)))
        # Read: the section now holds one password, and validated again (as part of Settings) it is one.
        object.__setattr__(self, "sasl_password_file", None)
        return self


def read_secret_file(variable: str, path: str) -> str:
    """A secret from a mounted file (the trailing newline a Secret or `echo` leaves taken off); UserError
    naming the variable and the path, never the content."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().rstrip("\r\n")
    except OSError as e:
        raise UserError(f"{variable}={path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{variable}={path}: not UTF-8 text") from None
    if not secret:
        raise UserError(f"{variable}={path}: the file is empty")
    return secret


# -- storage ---------------------------------------------------------------------------------------------
class ArtifactSettings(Section):
    artifacts: str = var("PGKD_ARTIFACTS", DEFAULT_ARTIFACTS,
                         "the artifact store: file:///FOLDER, or s3://BUCKET/PREFIX (gs://, ...) in a cluster")
    cache: str | None = var("PGKD_CACHE", None,
                            "a local folder for checkpoints fetched from the store (default: TMPDIR/pgkd-cache)")

    @field_validator("cache")
    @classmethod
    def _folder(cls, path: str | None) -> str | None:
        if path is not None and (bad := control_character(path)) is not None:
            raise ValueError(f"holds a control character (U+{ord(bad):04X})")
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError("not a folder")
        return path

    @field_validator("artifacts")
    @classmethod
    def _url(cls, url: str) -> str:
        check_artifacts_url(url)
        return url


STORE_SCHEMES = ("file", "s3", "gs", "gcs", "memory")   # a path without a scheme is a local folder


def check_artifacts_url(url: str) -> None:
    """ValueError for a URL of no store pgkd writes to (`http://...`), or a remote store's URL without its
    bucket (`s3://`, `gs:///x`): fsspec would read `s3:` as a local folder name."""
    if not url.strip():
        raise ValueError("empty (expected file:///PATH, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] or a folder's path)")
    bad = control_character(url)
    if bad is not None:
        raise ValueError(f"holds a control character (U+{ord(bad):04X})")
    parts = urlsplit(url)
    local = url.removeprefix("file://") if url.startswith("file://") else None if "://" in url else url
    if local and os.path.exists(os.path.expanduser(local)) and not os.path.isdir(os.path.expanduser(local)):
        raise ValueError("not a folder (a store is a folder, or a bucket)")
    if "://" in url and parts.scheme not in STORE_SCHEMES:
        raise ValueError(f"not a store pgkd writes to (expected file:///PATH, s3://BUCKET[/PREFIX], gs://BUCKET[/PREFIX] "
                         "or a folder's path)")
    if parts.scheme and parts.scheme != "file" and "://" in url and not parts.netloc:
        raise ValueError(f"no bucket (expected {parts.scheme}://BUCKET[/PREFIX])")


# -- serving ---------------------------------------------------------------------------------------------
class ServingSettings(Section):
    """The deployer's (and the student server's) settings."""
    repository: str | None = var("PGKD_SERVING_REPOSITORY", None,
                                 "the model repository the student server reads (the deployer's; required there)")
    url: str = var("PGKD_SERVING_URL", "127.0.0.1:8000", "the student server's HTTP HOST:PORT")
    model: str = var("PGKD_SERVING_MODEL", "student", "the served model's name")
    format: Literal[SERVING_FORMATS] = var("PGKD_SERVING_FORMAT", "onnx",  # type: ignore[valid-type]
                                           f"the served student's format: {', '.join(SERVING_FORMATS)}")
    int8: bool = var("PGKD_SERVING_INT8", False, "0 or 1: serve the ONNX student quantized to int8")
    gpu: bool = var("PGKD_SERVING_GPU", False, "0 or 1: a GPU instance in the config.pbtxt the deployer writes")
    replica: str | None = var("PGKD_SERVING_REPLICA", None,
                              "this server's name in the deployer's consumer group (default: the host name)")
    threads: int = var("PGKD_SERVING_THREADS", 0,
                       "threads of the student's runtime in the server (0: every core); read by the Triton "
                       "model, which imports nothing of pgkd", ge=0)

    @field_validator("int8", "gpu", mode="before")
    @classmethod
    def _flag(cls, value):
        if isinstance(value, str):
            if value not in ("0", "1"):
                raise ValueError("0 or 1")
            return value == "1"
        return value

    @field_validator("model")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked(check_name, value, "name")

    @field_validator("url")
    @classmethod
    def _address(cls, url: str) -> str:
        address = url.removeprefix("http://").rstrip("/")
        if "/" in address:
            raise ValueError("expected HOST:PORT (the server's HTTP endpoint)")
        _checked(parse_address, address, "address")
        return url

    def replica_name(self) -> str:
        return self.replica or socket.gethostname()


class TeacherSettings(Section):
    model: str | None = var("PGKD_TEACHER_MODEL", None,
                            "the Triton teacher's Hugging Face model id or folder, over its config.pbtxt's "
                            "(read by deploy/triton's model.py)")


# -- the stream ------------------------------------------------------------------------------------------
class StreamFields(Variables, BaseModel):
    """PGKD_STREAM_*: how ingest treats a stream. A plain model (constructing it reads no environment):
    pgkd.stream.StreamSettings is one, with the check of `run` against the run options, the settings
    file and RELOADABLE; StreamVariables is the section `read` takes from the environment."""
    model_config = ConfigDict(populate_by_name=True)
    stream: str = var("PGKD_STREAM", "default", "the stream's name", pattern=NAME_PATTERN, max_length=40)
    base_run: str | None = var("PGKD_STREAM_BASE_RUN", None,
                               "the run whose data and best student the stream starts from", pattern=NAME_PATTERN)
    min_chars: int = var("PGKD_STREAM_MIN_CHARS", 1, "shorter texts are rejected", ge=1)
    max_chars: int = var("PGKD_STREAM_MAX_CHARS", 2000, "longer texts are rejected (oversized), not truncated", ge=1)
    new_labels: Literal["reject", "extend"] = var("PGKD_STREAM_NEW_LABELS", "reject",
                                                  "reject or extend: whether a new label grows the taxonomy")
    validation_percent: int = var("PGKD_STREAM_VALIDATION_PERCENT", 20,
                                  "percent of new samples kept for validation", ge=0, le=100)
    trigger_count: int = var("PGKD_STREAM_TRIGGER_COUNT", 500, "new samples that start a run", gt=0)
    drift_window: int = var("PGKD_STREAM_DRIFT_WINDOW", 200, "samples in a drift window", gt=0)
    drift_margin: float = var("PGKD_STREAM_DRIFT_MARGIN", 0.1,
                              "drift: the window's accuracy below the reference by more than this", ge=0, le=1)
    drift_reference_windows: int = var("PGKD_STREAM_DRIFT_REFERENCE_WINDOWS", 3,
                                       "the drift reference: the current student's accuracy on its first windows",
                                       gt=0)
    max_teacher_label_share: float = var("PGKD_STREAM_MAX_TEACHER_LABEL_SHARE", 0.5,
                                         "the largest share of a triggered run's training set that teacher labels "
                                         "(source teacher) may be; beyond it, the newest are kept", ge=0, le=1)
    run: dict = var("PGKD_STREAM_RUN", {}, "a JSON object: options of the runs the stream triggers, over the "
                    "base run's")
    serving_model: str = var("PGKD_STREAM_SERVING_MODEL", "student", "the served model the stream keeps current",
                             pattern=NAME_PATTERN)
    settings_file: str | None = var("PGKD_STREAM_SETTINGS_FILE", None,
                                    "a YAML or JSON file the reloadable settings may also come from")
    segment_samples: int = var("PGKD_STREAM_SEGMENT_SAMPLES", 10_000, "samples a segment file holds", gt=0)
    batch_max: int = var("PGKD_STREAM_BATCH_MAX", 500, "messages ingest takes in one batch, at most", gt=0)
    batch_seconds: float = var("PGKD_STREAM_BATCH_SECONDS", 0.2, "how long ingest waits to fill a batch", gt=0)

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_chars > self.max_chars:     # every text would be refused, one way or the other
            raise UserError(f"PGKD_STREAM_MIN_CHARS={self.min_chars} is above PGKD_STREAM_MAX_CHARS={self.max_chars}: "
                            "no text could be taken")
        return self

    @field_validator("run", mode="before")
    @classmethod
    def _json(cls, value):
        if isinstance(value, str):
            import json
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("not a JSON object") from None
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        return value


class StreamVariables(Section, StreamFields):
    """PGKD_STREAM_* as read from the environment."""


# -- the service process ---------------------------------------------------------------------------------
class ServiceSettings(Section):
    http_host: str = var("PGKD_HTTP_HOST", DEFAULT_HOST, "where a service's /metrics, /healthz and /readyz listen")
    metrics_port: int = var("PGKD_METRICS_PORT", 9100, "the port of /metrics, /healthz and /readyz")
    graceful_timeout: float = var("PGKD_GRACEFUL_TIMEOUT", 300.0,
                                  "on SIGTERM, seconds a service waits for the message in flight", ge=0, allow_inf_nan=False)
    prometheus_url: str | None = var("PGKD_PROMETHEUS_URL", None,
                                     "the Prometheus the evaluator's stop policy reads: http[s]://HOST[:PORT][/PATH]")
    prometheus_wait: float = var("PGKD_PROMETHEUS_WAIT", 30.0,
                                 "seconds the evaluator waits for Prometheus to scrape the current cycle", ge=0, allow_inf_nan=False)

    @field_validator("http_host", mode="before")
    @classmethod
    def _host(cls, value):
        return _checked(parse_host, value, "host") if isinstance(value, str) else value

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _port(cls, value):
        return _checked(parse_port, value, "port")

    @field_validator("prometheus_url")
    @classmethod
    def _prometheus(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("expected http://HOST:PORT")
            if "@" in parts.netloc:   # named without the value: it holds a password
                raise ValueError(UserError("PGKD_PROMETHEUS_URL: a user or password in the URL is not supported "
                                           "(it would be shown in logs and reports); give http://HOST:PORT"))
            _checked(parse_address, parts.netloc.rpartition("@")[2], "address",
                     443 if parts.scheme == "https" else 80)
        return url


# -- the Triton servers pgkd starts through PyTriton ----------------------------------------------------
class TritonSettings(Section):
    """`pgkd cascade serve` and `pgkd teacher serve` (PyTriton): tritonserver's own log."""
    log: str | None = var("PGKD_TRITON_LOG", None,
                          "pgkd cascade serve and pgkd teacher serve: the file their tritonserver writes its log to, "
                          "appended (/dev/stdout: the terminal); unset: a temporary file, removed at the stop and "
                          "kept (and named) when the server fails. (pgkd serve keeps its log in its own temporary "
                          "folder and shows its end when tritonserver fails.)")

    @field_validator("log")
    @classmethod
    def _a_file_in_a_folder(cls, value: str | None) -> str | None:
        """A file tritonserver can append to: not a folder, not a named pipe nobody reads (it would block
        its start), in a folder that takes new files (not /proc); the terminal's /dev/stdout, /dev/stderr."""
        if value is None or value in ("/dev/stdout", "/dev/stderr"):
            return value
        if (bad := control_character(value)) is not None:
            raise ValueError(f"holds a control character (U+{ord(bad):04X})")
        path = Path(value)
        try:
            if path.is_symlink():            # tritonserver would append wherever it leads
                raise ValueError("a link; name the file itself")
            if path.is_dir():
                raise ValueError("a folder, not a file")
            if path.exists() and not path.is_file():
                raise ValueError("not a regular file (a named pipe or a device would block or lose the log)")
            if not path.parent.is_dir():
                raise ValueError(f"no such folder {str(path.parent)!r}")
        except OSError as e:                 # a name too long for the file system
            raise ValueError(f"cannot be a file here ({e.strerror or e})") from None
        if not path.exists():
            from pgkd.files import require_writable
            try:
                require_writable(path.parent, "its folder")
            except UserError as e:
                raise ValueError(str(e)) from None
        return value


SECTIONS: dict[str, type[Section]] = {
    "broker": BrokerSettings, "kafka": KafkaSecuritySettings, "artifacts": ArtifactSettings,
    "serving": ServingSettings, "teacher": TeacherSettings, "stream": StreamVariables, "service": ServiceSettings,
    "triton": TritonSettings}
S = TypeVar("S", bound=Section)


def read(section: type[S], env: Mapping[str, str] | None = None) -> S:
    """One section from `env` (os.environ by default); UserError naming the variable otherwise."""
    env = os.environ if env is None else env
    variables = section.variables()
    values = {name: env[name] for name in variables if name in env and str(env[name]).strip() != ""}
    try:
        return section(**values)
    except ValidationError as e:
        def name(loc, value):
            variable = str(loc[0]) if loc else ""
            field = variables.get(variable)
            if field is None:          # a model validator: no one variable
                return section.__name__
            if section.model_fields[field].json_schema_extra.get("secret"):
                return variable        # a secret's value is never shown
            return f"{variable}={value!r}"
        raise invalid(e, name=name) from None


def one(section: type[Section], field: str, env: Mapping[str, str] | None = None):
    """One setting of a section, its variable alone read (another's bad value does not stop it)."""
    env = os.environ if env is None else env
    variable = section.variable(field)
    return getattr(read(section, {variable: env[variable]} if variable in env else {}), field)


def host_from_env(env: Mapping[str, str] | None = None) -> str:
    """The services' bind address: PGKD_HTTP_HOST, loopback by default (ServiceSettings)."""
    return one(ServiceSettings, "http_host", env)


class Settings(BaseModel):
    """Every section, read at once: `Settings.from_env(env)` (a secret shows as '**********')."""
    model_config = ConfigDict(frozen=True)
    broker: BrokerSettings
    kafka: KafkaSecuritySettings
    artifacts: ArtifactSettings
    serving: ServingSettings
    teacher: TeacherSettings
    stream: StreamVariables
    service: ServiceSettings
    triton: TritonSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        return cls(**{key: read(section, env) for key, section in SECTIONS.items()})


def described() -> list[dict]:
    """Every variable: its section, name, default and meaning (`pgkd settings`). A secret's default is none."""
    rows = []
    for key, section in SECTIONS.items():
        for field, info in section.model_fields.items():
            default = info.get_default(call_default_factory=True)
            if isinstance(default, bool):
                default = int(default)
            rows.append({"section": key, "variable": info.json_schema_extra["variable"],
                         "default": "" if default is None else (default if isinstance(default, (int, float))
                                                                else str(default) if default != {} else ""),
                         "secret": bool(info.json_schema_extra.get("secret")), "description": info.description})
    return rows


def known_variables() -> frozenset[str]:
    return frozenset(row["variable"] for row in described())


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The PGKD_* names in `env` that no setting reads (a misspelled one is ignored where it is set)."""
    known = known_variables()
    return sorted(name for name in env if name.startswith("PGKD_") and name not in known)


def _closest(name: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, sorted(known_variables()), n=1, cutoff=0.8)
    return f" (did you mean {close[0]}?)" if close else ""


# -- `pgkd settings` -------------------------------------------------------------------------------------
def add_command(sub) -> None:
    """`pgkd settings` in the command's subparsers."""
    command = sub.add_parser("settings", help="every PGKD_* environment variable: its default and meaning")
    command.add_argument("--json", action="store_true", help="as a JSON list of {section, variable, default, "
                                                             "secret, description}")
    command.add_argument("--check", action="store_true", help="also read this environment's variables, each on "
                         "its own (a bad one is one line, exit 2; no value is printed); combinations (TLS with "
                         "SASL, the stream's run options) are checked by the service that reads them")
    command.set_defaults(func=cmd_settings)


def cmd_settings(args) -> int:
    import json
    import sys
    if args.check:     # every section read on its own, so that every bad variable is said, not the first only
        errors = []
        for section in SECTIONS.values():
            try:
                read(section)
            except UserError as e:
                errors.append(str(e))
        for name in unknown_variables(os.environ):   # said, not refused: an API key's variable may be named so
            print(f"pgkd: note: {name} is not a variable pgkd reads{_closest(name)}", file=sys.stderr)
        if len(errors) > 1:      # a line a section; the last goes through the error boundary as one alone would
            for error in errors[:-1]:
                print(f"pgkd: error: {error}", file=sys.stderr)
        if errors:
            raise UserError(errors[-1])
    rows = described()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(row["variable"]) for row in rows)
    shown = [str(row["default"]) for row in rows]
    default_width = min(max(len(d) for d in shown), 28)
    section = None
    for row, default in zip(rows, shown):
        if row["section"] != section:
            section = row["section"]
            print(f"{'' if section == rows[0]['section'] else chr(10)}# {section}")
        meaning = row["description"] + (" (a secret: never shown)" if row["secret"] else "")
        print(f"{row['variable']:<{width}}  {default or '-':<{default_width}}  {meaning}")
    sys.stdout.flush()
    return 0
