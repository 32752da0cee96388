"""A run's options (`DistillConfig`, every one recorded in report.json) and what follows from them:
the stop policy, each round's training settings, how many samples to ask for."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from pgkd.errors import UserError
from pgkd.loop.evaluation import METRICS
from pgkd.loop.stopping import StopPolicy
from pgkd.students.contract import TrainConfig
from pgkd.teachers.llm import LLMSettings
from pgkd.teachers.simulated import TEACHERS
from pgkd.teachers.transports import TeacherURL, is_llm_teacher


class DistillConfig(BaseModel):
    """Every option of a run; recorded whole in report.json."""
    data: str
    text_column: str = "text"
    label_column: str = "label"
    labeled: int = Field(1000, gt=0)
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    teacher: str = "pool-guided"          # a simulation's name, or triton://, triton+grpc://, openai:// URL
    teacher_timeout: float = Field(120.0, gt=0)        # seconds per call: LLM teachers, a teacher object
    teacher_retries: int = Field(3, ge=0)
    teacher_concurrency: int = Field(4, gt=0)
    teacher_max_per_call: int = Field(32, gt=0)        # samples asked for in one call
    teacher_max_tokens: int = Field(4096, gt=0)
    teacher_temperature: float = Field(0.7, ge=0)
    price_prompt_per_1k: float = Field(0.0, ge=0)      # currency units per 1,000 prompt tokens
    price_completion_per_1k: float = Field(0.0, ge=0)
    teacher_cache: str = "file://~/.cache/pgkd"      # artifact store for LLM answers; "none" turns it off
    guidance: Literal["full", "no-report", "no-hard-negatives"] = "full"   # the paper's two ablations
    # Where the report and the mined samples come from (pgkd.loop.guidance): out-of-fold predictions over
    # the labeled train samples, which leaves validation a selection split the teacher never sees; or
    # the validation split itself, as the method was first written.
    guidance_source: Literal["out-of-fold", "validation"] = "validation"
    # Which scores pick the best cycle and stop the run: the validation split's, or out-of-fold scores
    # over the labeled train samples (which the teacher is never shown while it is guided by validation).
    selection_source: Literal["out-of-fold", "validation"] = "validation"
    guidance_folds: int = Field(5, ge=2)      # folds of either out-of-fold computation
    guidance_student: str | None = None   # the fold students' recipe (default: the run's own student)
    label_noise: float = Field(0.0, ge=0, le=1)
    student: str = "minilm"
    samples_per_cycle: int = Field(32, gt=0)
    max_cycles: int = Field(10, ge=0)
    patience: int = Field(5, ge=0)
    min_delta: float = Field(0.0, ge=0)
    sample_budget: int | None = Field(None, gt=0)
    target_score: float | None = None                 # stop once the metric reaches it
    token_budget: int | None = Field(None, gt=0)      # stop once the teacher used this many tokens
    cost_budget: float | None = Field(None, gt=0)     # stop once the teacher cost this much
    metric: str = "macro_f1"
    seed: int = 1
    epochs: int = Field(8, gt=0)          # first round, from the pretrained encoder
    cycle_epochs: int = Field(3, gt=0)    # later rounds, warm-started from the best student
    warm_start: bool = True
    # Warm-started rounds take smaller steps: at the full rate the student drifted and lost test accuracy
    # cycle after cycle while validation rose (BENCHMARKS.md).
    cycle_learning_rate_scale: float = Field(0.25, gt=0, le=1)
    track_test: bool = False              # diagnostic: test scores per cycle, never used for any decision
    batch_size: int = Field(32, gt=0)
    learning_rate: float = Field(4e-4, gt=0)
    head_learning_rate: float = Field(4e-3, gt=0)
    head_init: Literal["linear-probe", "random"] = "linear-probe"   # fine-tuned students: how a new head starts
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_length: int = Field(128, gt=0)
    hard_negatives: int = Field(16, ge=0)
    misclassified: int = Field(16, ge=0)
    correct: int = Field(16, ge=0)
    device: str = "auto"

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; one of {', '.join(METRICS)}")
        return v

    @field_validator("teacher")
    @classmethod
    def _known_teacher(cls, v: str) -> str:
        if v.startswith("python:"):          # an object given to pgkd.distill, recorded by name
            return v
        if is_llm_teacher(v):
            try:
                TeacherURL.parse(v)
            except UserError as e:   # pydantic reports a ValueError as this field's problem; pgkd.cli
                raise ValueError(e) from None   # finds the UserError in it, to name the flag
        elif v not in TEACHERS:
            raise ValueError(f"unknown teacher {v!r}; one of {', '.join(TEACHERS)}, or triton://HOST:PORT/MODEL, "
                             "triton+grpc://HOST:PORT/MODEL, openai://HOST:PORT/v1?model=NAME")
        return v

    @model_validator(mode="after")
    def _selection_unseen(self) -> "DistillConfig":
        if self.guidance_source == "out-of-fold" and self.selection_source == "out-of-fold":
            raise ValueError("guidance_source and selection_source cannot both be out-of-fold: the teacher would "
                             "be aimed at the very scores that pick the best cycle")
        return self

    def llm_settings(self) -> LLMSettings:
        return LLMSettings(timeout=self.teacher_timeout, retries=self.teacher_retries,
                           concurrency=self.teacher_concurrency, max_per_call=self.teacher_max_per_call,
                           max_tokens=self.teacher_max_tokens, temperature=self.teacher_temperature,
                           price_prompt_per_1k=self.price_prompt_per_1k,
                           price_completion_per_1k=self.price_completion_per_1k)

    def train_config(self, epochs: int, seed: int, scale: float = 1.0, patience: int = 1) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, learning_rate=self.learning_rate * scale,
                           head_learning_rate=self.head_learning_rate * scale, max_length=self.max_length,
                           patience=patience, head_init=self.head_init, label_smoothing=self.label_smoothing,
                           seed=seed)

    def round_config(self, cycle: int, warm: bool | None = None) -> TrainConfig:
        """From the pretrained encoder at cycle 0; later rounds are warm-started, shorter and gentler
        (as is a cycle 0 that starts from an earlier student: `warm`)."""
        warm = cycle > 0 and self.warm_start if warm is None else warm
        if warm:
            return self.train_config(self.cycle_epochs, self.seed + cycle, self.cycle_learning_rate_scale,
                                     patience=2 if self.cycle_epochs > 3 else 1)
        # A round from the pretrained encoder runs its whole schedule and keeps its best epoch: just after
        # warmup, at the peak rate, fine-tuning first undoes some of the linear probe's head and validation
        # loss rises for two or three epochs before it falls below the probe's (hwu64, seed 1: BENCHMARKS.md);
        # stopping on the first rise kept the worse student.
        return self.train_config(self.epochs, self.seed + cycle, patience=self.epochs)

    def policy(self) -> StopPolicy:
        return StopPolicy(patience=self.patience, max_cycles=self.max_cycles, sample_budget=self.sample_budget,
                          min_delta=self.min_delta, metric=self.metric, lower_is_better=self.metric == "loss",
                          target_score=self.target_score, token_budget=self.token_budget,
                          cost_budget=self.cost_budget)

    def samples_wanted(self, generated_total: int) -> int:
        """What the teacher is asked for this cycle: samples_per_cycle, within the sample budget."""
        if self.sample_budget is None:
            return self.samples_per_cycle
        return min(self.samples_per_cycle, self.sample_budget - generated_total)
