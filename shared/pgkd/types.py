"""The value types the packages pass each other: samples, the validation report, mined samples, the
teacher's generation request, batch and usage, a student's training config and result.

A leaf: it imports nothing of pgkd, so data, students, teachers, the loop and the distributed steps
can all share these types without importing each other (the layers contract in pyproject.toml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, Field

# The tokens of a text a student reads: pgkd cuts every text to this many at call time, and a saved
# student's tokenizer says so (`model_max_length` in tokenizer_config.json), so that plain transformers
# reads the same tokens of a long text as pgkd does.
MAX_LENGTH = 128

# The longest text a student reads, in characters: a text is cut to this before it is tokenized (a
# 50 MB text would otherwise be tokenized whole for the MAX_LENGTH tokens that are used). A token takes
# at least a character, so the cut never changes the first MAX_LENGTH tokens. The served model
# refuses longer texts (pgkd.serving.repository).
MAX_TEXT_CHARS = 10_000

# The metrics a stop policy or a benchmark can name.
METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "loss")

# The constrained numbers more than one command takes (pgkd distill's, pgkd teacher serve's): a seed
# numpy and torch both accept, and a share of something.
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Share = Annotated[float, Field(ge=0, le=1)]


class Sample(BaseModel, frozen=True):
    text: str
    label: str


# --- the validation report (pgkd.loop.evaluation computes it) ---

class ClassScores(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class Confusion(BaseModel):
    true: str
    predicted: str
    count: int


class EvalReport(BaseModel):
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    loss: float
    samples: int
    per_class: dict[str, ClassScores]
    confusions: list[Confusion]

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def headline(self) -> dict[str, float]:
        return {name: self.metric(name) for name in METRICS}


# --- the student's mistakes (pgkd.loop.mining mines them) ---

class MinedSample(BaseModel):
    text: str
    label: str          # the true label
    predicted: str
    confidence: float   # the student's probability for `predicted`


class MiningResult(BaseModel):
    hard_negatives: list[MinedSample]
    misclassified: list[MinedSample]
    correct: list[MinedSample]


# --- the teacher contract's values (pgkd.teachers.contract holds the protocol) ---

class GenerationRequest(BaseModel):
    """What a teacher is asked for. LLM teachers render it into the PGKD prompt
    (pgkd.teachers.prompt.render_prompt); simulated teachers read its fields directly."""
    taxonomy: list[str]
    examples: list[Sample]
    report: EvalReport | None          # None: the teacher is not shown the validation report
    hard_negatives: list[MinedSample]
    misclassified: list[MinedSample]
    correct: list[MinedSample]
    n: int = Field(gt=0)
    cycle: int = 0
    descriptions: dict[str, str] = {}  # label -> what it means (a taxonomy file), shown beside each class
    report_min_support: int = 1        # the report leaves out classes scored on fewer samples (too few to judge)


class ClassificationRequest(BaseModel):
    """Texts for a teacher to label into the taxonomy (pgkd.teachers.prompt.render_classification)."""
    taxonomy: list[str]
    texts: list[str] = Field(min_length=1)
    descriptions: dict[str, str] = {}
    examples: list[Sample] = []


class TeacherUsage(BaseModel):
    """What asking the teacher cost. `seconds` is the sum of the calls' round-trip times."""
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost: float = 0.0                  # from the configured prices per 1k tokens
    retries: int = 0
    cache_hits: int = 0                # answers read from the response cache instead of the teacher
    errors: dict[str, int] = {}        # failed calls by kind (timeout, transport, server_error, ...)
    call_seconds: list[float] = []     # the round trip of each answered call
    trimmed: list[dict[str, int]] = []  # per prompt sent: what was left out to fit the token limit ({}: nothing)

    def __add__(self, other: "TeacherUsage") -> "TeacherUsage":
        errors = dict(self.errors)
        for kind, count in other.errors.items():
            errors[kind] = errors.get(kind, 0) + count
        return TeacherUsage(calls=self.calls + other.calls, prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                            completion_tokens=self.completion_tokens + other.completion_tokens,
                            seconds=self.seconds + other.seconds, cost=self.cost + other.cost,
                            retries=self.retries + other.retries, cache_hits=self.cache_hits + other.cache_hits,
                            errors=errors, call_seconds=self.call_seconds + other.call_seconds,
                            trimmed=self.trimmed + other.trimmed)


class GeneratedBatch(BaseModel):
    samples: list[Sample]
    teacher: str
    usage: TeacherUsage = TeacherUsage()
    rejected: dict[str, int] = {}      # answers or list items dropped before screening, by reason


class TeacherUnavailable(RuntimeError):
    """The teacher cannot be reached (its calls keep failing): the cycle cannot get samples.
    `refused`: it answered and refused (a key, a model it does not serve): the input's fault, not the
    environment's."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


# --- the student contract's values (pgkd.students.contract holds the protocol) ---

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
