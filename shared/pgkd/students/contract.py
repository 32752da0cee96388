"""The student contract: what the loop asks of a student, ours or a user's.

A student is anything with these methods; `pgkd.distill(..., student=obj)` takes such an object as
it is. `device` and `parameter_count()` are optional (they are recorded in the report)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import ValidationError

from pgkd.calibration import FILE as CALIBRATION_FILE, Calibration, scaled
from pgkd.errors import UserError, dotted, invalid
from pgkd.types import Sample, TrainConfig, TrainResult

SPEC = "minilm-frozen"                 # the frozen-encoder student's name
MARKER = "pgkd_frozen_student.json"    # the file that marks a saved frozen-encoder student
NAMED = ("minilm", "minilm-cls", SPEC, "tiny")   # the students known by name; else a folder or a cached id


def unknown_student(spec: str, why: str = "") -> UserError:
    return UserError(f"unknown student {spec!r}: not {', '.join(repr(n) for n in NAMED)}, a model folder, or a "
                     f"Hugging Face id in the local cache{why}")


def check_student(spec: str) -> None:
    """That `spec` names a student this machine can make, without loading it: a name pgkd knows, a folder,
    or a Hugging Face id whose config is in the local cache (pgkd never downloads one). Whether a folder
    holds a model is found when it is loaded."""
    if spec in NAMED or (spec.strip() and Path(spec).is_dir()):    # "" would be the current folder
        return
    from huggingface_hub import try_to_load_from_cache
    try:
        cached = try_to_load_from_cache(spec, "config.json")
    except ValueError:         # not a repository id at all (spaces, two slashes, ...)
        cached = None
    if not isinstance(cached, str):
        raise unknown_student(spec)


@runtime_checkable
class Student(Protocol):
    labels: list[str]

    def train(self, train: list[Sample], validation: list[Sample], config: TrainConfig, progress: bool = True,
              description: str = "train") -> TrainResult | None:
        """Fit on `train` (`validation` is there for early stopping); the round's figures, if it has them."""

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """One row per text, one column per label (in `labels` order), rows summing to 1."""

    def state(self) -> Any:
        """A copy of what was learned, that later training does not change (the best cycle's is kept)."""

    def load_state(self, state: Any) -> None: ...

    def save(self, path: str | Path) -> None: ...


def text_list(texts) -> list[str]:
    """`texts` as a list. A lone str is refused: iterated, it would be one text per character; a text
    that is not a str is a TypeError, one that UTF-8 cannot encode a UserError, each naming it."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"expected a list of texts, got a {type(texts).__name__}: pass [text] for one text")
    texts = list(texts)
    for number, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")     # a lone surrogate ("caf\udce9"): no tokenizer takes it
        except UnicodeEncodeError as e:
            raise UserError(f"text {number}: not UTF-8 text ({e.reason} at character {e.start})") from None
        except AttributeError:
            raise TypeError(f"text {number}: not a string ({type(text).__name__})") from None
    return texts


def predicted_labels(student, texts: list[str]) -> list[str]:
    """The label a student gives each text."""
    return [student.labels[i] for i in np.asarray(student.predict_proba(text_list(texts))).argmax(axis=1)]


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of the true classes' probabilities."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))))


# -- saving -------------------------------------------------------------------------------------------------
def save_folder(path: str | Path, write) -> None:
    """A student's `save(path)`: `write(folder)` fills a new folder beside `path`, which then becomes
    `path` at once (a reader never sees half a student). `path` must be new or an empty folder: pgkd
    never writes over or beside files it did not write, nor through a link (UserError, nothing touched)."""
    import shutil
    import tempfile
    from pgkd.files import current_umask, output_path_problem, require_writable
    if not isinstance(path, (str, Path)):
        raise TypeError(f"save: expected a folder's path (str or Path), got {type(path).__name__}")
    if not str(path):
        raise UserError("save: an empty path; name a new or empty folder")
    path = Path(path)
    if path.name in ("", ".", ".."):      # '.', './', 'a/..': the folder is named by its own name
        raise UserError(f"save {path}: name the folder itself (a new one, or an empty one), not '.' or '..'")
    if (problem := output_path_problem(path)) is not None:
        raise UserError(f"save {path}: {problem}")
    if path.exists():
        if not path.is_dir():
            raise UserError(f"save {path}: exists and is not a folder")
        if any(path.iterdir()):
            raise UserError(f"save {path}: not empty; a student is saved into a new or empty folder")
    require_writable(path.parent, f"save {path}:")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        write(staging)
        # as a plain mkdir and open() would make them (mkdtemp's folder is 0700; safetensors writes its
        # weights 0600): a server running as another user reads the student it is given
        umask = current_umask()
        for item in (staging, *staging.rglob("*")):
            if not item.is_symlink():
                item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
        if path.exists():
            path.rmdir()             # empty, as checked (a file put there since: OSError, nothing lost)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# -- calibration, kept with the student (pgkd.calibration) ------------------------------------------------
def calibrated(student, probs: np.ndarray) -> np.ndarray:
    """`probs` scaled by the student's calibration, if it has one."""
    calibration = getattr(student, "calibration", None)
    return probs if calibration is None else scaled(probs, calibration.temperature)


def calibration_files(student) -> dict[str, bytes]:
    """The file a saved student keeps its calibration in, when it has one."""
    calibration = getattr(student, "calibration", None)
    return {} if calibration is None else {CALIBRATION_FILE: (calibration.model_dump_json(indent=2) + "\n").encode()}


def read_calibration(folder: str | Path, labels: list[str]) -> Calibration | None:
    """A saved student's calibration, None when it has none; a damaged file, or one of another student
    (other labels), is a UserError."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        calibration = Calibration.model_validate_json(path.read_bytes())
    except ValidationError as e:     # which field, and what is wrong with it (the first two problems)
        raise UserError(f"{path}: not a readable calibration ({invalid(e, dotted('the file'), limit=2)})") from None
    if calibration.labels != list(labels):
        raise UserError(f"{path}: the calibration of another student (its labels are not this student's "
                        f"{len(labels)})")
    return calibration
