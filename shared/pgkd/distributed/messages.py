"""The message contracts of the distributed loop: one pydantic model per message kind.

    RunRequested -> trainer -> ModelTrained -> evaluator -> CycleEvaluated -> miner -> NegativesMined
    -> generator -> SamplesGenerated -> trainer ... until the evaluator publishes RunCompleted: its
    stop policy said stop, or the generator said TeacherStopped (the teacher has nothing left).

The loop's messages are small: ids and a reference (URI + sha256) to the run's state after the phase
that sent them (pgkd.loop.state.RunState in the artifact store), never samples or model weights. `cycle` is the cycle the message belongs to: cycle k mines the mistakes of student k-1,
asks the teacher, trains student k and evaluates it; cycle 0 trains on the labeled seed set.
Every message is keyed by (run_id, cycle, kind), which is what makes handlers idempotent.
Human-labeled samples come in on their own topic (LabeledSample), for the ingest service, which
starts runs of its own (pgkd.stream). A student to serve goes out as StudentPromoted (from the
stream's decision, or a run submitted with --promote), for the deployers beside the student servers; a run submitted with --promote carries its own in
its RunCompleted (`promotion`).
A consumer rejects a `schema_version` it does not know (to the dead-letter topic), so a change
of a field's meaning must raise it.
"""
from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pgkd.artifacts import ArtifactRef
from pgkd.names import NAME_PATTERN

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


class LoopMessage(Message):
    """A phase of a run is done: `state` is the run's state after it (pgkd.loop.state.RunState, in the
    artifact store), which the next phase loads. Schema 2: the state replaced the fields each message
    carried of it."""
    schema_version: Literal[2] = 2
    state: ArtifactRef


class ModelTrained(LoopMessage):
    """The trainer trained cycle `cycle`'s student."""
    kind: ClassVar[str] = "model-trained"
    topic: ClassVar[str] = "model-trained"


class CycleEvaluated(LoopMessage):
    """The evaluator recorded cycle `cycle`, and the stop policy said continue."""
    kind: ClassVar[str] = "cycle-evaluated"
    topic: ClassVar[str] = "cycle-evaluated"


class NegativesMined(LoopMessage):
    """The miner mined student `cycle`-1's mistakes for cycle `cycle`'s request to the teacher."""
    kind: ClassVar[str] = "negatives-mined"
    topic: ClassVar[str] = "negatives-mined"


class SamplesGenerated(LoopMessage):
    """The generator added the teacher's screened samples to cycle `cycle`'s training set."""
    kind: ClassVar[str] = "samples-generated"
    topic: ClassVar[str] = "samples-generated"


class TeacherStopped(LoopMessage):
    """The teacher has nothing left to give, or cannot be reached (the state's stop_reason says which):
    the evaluator ends the run."""
    kind: ClassVar[str] = "teacher-stopped"
    topic: ClassVar[str] = "teacher-stopped"


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
    state: ArtifactRef | None = None  # the run's final state (pgkd.loop.state.RunState)
    promotion: "StudentPromoted | None" = None   # a run submitted with --promote: its best student, to serve


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


TEACHER_SOURCE = "teacher"
SOURCE_KINDS = ("human", "teacher")


def source_kind(source: str | None) -> Literal["human", "teacher"]:
    """The one rule that tells labels apart: `source` "teacher" is a teacher label (an LLM answered a
    text the served student deferred); anything else (none, "pool", a tool's or an agent's name) is
    a human label."""
    return "teacher" if source == TEACHER_SOURCE else "human"


class LabeledSample(BaseModel):
    """A labeled sample streamed to the ingest service (pgkd.stream): a human label, or a teacher
    label (`source` "teacher", `model` the LLM that answered; see `source_kind`). Producers write it
    without a schema_version; other fields a labeling tool adds are ignored."""
    model_config = ConfigDict(extra="ignore")
    topic: ClassVar[str] = "labeled-samples"
    text: str
    label: str
    source: str | None = None         # who labeled it (an agent, a tool, a queue; TEACHER_SOURCE: an LLM)
    id: str | None = None             # the producer's id, kept with the sample
    model: str | None = None          # for a teacher label, the model that answered

    @property
    def is_teacher(self) -> bool:
        return source_kind(self.source) == "teacher"


RunCompleted.model_rebuild()
MESSAGES: tuple[type[Message], ...] = (RunRequested, ModelTrained, CycleEvaluated, NegativesMined, SamplesGenerated,
                                       TeacherStopped, RunCompleted, StudentPromoted)
TOPICS: tuple[str, ...] = tuple(m.topic for m in MESSAGES) + (LabeledSample.topic, DeadLetter.topic)
