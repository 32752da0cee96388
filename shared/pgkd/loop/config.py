"""A run's options (`DistillConfig`, every one recorded in report.json) and what follows from them:
the stop policy, each round's training settings, how many samples to ask for."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pgkd.errors import Option, UserError
from pgkd.settings import check_artifacts_url
from pgkd.loop.stopping import StopPolicy
from pgkd.teachers.simulated import TEACHERS
from pgkd.teachers.transports import TeacherURL, is_llm_teacher
from pgkd.types import METRICS, Seed, Share, TrainConfig

if TYPE_CHECKING:
    from pgkd.teachers.llm import LLMSettings


LLM = "LLM teacher (triton://, openai://)"
CACHE_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs")     # fsspec's, as pgkd.artifacts opens them   # the command line's group of the LLM teachers' options


class DistillConfig(BaseModel):
    """Every option of a run; recorded whole in report.json. Each field is declared once, here: its
    description is its --help, its json_schema_extra may give its flag's established spelling (`flag`)
    and its group (`group`); pgkd.options makes the command-line options of `pgkd distill`, `pgkd
    submit`, `pgkd bench bus` and `python -m pgkd_services.local` from these fields."""
    model_config = ConfigDict(allow_inf_nan=False)    # a NaN target is never reached, an infinite timeout never ends
    data: str = Field(description="dataset folder (train/validation/test .jsonl or .csv) or one file")
    taxonomy: str | None = Field(None, description=(
        "a file of the classes and what each means (CSV label,description[,examples]; JSON or YAML), shown to "
        "the teacher; it may name classes the data lacks"))
    text_column: str = Field("text", description="the column (or JSON key) holding the text")
    label_column: str = Field("label", description="the column (or JSON key) holding the label")
    labeled: int = Field(1000, gt=0, description="labeled samples drawn from train (split by --validation-fraction)")
    validation_fraction: float = Field(0.2, gt=0, lt=1,
                                       description="share of the labeled samples held out for validation")
    teacher: str = Field("pool-guided", description=(
        "pool-guided | pool-random | pool-guided-pairs (simulations of an LLM teacher), or an LLM: "
        "triton://HOST:PORT/MODEL, triton+grpc://HOST:PORT/MODEL, openai://HOST:PORT/v1?model=NAME[&key_env=VAR]"
        "[&structured=off] (openai+https:// for TLS)"))
    teacher_timeout: float = Field(120.0, gt=0, json_schema_extra={"group": LLM},
                                   description="seconds per call (LLM teachers, a teacher object)")
    teacher_retries: int = Field(3, ge=0, json_schema_extra={"group": LLM},
                                 description="retries per call on timeouts, transport errors, 5xx")
    teacher_concurrency: int = Field(4, gt=0, json_schema_extra={"group": LLM}, description="calls in flight")
    teacher_max_per_call: int = Field(32, gt=0, json_schema_extra={"group": LLM},
                                      description="samples asked for in one call")
    teacher_max_tokens: int = Field(4096, gt=0, json_schema_extra={"group": LLM},
                                    description="the most tokens one answer may take")
    teacher_temperature: float = Field(0.7, ge=0, json_schema_extra={"group": LLM},
                                       description="the LLM's sampling temperature")
    teacher_max_prompt_tokens: int = Field(8000, gt=0, json_schema_extra={"group": LLM}, description=(
        "the longest prompt sent; longer ones leave out correct samples, then misclassified ones, then examples, "
        "then report lines of classes without errors (never the classes or the hard negatives)"))
    price_prompt_per_1k: float = Field(0.0, ge=0, json_schema_extra={"group": LLM},
                                       description="cost of 1,000 prompt tokens (currency units)")
    price_completion_per_1k: float = Field(0.0, ge=0, json_schema_extra={"group": LLM},
                                           description="cost of 1,000 completion tokens")
    teacher_cache: str = Field("file://~/.cache/pgkd", json_schema_extra={"group": LLM}, description=(
        "where answers are cached by request (a folder URL or s3://...; none: off); the services use their "
        "artifact store"))
    guidance: Literal["full", "no-report", "no-hard-negatives"] = Field("full", description=(
        "what the teacher is shown: everything, or all but the report / hard negatives (the paper's ablations)"))
    # 5, not 1 (every class shown however thin its evidence): on held-out dev data of the four shared sets, the
    # guided teacher gained as much or more with it (BENCHMARKS.md, "The per-class report").
    report_min_support: int = Field(5, ge=1, description=(
        "the report shows the teacher a class's scores only when measured on this many samples or more; classes "
        "with fewer are left out, said to be too few to judge (1: every class)"))
    guidance_source: Literal["out-of-fold", "validation"] = Field("validation", description=(
        "where the report and the mistakes come from (pgkd.loop.guidance): out-of-fold predictions over the "
        "labeled train samples (validation is then a selection split the teacher never sees), or validation "
        "itself, as the method was first written"))
    selection_source: Literal["out-of-fold", "validation"] = Field("validation", description=(
        "which scores pick the best cycle and stop the run: validation, or out-of-fold scores over the labeled "
        "train samples (never shown to a teacher guided by validation)"))
    guidance_folds: int = Field(5, ge=2, description="folds of the out-of-fold guidance or selection")
    guidance_student: str | None = Field(None, description=(
        "the fold students' recipe (default: --student; minilm-frozen is a cheap stand-in)"))
    label_noise: Share = Field(0.0, description="share of teacher answers relabeled at random")
    student: str = Field("minilm", description=(
        "minilm (fine-tuned, mean pooling) | minilm-frozen | minilm-cls ([CLS] pooler) | tiny | a Hugging Face "
        "id or model folder"))
    samples_per_cycle: int = Field(32, gt=0, description="samples the teacher is asked for each cycle")
    max_cycles: int = Field(10, ge=0, description="cycles of teaching at most")
    patience: int = Field(5, ge=0, description="cycles without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as improvement")
    sample_budget: int | None = Field(None, gt=0, description="stop once the teacher produced this many")
    target_score: float | None = Field(None, description="stop once --metric reaches this value")
    token_budget: int | None = Field(None, gt=0, description="stop once the teacher used this many tokens")
    cost_budget: float | None = Field(None, gt=0, description="stop once the teacher cost this much")
    metric: str = Field("macro_f1", description=f"the validation metric the stop policy watches: {' | '.join(METRICS)}")
    seed: Seed = Field(1, description="seeds the split, the teacher's simulation and each round's training")
    epochs: int = Field(8, gt=0, description="epochs of the first training round, from the pretrained encoder")
    cycle_epochs: int = Field(3, gt=0, description="epochs of each later round, warm-started from the best student")
    warm_start: bool = Field(True, description=(
        "later rounds start from the best student; --no-warm-start: each from the pretrained encoder (slower)"))
    # Warm-started rounds take smaller steps: at the full rate the student drifted and lost test accuracy
    # cycle after cycle while validation rose (BENCHMARKS.md).
    cycle_learning_rate_scale: float = Field(0.25, gt=0, le=1, json_schema_extra={"flag": "--cycle-lr-scale"},
                                             description="learning-rate factor for the warm-started rounds")
    track_test: bool = Field(False, description=(
        "also score test after every cycle (a diagnostic; never used for any decision)"))
    batch_size: int = Field(32, gt=0, description="samples per training step")
    learning_rate: float = Field(4e-4, gt=0, description="the encoder's learning rate")
    head_learning_rate: float = Field(4e-3, gt=0, description="for the new classification head")
    head_init: Literal["linear-probe", "random"] = Field("linear-probe", description=(
        "fine-tuned students: a new head starts as a logistic regression on the encoder's embeddings, or random"))
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the training loss")
    max_length: int = Field(128, gt=0, description="tokens of a text the student reads at most")
    hard_negatives: int = Field(16, ge=0, description=(
        "the misclassified samples the student was most sure of, shown to the teacher"))
    misclassified: int = Field(16, ge=0, description="other misclassified samples shown to the teacher (a seeded draw)")
    correct: int = Field(16, ge=0, description="correctly classified samples shown to the teacher (a seeded draw)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    # The cascade's deferral policy (pgkd.calibration): when the run ends, the kept student's probabilities
    # are calibrated on the validation texts the teacher was never shown, and the threshold is picked there.
    target_accuracy: float | None = Field(None, gt=0, le=1, json_schema_extra={"group": "the cascade"}, description=(
        "the accuracy the student's own answers must hold when served as a cascade: the lowest confidence "
        "threshold that holds it is recorded with the student (the LLM answers below it)"))
    max_teacher_share: float | None = Field(None, ge=0, le=1, json_schema_extra={"group": "the cascade"},
                                            description=(
        "instead of --target-accuracy: the share of traffic the LLM may answer; the threshold that sends at "
        "most that share to it is recorded with the student"))

    @field_validator("data", "taxonomy")
    @classmethod
    def _path_named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():    # an empty path would name the current folder
            raise ValueError("an empty name: expected a file or folder")
        return v

    @field_validator("teacher_cache")
    @classmethod
    def _cache_store(cls, v: str) -> str:
        """A store pgkd's artifact store can be (a folder, file://, a bucket), or none."""
        if v == "none":
            return v
        scheme = urlsplit(v).scheme if "://" in v else "file"
        if scheme not in CACHE_SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}: expected a folder, file://PATH, s3://BUCKET[/PREFIX], "
                             "gs://..., az://... or none")
        check_artifacts_url(v)      # a bucket's URL without its bucket
        return v

    @field_validator("device")
    @classmethod
    def _device_named(cls, v: str) -> str:
        """Its spelling; whether this machine has it is asked when the student is made (pgkd.encoder.pick_device)."""
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("not a device (auto, cpu, cuda, cuda:N, mps)")
        return v

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
            raise ValueError(UserError(   # named as the caller's options (pgkd.errors.invalid keeps them)
                Option("guidance_source", self.guidance_source), " and ",
                Option("selection_source", self.selection_source),
                " cannot both be out-of-fold: the teacher would be aimed at the very scores that pick the best cycle"))
        if (self.target_accuracy is not None or self.max_teacher_share is not None) and \
                self.guidance_source == "validation":
            chosen = "target_accuracy" if self.target_accuracy is not None else "max_teacher_share"
            raise ValueError(UserError(
                Option(chosen, getattr(self, chosen)), " is chosen on validation texts the teacher never saw: add ",
                Option("guidance_source", "out-of-fold"), " (guided by validation, the teacher is shown its "
                "mistakes); ", Option("guidance_student", "minilm-frozen"), " makes the fold students cheap"))
        if self.target_accuracy is not None and self.max_teacher_share is not None:
            raise ValueError(UserError(
                Option("target_accuracy", self.target_accuracy), " and ", Option("max_teacher_share", self.max_teacher_share),
                " each choose the threshold: give one"))
        if self.target_score is not None and not 0 <= self.target_score <= (1 if self.metric != "loss" else math.inf):
            raise ValueError(UserError(   # a share lies in [0, 1], a loss is never below 0: else never reached
                Option("target_score", self.target_score), " would never stop the run: ", Option("metric", self.metric),
                " is between 0 and 1" if self.metric != "loss" else " is never below 0"))
        if self.cost_budget is not None and not (self.price_prompt_per_1k or self.price_completion_per_1k):
            raise ValueError(UserError(
                Option("cost_budget", self.cost_budget), " would never stop the run: without ",
                Option("price_prompt_per_1k"), " or ", Option("price_completion_per_1k"), " the cost stays 0"))
        return self

    def llm_settings(self) -> LLMSettings:
        from pgkd.teachers.llm import LLMSettings   # the LLM client loads when a run asks an LLM, not with a config
        return LLMSettings(timeout=self.teacher_timeout, retries=self.teacher_retries,
                           concurrency=self.teacher_concurrency, max_per_call=self.teacher_max_per_call,
                           max_tokens=self.teacher_max_tokens, temperature=self.teacher_temperature,
                           max_prompt_tokens=self.teacher_max_prompt_tokens,
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
