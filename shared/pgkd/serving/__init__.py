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


def export(model, repository, fmt: str = "onnx", int8: bool = False, name: str = "student"):
    """A student (a folder, or a loaded student) as the next version of `name` in the Triton model
    repository `repository`; returns the Version written (number, path, manifest)."""
    from pgkd.serving.repository import write_version
    from pgkd.students import load_student
    if isinstance(model, (str, Path)):
        source, student = {"folder": str(Path(model).resolve())}, load_student(model, device="cpu")
    else:
        source, student = {"object": type(model).__qualname__}, model
    return write_version(Path(repository), student, source, model=name, fmt=fmt, int8=int8)


__all__ = ["StudentClient", "classify", "export"]
