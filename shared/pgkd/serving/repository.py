"""A Triton model repository of students: `REPO/student/config.pbtxt` and one folder per version
(`1/`, `2/`, ...), each complete in itself (model.py, the weights, tokenizer.json, pgkd-version.json).

A version is written in a staging folder and renamed into place, its manifest (the sha256 of every
file) written last, so a server never sees half a version; a version without a manifest, or whose
files do not match it, is refused by `check_repository` and fails to load in Triton (model.py checks
it too). A version that failed to load is moved to `rejected/` and its number is never reused.

A model folder is pgkd's by its `.pgkd-model.json`, written with its first version: pgkd writes into a
model folder only when it is new, empty or holds that file, so a model of someone else's that happens
to share the name is never touched. The model's name is a name (pgkd.names): `..` or `a/b` is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pgkd.students.contract import calibration_files
from pgkd.errors import Option, UserError
from pgkd.names import check_name, inside
from pgkd.ownership import read_owner, write_owner
from pgkd.files import file_sha256, output_path_problem, require_writable, write_text_atomic
from pgkd.serving.triton_model import MANIFEST, check_version_folder
from pgkd.types import MAX_LENGTH, MAX_TEXT_CHARS   # the served model refuses longer texts

MODEL_NAME = "student"
OWNER = ".pgkd-model.json"    # in a model folder: pgkd wrote it, and may write its next version
FORMATS = ("onnx", "torch")
HANDLER = Path(__file__).with_name("triton_model.py")
MAX_BATCH_SIZE = 64
# How long Triton holds a request that finds the model idle, for others to batch with it (dynamic batching).
# Chosen by measurement (BENCHMARKS.md, "The batching delay"; `pgkd bench serve --batching-delays`): 2000 us
# cost a lone request 2 ms of waiting, and 500 us or none changed the throughput at 16 clients by less than
# the spread between rounds; of the two, 500 us kept the 16-client median closest to 2000 us's.
MAX_QUEUE_DELAY_US = 500

CONFIG = """\
# A distilled pgkd student (written by `pgkd export`): one Python-backend model that tokenizes and runs
# the student (ONNX Runtime or TorchScript, per version: see N/pgkd-version.json). Text in, label out.
#   text           BYTES [1]   ->   label BYTES [1], probability FP32 [1], probabilities FP32 [-1]
# The label map is labels.txt (Triton's classification extension: request `class_count` for the top k).
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}

input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "label" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "probability" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "probabilities" data_type: TYPE_FP32 dims: [ -1 ] label_filename: "labels.txt" }}
]

# Requests waiting while the model runs are run together as the next batch; a request that finds the
# model idle waits up to max_queue_delay_microseconds for others to join it.
dynamic_batching {{
  preferred_batch_size: [ {max_batch_size} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}

# KIND_AUTO: an instance per GPU when Triton sees GPUs (ONNX Runtime's CUDA provider, or torch on CUDA), one on
# the CPU otherwise; `pgkd export --gpu` writes KIND_GPU, which fails to load where there is no GPU.
instance_group [
  {{ count: 1 kind: {kind} }}
]

# Only the newest version serves; loading version N+1 (Triton's load API, which `pgkd serve` and the
# deployer call) swaps it in without a restart, and a version that fails to load leaves N serving.
version_policy: {{ latest: {{ num_versions: 1 }} }}

parameters [
  {{ key: "max_text_chars" value: {{ string_value: "{max_text_chars}" }} }},
  {{ key: "inference_batch_size" value: {{ string_value: "{max_batch_size}" }} }}
]
"""


@dataclass(frozen=True)
class Version:
    number: int
    path: Path
    manifest: dict


def model_folder(repository: Path, model: str = MODEL_NAME) -> Path:
    """`repository/model`, the model's name checked (pgkd.names) and the folder inside the repository."""
    return inside(repository, check_name(model, "model name"), what="model name")


def _numbers(folder: Path, under: str = "") -> list[int]:
    base = folder / under if under else folder
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()) if base.is_dir() else []


def versions(repository: Path, model: str = MODEL_NAME) -> list[int]:
    return _numbers(model_folder(repository, model))


def is_repository(path: Path) -> bool:
    """A folder holding at least one model folder with a config.pbtxt."""
    return Path(path).is_dir() and any(Path(path).glob("*/config.pbtxt"))


def require_own_folder(path: Path, option: str, model: str = MODEL_NAME, writes: bool = True) -> None:
    """`model` may be written into the repository `path`: the repository is new, empty or a model
    repository, and the model's folder in it is new, empty or pgkd's (its OWNER file); UserError otherwise.
    `writes=False`: a repository a command only reads (`pgkd serve --model`), which may be a link."""
    path = Path(path)
    if writes and (problem := output_path_problem(path)) is not None:
        raise UserError(f"{option} {path}: {problem}")
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: exists and is not a folder")
    above = next((p for p in path.parents if p.exists()), None)   # a folder under a file cannot be made
    if not path.exists() and above is not None and not above.is_dir():
        raise UserError(f"{option} {path}: {above} is a file, not a folder")
    # A model repository holds model folders only (each with its config.pbtxt): a folder that merely
    # has one among other things (a home, a project) is not one.
    others = [p for p in path.iterdir() if p.name != model and not (p.is_dir() and (p / "config.pbtxt").is_file())] \
        if path.exists() else []
    if others:
        raise UserError(f"{option} {path}: neither new, empty, nor a model repository ({others[0].name} is not a "
                        "model folder; pgkd writes only into repositories)")
    folder = model_folder(path, model)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not _owned(folder))):
        raise UserError(f"{option} {path}: {folder} was not written by pgkd (no {OWNER}); pgkd writes only "
                        "model folders of its own: choose another model name or repository")
    require_writable(path, option)     # /proc/x, a read-only mount: said now, not after the export's work


def _owned(folder: Path) -> bool:
    return read_owner(folder / OWNER) is not None


def check_repository(repository: Path, model: str = MODEL_NAME) -> Version:
    """The version a server would load (the newest), checked; UserError when there is none or it is
    half-written or damaged."""
    folder = model_folder(repository, model)
    if not (folder / "config.pbtxt").is_file():
        raise UserError(f"{repository}: not a model repository of {model!r} (no {model}/config.pbtxt)")
    numbers = versions(repository, model)
    if not numbers:
        raise UserError(f"{folder}: no version folder (1/, 2/, ...)")
    path = folder / str(numbers[-1])
    try:
        version = Version(numbers[-1], path, check_version_folder(path))
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{e}; remove it or export again") from None
    # The model's own files, which Triton would refuse with a page of its log: the label map of the newest
    # version (pgkd export writes it with each), and a configuration Triton can read (a user may tune it).
    labels = folder / "labels.txt"
    try:
        written = labels.read_bytes().decode("utf-8").removesuffix("\n").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{labels}: cannot read it ({getattr(e, 'strerror', None) or e}); export again") from None
    if any(line != line.rstrip("\r") for line in written):   # Triton reads a label up to "\n": "\r" stays in it
        raise UserError(f"{labels}: Windows line endings (\\r\\n); export again")
    if written != version.manifest["labels"]:
        raise UserError(f"{labels}: not the label map of version {version.number} ({len(written)} lines for its "
                        f"{len(version.manifest['labels'])} labels); export again")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    try:
        text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'config.pbtxt'}: not a Triton model configuration ({e})") from None
    return version


def config_text(model: str = MODEL_NAME, gpu: bool = False, max_queue_delay_us: int = MAX_QUEUE_DELAY_US) -> str:
    """The config.pbtxt of `model` (`max_queue_delay_us`: another batching delay, for `pgkd bench serve`)."""
    return CONFIG.format(name=model, max_batch_size=MAX_BATCH_SIZE, kind="KIND_GPU" if gpu else "KIND_AUTO",
                         max_text_chars=MAX_TEXT_CHARS, max_queue_delay_us=int(max_queue_delay_us))


def write_config(repository: Path, labels: list[str], model: str = MODEL_NAME, gpu: bool = False) -> None:
    """config.pbtxt (kept when there is one: a user may have tuned it) and labels.txt (the label map
    of the version being written: a taxonomy may grow between versions)."""
    folder = model_folder(repository, model)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.pbtxt").is_file():
        write_text_atomic(folder / "config.pbtxt", config_text(model, gpu))
    write_text_atomic(folder / "labels.txt", "".join(f"{label}\n" for label in labels))


def write_version(repository: Path, student, source: dict, model: str = MODEL_NAME, fmt: str = "onnx",
                  int8: bool = False, gpu: bool = False) -> Version:
    """The student as the next version of `model` in `repository` (created if needed). `source` says
    where the student came from (a folder, a run's checkpoint, a promotion): it goes in the manifest."""
    from pgkd.serving.graph import export_onnx, export_torchscript, quantize_int8, tokenizer_of
    if fmt not in FORMATS:
        raise UserError(Option("fmt", fmt), f": one of {', '.join(FORMATS)}")
    if int8 and fmt != "onnx":
        raise UserError(Option("int8", True), " needs ", Option("fmt", "onnx"), " (dynamic quantization is ONNX Runtime's)")
    require_own_folder(repository, "repository", model)
    folder = model_folder(repository, model)
    new_repository, new_folder = not Path(repository).exists(), not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if not _owned(folder):   # claimed before the first byte of a version goes in
        write_owner(folder / OWNER, model=model, note="pgkd writes versions of this model here")
    number = max(versions(repository, model) + _numbers(folder, "rejected") + [0]) + 1
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{number}-", dir=folder))
    staging.chmod(0o755)   # mkdtemp's 0700 would hide the version from a server running as another user
    try:
        # Scratch files go inside the staging folder, never to TMPDIR: a signal that lands anywhere in
        # here leaves one folder to remove, the one the `except` below removes.
        tokenizer, scratch = tokenizer_of(student), staging / ".scratch"
        tokenizer.save_pretrained(scratch)
        os.replace(scratch / "tokenizer.json", staging / "tokenizer.json")
        if fmt == "onnx":
            weights = staging / "model.onnx"
            if int8:
                quantize_int8(export_onnx(student, scratch / "fp32.onnx"), weights)
            else:
                export_onnx(student, weights)
        else:
            export_torchscript(student, staging / "model.pt")
        shutil.rmtree(scratch)
        shutil.copyfile(HANDLER, staging / "model.py")
        calibration = getattr(student, "calibration", None)   # pgkd.calibration: the model scales its logits by T
        for name, data in calibration_files(student).items():
            (staging / name).write_bytes(data)
        manifest = {"format": fmt, "precision": "int8" if int8 else "fp32", "labels": list(student.labels),
                    "temperature": 1.0 if calibration is None else calibration.temperature,
                    "threshold": None if calibration is None or calibration.deferral is None
                    else calibration.deferral.threshold,
                    "max_length": MAX_LENGTH, "pad_token_id": int(tokenizer.pad_token_id or 0),
                    "student": getattr(student, "spec", type(student).__name__), "source": source,
                    "written_at": time.time(),
                    "files": {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}}
        write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        write_config(repository, list(student.labels), model, gpu)
        path = folder / str(number)
        os.rename(staging, path)   # atomic: the version appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_folder:   # a first version that failed leaves no model folder behind
            shutil.rmtree(folder, ignore_errors=True)
        if new_repository:   # nor a repository it made
            shutil.rmtree(repository, ignore_errors=True)
        raise
    return Version(number, path, manifest)


def reject_version(repository: Path, number: int, model: str = MODEL_NAME) -> Path:
    """Move a version that failed to load out of Triton's sight, to `rejected/N` (kept to look at)."""
    folder = model_folder(repository, model)
    target = folder / "rejected" / str(number)
    target.parent.mkdir(exist_ok=True)
    os.rename(folder / str(number), target)
    remaining = versions(repository, model)
    if remaining:   # labels.txt back to the label map of the version that goes on serving
        labels = json.loads((folder / str(remaining[-1]) / MANIFEST).read_text(encoding="utf-8"))["labels"]
        write_text_atomic(folder / "labels.txt", "".join(f"{label}\n" for label in labels))
    return target
