"""The students: the contract (contract.py), the fine-tuned Hugging Face student (finetuned.py), the
frozen-encoder one (frozen.py, on the sentence encoder of pgkd.encoder); which one a name or a folder means.

The student classes load on first use (torch and transformers take seconds to import), so that a
module needing only the contract, and a command that trains nothing, start quickly."""
from __future__ import annotations

from pathlib import Path

from pgkd.errors import UserError
from pgkd.students.contract import MARKER, SPEC

_LAZY = {"FineTunedStudent": "pgkd.students.finetuned", "FrozenEncoderStudent": "pgkd.students.frozen"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pgkd.students' has no attribute {name!r}")


def create_student(spec: str, labels: list[str], seed: int = 0, device: str | None = None, embed=None):
    if spec == SPEC:
        from pgkd.encoder import pick_device
        from pgkd.students.frozen import FrozenEncoderStudent
        pick_device(device)    # refused as for the others (its encoder is the loop's, on the loop's device)
        return FrozenEncoderStudent(labels, embed=embed, seed=seed)
    from pgkd.students.finetuned import FineTunedStudent
    return FineTunedStudent.create(spec, labels, seed=seed, device=device)


def load_student(path: str | Path, device: str | None = None):
    if not Path(path).is_dir():
        raise UserError(f"{path}: {'no such folder' if not Path(path).exists() else 'not a folder'}: expected a "
                        "saved student's folder (a run's best/)")
    if (Path(path) / MARKER).is_file():
        from pgkd.students.frozen import FrozenEncoderStudent
        return FrozenEncoderStudent.load(path)
    from pgkd.students.finetuned import FineTunedStudent
    return FineTunedStudent.load(path, device=device)
