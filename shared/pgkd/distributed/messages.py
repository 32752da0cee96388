"""The message contracts of the distributed loop: one pydantic model per message kind.

    RunRequested -> trainer -> ModelTrained -> evaluator -> CycleEvaluated -> miner -> NegativesMined
    -> generator -> SamplesGenerated -> trainer ... until the evaluator (or the generator, when the
    teacher has nothing left) publishes RunCompleted.

Messages are small: ids, artifact references (URI + sha256), metrics and samples, never model
weights. `cycle` is the cycle the message belongs to: cycle k mines the mistakes of student k-1,
asks the teacher, trains student k and evaluates it; cycle 0 trains on the labeled seed set.
Every message is keyed by (run_id, cycle, kind), which is what makes handlers idempotent.
Human-labeled samples come in on their own topic (LabeledSample), for the ingest service, which
starts runs of its own (pgkd.stream). A student to serve goes out as StudentPromoted (from the
stream's decision, or a run submitted with --promote), for the deployers beside the student servers.
A consumer rejects a `schema_version` it does not know (to the dead-letter topic), so a change
of a field's meaning must raise it.
"""
from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pgkd.distributed.artifacts import ArtifactRef
from pgkd.names import NAME_PATTERN
from pgkd.data import Sample
from pgkd.loop.evaluation import EvalReport
from pgkd.loop.mining import MiningResult
from pgkd.loop.report import Provenance, TrainingRound

SCHEMA_VERSION = 1


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str]
    topic: ClassVar[str]

    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str = Field(pattern=NAME_PATTERN)   # a name (pgkd.names): it becomes a folder of the store
    cycle: int = Field(ge=0)

    @property
    def key(self) -> str:
        return f"{self.run_id}/{self.kind}/{self.cycle}"


class RunRequested(Message):
    kind: ClassVar[str] = "run-requested"
    topic: ClassVar[str] = "run-requested"
    config: dict                      # a DistillConfig, whole
    dataset: ArtifactRef              # the source dataset as submitted (content-addressed)
    submitted_at: float = Field(default_factory=time.time)
    start_from: ArtifactRef | None = None   # a checkpoint cycle 0 is warm-started from (a stream's best student)
    promote: bool = False             # completed, its best student goes to serving (StudentPromoted)


class ModelTrained(Message):
    kind: ClassVar[str] = "model-trained"
    topic: ClassVar[str] = "model-trained"
    checkpoint: ArtifactRef
    train_set: ArtifactRef            # the dataset version this student was trained on
    train_size: int
    training: TrainingRound
    provenance: Provenance
    cycle_started: float


class CycleEvaluated(Message):
    """The stop policy said continue."""
    kind: ClassVar[str] = "cycle-evaluated"
    topic: ClassVar[str] = "cycle-evaluated"
    checkpoint: ArtifactRef
    train_set: ArtifactRef
    best_checkpoint: ArtifactRef
    best_cycle: int
    validation: dict[str, float]      # headline metrics; the full report is in the run's cycle record
    samples_generated: int            # by the teacher so far, for the sample budget


class NegativesMined(Message):
    kind: ClassVar[str] = "negatives-mined"
    topic: ClassVar[str] = "negatives-mined"
    mined: MiningResult
    report: EvalReport                # of the student the mistakes were mined from
    train_set: ArtifactRef
    best_checkpoint: ArtifactRef
    wanted: int = Field(gt=0)         # samples to ask the teacher for
    cycle_started: float


class SamplesGenerated(Message):
    kind: ClassVar[str] = "samples-generated"
    topic: ClassVar[str] = "samples-generated"
    samples: list[Sample]             # screened: in the taxonomy, not empty, no duplicate of known text
    provenance: Provenance
    train_set: ArtifactRef            # the version the samples are added to
    best_checkpoint: ArtifactRef
    cycle_started: float


class RunCompleted(Message):
    kind: ClassVar[str] = "run-completed"
    topic: ClassVar[str] = "run-completed"
    status: Literal["completed", "failed"]
    reason: str                       # the stop policy's reason, or what failed
    report: ArtifactRef | None = None
    best_checkpoint: ArtifactRef | None = None
    best_cycle: int | None = None
    test: dict[str, float] | None = None
    decided_from: str | None = None   # where the stop policy read its figures (prometheus, run records...)


class StudentPromoted(Message):
    """A student to serve: the stream kept it (it beat the current one, or it is the stream's first),
    or a run submitted with --promote completed. The deployer beside each student server writes it
    as the next version of `model` and has the server switch to it. `cycle`: the run's best cycle."""
    kind: ClassVar[str] = "student-promoted"
    topic: ClassVar[str] = "student-promoted"
    checkpoint: ArtifactRef
    model: str = Field("student", pattern=NAME_PATTERN)   # the served model it becomes
    scores: dict[str, float]          # validation (and test, for a completed run)
    decision: str                     # why it was promoted
    source: Literal["stream", "run"]
    stream: str | None = Field(None, pattern=NAME_PATTERN)
    promoted_at: float = Field(default_factory=time.time)


class DeadLetter(BaseModel):
    """A message no handler could take: what it was, where it came from and why. The record that
    carries it also has the original's key and headers as its own, byte for byte, and the
    `pgkd.dead-letter.*` headers (services/runtime.py), so a plain Kafka client can trace or replay it."""
    kind: ClassVar[str] = "dead-letter"
    topic: ClassVar[str] = "dead-letter"
    schema_version: Literal[1] = SCHEMA_VERSION
    source_topic: str
    service: str
    reason: str
    payload: str                      # the message as received (decoded as UTF-8, replaced where not; "" for none)
    run_id: str | None = None
    cycle: int | None = None
    failed_at: float = Field(default_factory=time.time)
    # where the original record is, and what it carried besides its value (None/[]: not known)
    source_partition: int | None = None
    source_offset: int | None = None
    key: str | None = None            # the record's key, as UTF-8 (replaced where not); None: it had none
    headers: list[tuple[str, str]] = []   # its headers in order, repeats kept, values as UTF-8 (replaced where not)
    payload_bytes: int | None = None  # the value's length in bytes; None: a null value (a tombstone)
    payload_base64: str | None = None  # the value's exact bytes, where they are not UTF-8 (`payload` lost some)


class LabeledSample(BaseModel):
    """A human-labeled sample streamed to the ingest service (pgkd.stream). Producers write it
    without a schema_version; other fields a labeling tool adds are ignored."""
    model_config = ConfigDict(extra="ignore")
    topic: ClassVar[str] = "labeled-samples"
    text: str
    label: str
    source: str | None = None         # who labeled it (an agent, a tool, a queue)
    id: str | None = None             # the producer's id, kept with the sample


MESSAGES: tuple[type[Message], ...] = (RunRequested, ModelTrained, CycleEvaluated, NegativesMined, SamplesGenerated,
                                       RunCompleted, StudentPromoted)
TOPICS: tuple[str, ...] = tuple(m.topic for m in MESSAGES) + (LabeledSample.topic, DeadLetter.topic)
