"""The students: the contract (contract.py), the fine-tuned Hugging Face student (finetuned.py), the
frozen-encoder one (frozen.py) and its sentence encoder (encoder.py); which one a name or a folder means."""
from __future__ import annotations

from pathlib import Path

from pgkd.students.frozen import MARKER, SPEC, EmbeddingCache, FrozenEncoderStudent
from pgkd.students.finetuned import FineTunedStudent


def create_student(spec: str, labels: list[str], seed: int = 0, device: str | None = None,
                   embed: EmbeddingCache | None = None):
    if spec == SPEC:
        return FrozenEncoderStudent(labels, embed=embed, seed=seed)
    return FineTunedStudent.create(spec, labels, seed=seed, device=device)


def load_student(path: str | Path, device: str | None = None):
    if (Path(path) / MARKER).is_file():
        return FrozenEncoderStudent.load(path)
    return FineTunedStudent.load(path, device=device)
