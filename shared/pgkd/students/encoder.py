"""Sentence embeddings from the frozen MiniLM encoder (mean pooling, unit length), as
sentence-transformers computes them for all-MiniLM-L6-v2; used for neighbour search."""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from pgkd.students.contract import MAX_LENGTH, MAX_TEXT_CHARS
from pgkd.students.finetuned import length_sorted_batches, minilm_path, pick_device


class SentenceEncoder:
    def __init__(self, path: str | None = None, device: str | None = None, batch_size: int = 128,
                 max_length: int = MAX_LENGTH, progress: bool = True):
        source = path or str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.device = pick_device(device)
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
