"""What a stream remembers (streams/<name>/state.json): the taxonomy, the current student, the runs
and their decisions, the drift checks, a trigger waiting for the running run to end."""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from pgkd.artifacts import ArtifactRef
from pgkd.calibration import Deferral
from pgkd.names import check_name


def stream_key(name: str) -> str:
    """The stream's folder in the artifact store, `streams/<name>`; the name is checked (pgkd.names)."""
    return f"streams/{check_name(name, 'stream')}"


class Trigger(BaseModel):
    """Why a stream run starts: enough new samples (count), or the current student's accuracy on new
    samples fell (drift)."""
    kind: Literal["count", "drift"]
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class CurrentStudent(BaseModel):
    run_id: str
    checkpoint: ArtifactRef
    train_set: ArtifactRef        # what it was trained on: the next run's training set starts from it
    labels: list[str]
    validation_accuracy: float    # when it became current (for the base run's student, a score the teacher never
                                  # aimed at: out-of-fold selection's, or cycle 0's validation accuracy)
    validation_score: float       # the same, in the run's metric
    since: float
    # The drift reference: its accuracy on the first `drift_reference_windows` windows of samples that
    # arrived after it became current (samples it was neither trained nor selected on)
    drift_reference: float | None = None
    reference_floor: float = 0.0  # what its first windows are checked against: the base student's unbiased score,
                                  # or the reference of the student it replaced
    reference_windows: int = 0
    reference_samples: int = 0
    reference_correct: int = 0


class PromotionDecision(BaseModel):
    """Whether a stream run's student replaced the current one, and on what evidence."""
    run_id: str
    replaced: bool
    reason: str
    metric: str
    new_score: float | None = None
    current_score: float | None = None
    new_accuracy: float | None = None
    current_accuracy: float | None = None
    current_run: str | None = None          # the student the new one was measured against
    validation_size: int = 0
    validation_sha256: str = ""
    # "metric", or "cascade": the students as the cascade serves them, at `cascade_target` (pgkd.stream.promotion)
    criterion: str = "metric"
    cascade_target: str | None = None
    new_cascade: Deferral | None = None
    current_cascade: Deferral | None = None
    decided_at: float = Field(default_factory=time.time)


class StreamRun(BaseModel):
    run_id: str
    trigger: Trigger
    samples_through: int          # accepted samples (by seq) its dataset holds
    train_size: int
    validation_size: int
    started_at: float
    # teacher labels in its training set, and those the share bound left out (max_teacher_label_share)
    teacher_labels: int = 0
    teacher_labels_left_out: int = 0
    # the segments its dataset was cut from, as the manifest had them: each one's first `samples`
    # lines, whose bytes hash to `sha256` (the open segment grows after, by appending)
    cut_from: list[dict] = []
    settings: dict = {}           # the stream's settings in force when it was triggered (RELOADABLE)
    settings_sha256: str | None = None   # of the settings file they came from, if one
    published: bool = False
    decision: PromotionDecision | None = None


class DriftCheck(BaseModel):
    """The current student scored on a window of new human labels (teacher labels never count)."""
    through: int                  # the last sample (seq) of the window
    first: int = 0                # its first sample (seq); 0 in states written before it was kept
    window: int
    accuracy: float
    reference: float              # the current student's drift reference; for its first windows, the floor
    drifted: bool
    role: Literal["reference", "check"] = "check"   # reference: one of the first windows, which make the reference
    checked_at: float = Field(default_factory=time.time)


class StreamState(BaseModel):
    name: str
    base_run: str
    labels: list[str]
    current: CurrentStudent | None = None
    runs: list[StreamRun] = []
    drift_checked_through: int = 0
    drift_checks: list[DriftCheck] = []     # the latest few
    pending_trigger: Trigger | None = None  # fired while a run was going
    unpublished_promotions: list[dict] = []  # StudentPromoted messages decided, not yet on the bus
