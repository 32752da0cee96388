"""The student: a Hugging Face sequence-classification model and its training loop.

`FineTunedStudent.create("minilm" | "minilm-cls" | "tiny" | HF id | folder, labels)` builds one: "minilm"
is MiniLM read by mean pooling with a linear head (mean_pooling.py), "minilm-cls" the [CLS]-pooled
`BertForSequenceClassification` it replaced. `train` first fits the head as a logistic regression on
the encoder's own sentence embeddings (a linear probe), then fine-tunes everything with a
plain torch loop (AdamW, linear warmup and decay, gradient clipping, dynamic padding, early stopping
on validation loss within the round); `predict_proba` runs batched, length-sorted inference;
`save` / `load` keep a Hugging Face model folder with the label map in its config.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_save
from tqdm.auto import tqdm

from pgkd.encoder import length_sorted_batches, loading_bars, minilm_path, pick_device
from pgkd.errors import UserError
from pgkd.students.contract import (MARKER, calibrated, calibration_files, log_loss, predicted_labels, save_folder,
                                    read_calibration, text_list, unknown_student)
from pgkd.types import MAX_LENGTH, MAX_TEXT_CHARS, Sample, TrainConfig, TrainResult

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from pgkd.students.mean_pooling import MeanPoolingBertConfig, MeanPoolingBertForSequenceClassification  # noqa: E402

hf_logging.set_verbosity_error()  # the "newly initialised classifier" warning is expected here
hf_logging.disable_progress_bar()

# pgkd reads its own saved students without trust_remote_code; a plain transformers user passes it.
AutoConfig.register(MeanPoolingBertConfig.model_type, MeanPoolingBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPoolingBertConfig, MeanPoolingBertForSequenceClassification,
                                            exist_ok=True)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")   # a saved tokenizer's vocabulary, in either form
MODELING_FILE = "mean_pooling.py"   # copied into each saved mean-pooling student, named in its auto_map


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def length_bucketed_batches(ids: list[list[int]], batch_size: int, generator: torch.Generator,
                            bucket_batches: int = 16) -> list[list[int]]:
    """Shuffled batches of similar-length texts: shuffle, sort within buckets of a few batches
    by length, cut into batches, shuffle the batches. Less padding, still random order."""
    order = torch.randperm(len(ids), generator=generator).tolist()
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start:start + bucket], key=lambda i: len(ids[i]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# The weight shards of `checkpoint_files`: the input embeddings, then everything else.
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")

# An epoch is better only if it lowers the best validation loss by more than this: noise of the last
# digits must not reset patience.
MIN_LOSS_GAIN = 1e-4


class FineTunedStudent:
    def __init__(self, model, tokenizer, labels: list[str], spec: str, device: str | None = None):
        self.model = model
        # What pgkd reads of a text, said where plain transformers looks (tokenizer_config.json): a saved
        # student read there with truncation cuts a long text where pgkd does, not at the encoder's 512.
        tokenizer.model_max_length = MAX_LENGTH
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.spec = spec
        self.device = pick_device(device)
        self.model.to(self.device)
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.head_fitted = False     # a new head is random until the first round fits it
        self.calibration = None      # pgkd.calibration.Calibration, set when a run ends

    # ---- building, saving, loading -------------------------------------------------------------
    @classmethod
    def create(cls, spec: str, labels: list[str], seed: int = 0, device: str | None = None) -> "FineTunedStudent":
        """A new student for `labels`: pretrained encoder, freshly initialised classification head."""
        seed_everything(seed)
        label_maps = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)})
        if spec == "tiny":
            # A small random BERT for fast tests; it borrows MiniLM's tokenizer (no hub access needed).
            tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
            config = MeanPoolingBertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                           **label_maps)
            return cls(MeanPoolingBertForSequenceClassification(config), tokenizer, labels, spec, device)
        if spec == "minilm":
            source = minilm_path()
            encoder = {k: v for k, v in BertConfig.from_pretrained(source, local_files_only=True).to_dict().items()
                       if k not in ("model_type", "architectures", "auto_map", "transformers_version", *label_maps)}
            config = MeanPoolingBertConfig(**encoder, **label_maps)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = MeanPoolingBertForSequenceClassification.from_pretrained(source, config=config,
                                                                             local_files_only=True)
            return cls(model, tokenizer, labels, spec, device)
        source = str(minilm_path()) if spec == "minilm-cls" else spec
        try:   # local_files_only: an unknown name fails at once, not after a minute of hub retries
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, ignore_mismatched_sizes=True, local_files_only=True, **label_maps)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f" ({first[:160]})" if Path(source).is_dir() else ""   # a folder, but not a model's
            raise unknown_student(spec, why) from None
        return cls(model, tokenizer, labels, spec, device)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> "FineTunedStudent":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: not a saved student (no config.json, nor {MARKER} of a frozen-encoder one)")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build a tokenizer of its special tokens alone: every word [UNK], wrong answers
            raise UserError(f"{path}: not a readable saved student (no tokenizer: none of {', '.join(TOKENIZER_FILES)})")
        try:
            with loading_bars(False):    # a saved student loads in seconds: no bar before predict's JSON lines
                model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        except Exception as e:  # noqa: BLE001 -- a damaged folder fails in many libraries' own ways
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{path}: not a readable saved student ({type(e).__name__}: {first[:200]})") from None
        # The spec it was created from, so a warm-started round trains the same parameters as before.
        student = cls(model, tokenizer, labels, spec=getattr(model.config, "pgkd_student", str(path)), device=device)
        student.head_fitted = True
        student.calibration = read_calibration(path, labels)
        return student

    def save(self, path: str | Path) -> None:
        """A Hugging Face folder at `path`, new or empty (pgkd.students.contract.save_folder)."""
        save_folder(path, self._write)

    def _write(self, path: Path) -> None:
        self.model.config.pgkd_student = self.spec
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        for name, data in (self._modeling_files() | calibration_files(self)).items():
            (Path(path) / name).write_bytes(data)

    def _modeling_files(self) -> dict[str, bytes]:
        """The code a plain transformers user needs to load this model (with trust_remote_code)."""
        if isinstance(self.model, MeanPoolingBertForSequenceClassification):
            return {MODELING_FILE: (Path(__file__).parent / MODELING_FILE).read_bytes()}
        return {}

    def checkpoint_files(self) -> dict[str, bytes]:
        """The Hugging Face folder `save` writes, in memory, with the weights in two shards: the input
        embeddings (frozen in every round but the tiny student's, so the same bytes cycle after cycle,
        which a content-addressed store keeps once) and the rest. `load` reads it as it is."""
        self.model.config.pgkd_student = self.spec
        embeddings = self.model.get_input_embeddings().weight
        self.model.config.architectures = [type(self.model).__name__]
        self.model.config.dtype = str(embeddings.dtype).removeprefix("torch.")
        shards: dict[str, dict[str, torch.Tensor]] = {SHARDS[0]: {}, SHARDS[1]: {}}
        for name, tensor in self.model.state_dict().items():
            shard = SHARDS[0] if tensor.data_ptr() == embeddings.data_ptr() else SHARDS[1]
            shards[shard][name] = tensor.detach().to("cpu").contiguous()
        files = {shard: safetensors_save(tensors, metadata={"format": "pt"}) for shard, tensors in shards.items()}
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for ts in shards.values()
                                                for t in ts.values())},
                 "weight_map": {name: shard for shard, tensors in shards.items() for name in sorted(tensors)}}
        files["model.safetensors.index.json"] = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        with tempfile.TemporaryDirectory() as folder:   # config and tokenizer: small files, as save writes them
            self.model.config.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            files |= {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        return files | self._modeling_files() | calibration_files(self)

    def with_labels(self, labels: list[str]) -> "FineTunedStudent":
        """This student for a taxonomy that grew: each known label keeps its row of the classification
        head, a new label gets a freshly initialised one. Labels are never taken away."""
        labels = list(labels)
        if labels == self.labels:
            return self
        dropped = sorted(set(self.labels) - set(labels))
        if dropped:
            raise ValueError(f"labels can be added, not removed: {dropped[:5]}")
        old = getattr(self.model, "classifier", None)
        if not isinstance(old, torch.nn.Linear):
            raise ValueError(f"{type(self.model).__name__}: no linear `classifier` head to extend")
        head = torch.nn.Linear(old.in_features, len(labels), device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            head.weight.normal_(0.0, getattr(self.model.config, "initializer_range", 0.02))
            head.bias.zero_()
            for i, label in enumerate(labels):
                if label in self.label_index:
                    head.weight[i] = old.weight[self.label_index[label]]
                    head.bias[i] = old.bias[self.label_index[label]]
        self.model.classifier = head
        self.model.num_labels = len(labels)
        self.model.config.num_labels = len(labels)
        self.model.config.id2label = dict(enumerate(labels))
        self.model.config.label2id = {label: i for i, label in enumerate(labels)}
        self.labels, self.calibration = labels, None
        self.label_index = {label: i for i, label in enumerate(labels)}
        return self

    def state(self) -> dict[str, torch.Tensor]:
        """A real copy of the weights (on CPU), not a view that later training would change."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def predict(self, texts: list[str]) -> list[str]:
        """The label of each text."""
        return predicted_labels(self, texts)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---- batching ------------------------------------------------------------------------------
    def _encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids of each text, cut to MAX_TEXT_CHARS first (the tokenizer would read it whole)."""
        texts = [text[:MAX_TEXT_CHARS] for text in text_list(texts)]
        return self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []

    def _batch(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad to the longest sequence of this batch only (dynamic padding)."""
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def _labels_of(self, samples: list[Sample]) -> torch.Tensor:
        unknown = {s.label for s in samples} - set(self.label_index)
        if unknown:
            raise ValueError(f"labels unknown to this student: {sorted(unknown)[:5]}")
        return torch.tensor([self.label_index[s.label] for s in samples])

    # ---- training ------------------------------------------------------------------------------
    def train(self, train: list[Sample], validation: list[Sample], config: TrainConfig,
              progress: bool = True, description: str = "train") -> TrainResult:
        """Fine-tune on `train`; keep the epoch with the lowest validation loss. A new head is first
        fitted as a linear probe (`config.head_init`)."""
        seed_everything(config.seed)
        self.calibration = None      # trained again: the calibration no longer holds
        if config.head_init == "linear-probe" and not self.head_fitted:
            self.fit_head_by_probe(train, validation, config)
        generator = torch.Generator().manual_seed(config.seed)
        ids = self._encode([s.text for s in train], config.max_length)
        targets = self._labels_of(train)
        steps_per_epoch = math.ceil(len(train) / config.batch_size)
        total_steps = steps_per_epoch * config.epochs

        optimizer = torch.optim.AdamW(self._parameter_groups(config))
        scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps),
                                                    total_steps)

        best_loss, best_epoch, best_state, epochs_without_gain = math.inf, 0, None, 0
        validation_losses: list[float] = []
        train_loss = math.nan
        started = time.perf_counter()
        seen = 0
        bar = tqdm(total=total_steps, desc=description, unit="batch", disable=not progress, leave=False)
        for epoch in range(1, config.epochs + 1):
            self.model.train()
            losses = []
            for index in length_bucketed_batches(ids, config.batch_size, generator):
                batch = self._batch([ids[i] for i in index])
                with self._autocast():
                    logits = self.model(**batch).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), targets[index].to(self.device),
                                                         label_smoothing=config.label_smoothing)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                seen += len(index)
                bar.update(1)
            train_loss = float(np.mean(losses))
            validation_loss = self.loss(validation, config.max_length) if validation else train_loss
            validation_losses.append(validation_loss)
            bar.set_postfix(epoch=epoch, train_loss=f"{train_loss:.3f}", val_loss=f"{validation_loss:.3f}")
            if validation_loss < best_loss - MIN_LOSS_GAIN:
                best_loss, best_epoch, best_state, epochs_without_gain = validation_loss, epoch, self.state(), 0
            else:
                epochs_without_gain += 1
                if epochs_without_gain >= config.patience:
                    break
        bar.close()
        if best_state is not None:
            self.load_state(best_state)
        self.head_fitted = True
        seconds = time.perf_counter() - started
        return TrainResult(epochs_run=len(validation_losses), best_epoch=best_epoch, train_loss=train_loss,
                           validation_loss=best_loss, samples=seen, seconds=seconds,
                           samples_per_second=seen / seconds if seconds else 0.0,
                           validation_losses=validation_losses)

    @torch.inference_mode()
    def sentence_embeddings(self, texts: list[str], max_length: int = MAX_LENGTH,
                            batch_size: int = 64) -> np.ndarray:
        """What the head reads: the model's unit-length mean-pooled sentence embedding of each text."""
        self.model.eval()
        ids = self._encode(texts, max_length)
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        for index in length_sorted_batches(ids, batch_size):
            batch = self._batch([ids[i] for i in index])
            out[index] = self.model.embed(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy()
        return out

    def fit_head_by_probe(self, train: list[Sample], validation: list[Sample], config: TrainConfig) -> None:
        """Linear probing before fine-tuning (Kumar et al. 2022, LP-FT): the head starts as the frozen-encoder
        student's logistic regression on these embeddings, so the first steps refine the encoder instead
        of undoing it to fit a random head. Only the mean-pooling model reads such embeddings."""
        if not isinstance(self.model, MeanPoolingBertForSequenceClassification):
            return
        from pgkd.students.frozen import fit_linear_head
        x = self.sentence_embeddings([s.text for s in train], config.max_length)
        validation_xy = ((self.sentence_embeddings([s.text for s in validation], config.max_length),
                          self._labels_of(validation).numpy()) if validation else None)
        coef, intercept, _ = fit_linear_head(x, self._labels_of(train).numpy(), len(self.labels), validation_xy,
                                             config.seed)
        # A class absent from train keeps a large negative bias, not -1e4: fine-tuning must be able to move it.
        intercept = np.maximum(intercept, intercept[intercept > -1e4].min(initial=0.0) - 10.0)
        with torch.no_grad():
            self.model.classifier.weight.copy_(torch.from_numpy(coef))
            self.model.classifier.bias.copy_(torch.from_numpy(intercept))

    def _parameter_groups(self, config: TrainConfig) -> list[dict]:
        head_names = ("classifier", "pooler", "score")
        word_embeddings = self.model.get_input_embeddings().weight
        # Random embeddings (the tiny student) must learn; pretrained ones may stay as they are.
        word_embeddings.requires_grad_(not (config.freeze_word_embeddings and self.spec != "tiny"))
        groups = {(head, decay): [] for head in (True, False) for decay in (True, False)}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                groups[(any(h in name for h in head_names), p.ndim >= 2)].append(p)
        return [{"params": params,
                 "lr": config.head_learning_rate if head else config.learning_rate,
                 "weight_decay": config.weight_decay if decay else 0.0}
                for (head, decay), params in groups.items() if params]

    # ---- inference -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_proba(self, texts: list[str], batch_size: int = 64, max_length: int = MAX_LENGTH) -> np.ndarray:
        """Class probabilities, one row per text; batches hold texts of similar length."""
        self.model.eval()
        ids = self._encode(texts, max_length)
        probs = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        for index in length_sorted_batches(ids, batch_size):
            with self._autocast():
                logits = self.model(**self._batch([ids[i] for i in index])).logits
            probs[index] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return calibrated(self, probs)

    def loss(self, samples: list[Sample], max_length: int = MAX_LENGTH) -> float:
        probs = self.predict_proba([s.text for s in samples], max_length=max_length)
        return log_loss(probs, self._labels_of(samples).numpy())
