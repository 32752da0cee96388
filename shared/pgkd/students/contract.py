"""The student contract: what the loop asks of a student, ours or a user's.

A student is anything with these methods; `pgkd.distill(..., student=obj)` takes such an object as
it is. `device` and `parameter_count()` are optional (they are recorded in the report)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pgkd.data import Sample
from pgkd.errors import UserError

# The tokens of a text a student reads: pgkd cuts every text to this many at call time, and a saved
# student's tokenizer says so (`model_max_length` in tokenizer_config.json), so that plain transformers
# reads the same tokens of a long text as pgkd does.
MAX_LENGTH = 128

# The longest text a student reads, in characters: a text is cut to this before it is tokenized (a
# 50 MB text would otherwise be tokenized whole for the MAX_LENGTH tokens that are used). A token takes
# at least a character, so the cut never changes the first MAX_LENGTH tokens. The served model
# refuses longer texts (pgkd.serving.repository).
MAX_TEXT_CHARS = 10_000


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 4e-4
    head_learning_rate: float = 4e-3   # the classification head starts from random weights
    freeze_word_embeddings: bool = True  # a third of MiniLM's weights; few labels do not need them moved
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = MAX_LENGTH
    patience: int = 2          # epochs without a lower validation loss before the round stops
    label_smoothing: float = 0.0
    head_init: str = "linear-probe"   # a new head: fitted as a logistic regression first, or "random"
    seed: int = 0


@dataclass
class TrainResult:
    epochs_run: int = 0
    best_epoch: int = 0
    train_loss: float = float("nan")
    validation_loss: float = float("nan")
    samples: int = 0
    seconds: float = 0.0
    samples_per_second: float = 0.0
    validation_losses: list[float] = field(default_factory=list)


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
    that UTF-8 cannot encode is a UserError naming it."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"expected a list of texts, got a {type(texts).__name__}: pass [text] for one text")
    texts = list(texts)
    for number, text in enumerate(texts, start=1):
        try:
            text.encode("utf-8")     # a lone surrogate ("caf\udce9"): no tokenizer takes it
        except UnicodeEncodeError as e:
            raise UserError(f"text {number}: not UTF-8 text ({e.reason} at character {e.start})") from None
        except AttributeError:
            pass                     # not a str: the caller says what it takes
    return texts


def predicted_labels(student, texts: list[str]) -> list[str]:
    """The label a student gives each text."""
    return [student.labels[i] for i in np.asarray(student.predict_proba(text_list(texts))).argmax(axis=1)]
