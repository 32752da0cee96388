"""Serving the distilled student: a Triton model repository of versioned students (repository.py,
the graphs in graph.py, the Python-backend model in triton_model.py), the server here (server.py,
over the bundled tritonserver in tritonserver.py), the client (client.py), and a new version into
a running server without a restart (deploy.py).

    pgkd.export("runs/demo/best", "models")              # models/student/1/: ONNX, tokenizer, manifest
    pgkd.classify("http://127.0.0.1:8000", ["where is my card?"])
"""
from __future__ import annotations

from pathlib import Path

from pgkd.serving.client import StudentClient, classify


def student_from(model: str | Path, artifacts: str | None = None, device: str = "cpu"):
    """(student, where it came from) for a student folder, or a checkpoint's URI in the artifact store
    (what `pgkd submit --wait` prints) or its key there (an `ArtifactRef.uri`); UserError for anything else."""
    from pgkd.artifacts import ArtifactError, ArtifactRef, ArtifactStore, sha256_of
    from pgkd.distributed.steps import load_checkpoint
    from pgkd.errors import UserError
    from pgkd.students import load_student
    if Path(model).is_dir():
        return load_student(model, device=device), {"folder": str(Path(model).resolve())}
    from pgkd.names import is_relative
    store = ArtifactStore(artifacts) if "://" in str(model) or is_relative(str(model)) else None
    if store is None or ("://" not in str(model) and not store.exists(str(model))):
        raise UserError(f"{model}: not a folder, nor a checkpoint URI of the artifact store")
    try:
        data = store.get_bytes(store.key_of(str(model)))
        ref = ArtifactRef(uri=str(model), sha256=sha256_of(data), size=len(data))
        return load_checkpoint(store, ref, device), {"checkpoint": str(model), "sha256": ref.sha256}
    except ArtifactError as e:
        raise UserError(str(e)) from None


def export(model, repository, fmt: str = "onnx", int8: bool = False, name: str = "student"):
    """A student (a folder, a checkpoint URI, or a loaded student) as the next version of `name` in the
    Triton model repository `repository`; returns the Version written (number, path, manifest)."""
    from pgkd.serving.repository import write_version
    if not isinstance(int8, bool):   # int8="no" is truthy: it would quietly write an int8 version
        raise TypeError(f"pgkd.export: int8 is True or False, got {int8!r}")
    if isinstance(model, (str, Path)):
        student, source = student_from(model)
    elif not hasattr(model, "labels"):   # before any folder is made: the export would fail half-way
        raise TypeError(f"pgkd.export: expected a student folder, a checkpoint URI or a loaded student "
                        f"(pgkd.load_student), got {type(model).__name__}")
    else:
        student, source = model, {"object": type(model).__qualname__}
    return write_version(Path(repository), student, source, model=name, fmt=fmt, int8=int8)


__all__ = ["StudentClient", "classify", "export", "student_from"]
