"""A new student into a running server without a restart: written as the next version of the model
repository, then loaded with Triton's repository API. Triton swaps versions only once the new one
is ready (requests go on being answered by the old one meanwhile); a version that fails to load
leaves the old one serving and is moved to `rejected/`, with the server's reason."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pgkd.serving.client import ServerUnreachable, ServingError, load_model, served_version
from pgkd.serving.repository import MODEL_NAME, Version, model_folder, reject_version, versions, write_version

KEEP_VERSIONS = 3   # version folders kept on disk (only the newest serves): a few to roll back to by hand


class DeployFailed(RuntimeError):
    """The new version did not replace the served one; the message says why."""


def _load(http_address: str, model: str, wait_s: float) -> None:
    """The load request, repeated while nothing answers (a server still starting) for `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return load_model(http_address, model)
        except ServerUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def activate(repository: Path, version: Version, http_address: str, model: str = MODEL_NAME,
             wait_s: float = 120.0) -> None:
    """Have the server at `http_address` serve `version`, or reject it (DeployFailed). A server that
    does not answer for `wait_s` seconds is no verdict on the version: it stays in the repository
    (the newest, so the server loads it when it starts) and DeployFailed says so."""
    try:
        _load(http_address, model, wait_s)
        serving = served_version(http_address, model)
        if serving != str(version.number):
            raise ServingError(f"the server serves version {serving}, not {version.number}")
    except ServerUnreachable as e:
        raise DeployFailed(f"version {version.number} written, not loaded: the server does not answer ({e}); "
                           "it serves that version when it starts") from None
    except ServingError as e:
        reject_version(repository, version.number, model)
        reason = str(e).split("\n\nAt:")[0].strip()   # the Python backend appends its traceback
        raise DeployFailed(f"version {version.number} rejected (moved to {model}/rejected/{version.number}); "
                           f"version {served_version(http_address, model)} goes on serving: {reason}") from None
    for old in versions(repository, model)[:-KEEP_VERSIONS]:
        shutil.rmtree(model_folder(repository, model) / str(old), ignore_errors=True)


def deploy(repository: Path, student, http_address: str, source: dict, model: str = MODEL_NAME,
           fmt: str = "onnx", int8: bool = False, gpu: bool = False) -> Version:
    """`student` as the next version of `model`, serving once this returns."""
    version = write_version(repository, student, source, model=model, fmt=fmt, int8=int8, gpu=gpu)
    activate(repository, version, http_address, model)
    return version


def served_manifest(repository: Path, model: str = MODEL_NAME) -> dict | None:
    """The manifest of the version on disk that a server serves (the newest), if any."""
    import json
    numbers = versions(repository, model)
    if not numbers:
        return None
    path = model_folder(repository, model) / str(numbers[-1]) / "pgkd-version.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def deploy_promotion(store, promoted, repository: Path, http_address: str, fmt: str = "onnx",
                     int8: bool = False, gpu: bool = False) -> Version | None:
    """A StudentPromoted into the server: None when the served version is that promotion or a later
    one (a redelivered or an older message); DeployFailed, or the store's ArtifactError for a
    checkpoint that cannot be read or does not match its sha256, leave the served version as it is."""
    from pgkd.distributed.steps import load_checkpoint
    served = served_manifest(repository, promoted.model)
    source = (served or {}).get("source", {})
    if source.get("promoted_at", float("-inf")) >= promoted.promoted_at:
        return None
    student = load_checkpoint(store, promoted.checkpoint, "cpu")
    return deploy(repository, student, http_address, model=promoted.model, fmt=fmt, int8=int8, gpu=gpu, source={
        "run_id": promoted.run_id, "cycle": promoted.cycle, "checkpoint": promoted.checkpoint.uri,
        "sha256": promoted.checkpoint.sha256, "scores": promoted.scores, "decision": promoted.decision,
        "promoted_at": promoted.promoted_at, "source": promoted.source, "stream": promoted.stream})
