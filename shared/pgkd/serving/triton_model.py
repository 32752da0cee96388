"""A distilled pgkd student as a Triton Python-backend model: text in, label and probabilities out.

`pgkd export` copies this file into each version folder of a model repository as `model.py`, beside
the version's weights (`model.onnx`, run with ONNX Runtime, or `model.pt`, TorchScript, run with
torch), its `tokenizer.json` and `pgkd-version.json` (labels, max length, the sha256 of every file,
where the student came from). It imports nothing of pgkd: a server needs numpy, tokenizers, and
onnxruntime or torch.

Tensors (every one with the batch dimension first; a request carries one text or several):
    text           BYTES [1]   UTF-8 text
    ->
    label          BYTES [1]   the most probable label
    probability    FP32  [1]   its probability (calibrated: softmax of the logits over the temperature
                               in pgkd-version.json, fit when the run ended)
    probabilities  FP32  [-1]  every label's, in the order of labels.txt (Triton's classification
                               extension reads it: ask for `class_count` to get the top k as text)

A bad request (a text that is not UTF-8, empty, or longer than `max_text_chars` characters) is
answered with an error for that request alone, as the client's fault (INVALID_ARG: HTTP 400, gRPC
INVALID_ARGUMENT): the other requests of the batch are answered, and the model keeps serving. A failure
of the model itself is the server's (INTERNAL: HTTP 500).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton: pgkd reads check_version_folder from here, to check a repository
    pb_utils = None

MANIFEST = "pgkd-version.json"


def _parameter(config: dict, key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value or default


def check_version_folder(folder: Path) -> dict:
    """The version's manifest, once every file it names has the sha256 it gives: a half-written or
    damaged version fails to load here, and Triton keeps serving the version it had."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise RuntimeError(f"{folder}: no {MANIFEST} (a version that was not completely written)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for name, digest in manifest["files"].items():
        # A version folder is flat. (This file runs inside Triton, where pgkd, and so pgkd.names, is not
        # installed: the same rule, for file names only.)
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise RuntimeError(f"{folder}: {name!r} in {MANIFEST} is not a file of the version folder")
        path = folder / name
        if not path.is_file():
            raise RuntimeError(f"{folder}: {name} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise RuntimeError(f"{folder}: {name} does not match the sha256 in {MANIFEST}")
    return manifest


def check_text(value, number: int, max_chars: int) -> str:
    """A request's text as str, or ValueError saying which one is wrong and why (the cascade checks its
    texts with this too)."""
    if not isinstance(value, (bytes, str)):
        raise ValueError(f"text {number}: not a string ({type(value).__name__})")
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
    except UnicodeDecodeError as e:
        raise ValueError(f"text {number}: not UTF-8 (byte {e.start + 1})") from None
    if not text.strip():
        raise ValueError(f"text {number}: empty")
    if len(text) > max_chars:
        raise ValueError(f"text {number}: {len(text)} characters, more than the {max_chars} this model takes "
                         "(max_text_chars)")
    return text


def _error(message: str, invalid_request: bool = False):
    """A TritonError: INVALID_ARG for a request that is the client's fault (Triton answers HTTP 400, gRPC
    INVALID_ARGUMENT), INTERNAL otherwise (500, INTERNAL). A Python backend of an older Triton takes
    no code: its errors are all INTERNAL there."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid_request else None
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.manifest = check_version_folder(folder)
        self.labels = self.manifest["labels"]
        self.max_length = int(self.manifest["max_length"])
        # The student's calibration (pgkd-calibration.json beside it): softmax(logits / T).
        self.temperature = float(self.manifest.get("temperature", 1.0))
        if not 0.01 <= self.temperature <= 100:     # (a number pgkd never writes: an edited manifest)
            raise RuntimeError(f"{folder}: temperature {self.temperature} in {MANIFEST} is not a calibration's")
        self.max_text_chars = int(_parameter(config, "max_text_chars", "10000"))
        self.batch_size = int(_parameter(config, "inference_batch_size", "64"))

        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = int(self.manifest["pad_token_id"])

        gpu = args.get("model_instance_kind") == "GPU"
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        # The runtimes take every core of the machine by default; in a container limited to fewer,
        # PGKD_SERVING_THREADS (Kubernetes: the container's CPU limit) says how many are there. Read here
        # rather than through pgkd.settings (which lists it): this model imports nothing of pgkd.
        threads = int(os.environ.get("PGKD_SERVING_THREADS", "0") or 0)
        if self.manifest["format"] == "onnx":
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            providers = (["CUDAExecutionProvider"] if gpu and "CUDAExecutionProvider" in ort.get_available_providers()
                         else []) + ["CPUExecutionProvider"]
            session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers)
            self._logits = lambda ids, mask: session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        else:
            import torch
            if threads:
                torch.set_num_threads(threads)
            device = torch.device("cuda", device_id) if gpu and torch.cuda.is_available() else torch.device("cpu")
            module = torch.jit.load(str(folder / "model.pt"), map_location=device).eval()

            def logits(ids, mask):
                with torch.inference_mode():
                    return module(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu().numpy()
            self._logits = logits

    def _texts(self, request) -> list[str]:
        """The request's texts, or ValueError saying which one is wrong and why."""
        tensor = pb_utils.get_input_tensor_by_name(request, "text")
        if tensor is None:
            raise ValueError("no input named text in the request")
        values = tensor.as_numpy().reshape(-1)
        if values.size == 0:
            raise ValueError("no texts in the request")
        return [check_text(value, number, self.max_text_chars) for number, value in enumerate(values, start=1)]

    def _probabilities(self, texts: list[str]) -> np.ndarray:
        """Softmax over the logits, in batches of texts of similar length (the least padding)."""
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        out = np.zeros((len(ids), len(self.labels)), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in index)
            batch = np.full((len(index), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(index), width), dtype=np.int64)
            for row, i in enumerate(index):
                batch[row, :len(ids[i])] = ids[i]
                mask[row, :len(ids[i])] = 1
            logits = np.asarray(self._logits(batch, mask), dtype=np.float32) / self.temperature
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            out[index] = e / e.sum(axis=1, keepdims=True)
        return out

    def execute(self, requests):
        # The texts of all the batch's good requests run together; a bad request gets its error alone.
        texts, spans, errors = [], [], {}
        for r, request in enumerate(requests):
            try:
                mine = self._texts(request)
            except ValueError as e:
                errors[r] = str(e)
                spans.append((0, 0))
                continue
            spans.append((len(texts), len(texts) + len(mine)))
            texts += mine
        try:
            probs = self._probabilities(texts) if texts else np.zeros((0, len(self.labels)), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 -- answered as an error: the model must keep serving
            return [pb_utils.InferenceResponse(error=_error(f"{type(e).__name__}: {e}")) for _ in requests]
        responses = []
        for r, (start, end) in enumerate(spans):
            if r in errors:
                responses.append(pb_utils.InferenceResponse(error=_error(errors[r], invalid_request=True)))
                continue
            p = probs[start:end]
            best = p.argmax(axis=1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("label", np.array([[self.labels[i].encode()] for i in best], dtype=np.object_)),
                pb_utils.Tensor("probability", p[np.arange(len(best)), best].reshape(-1, 1).astype(np.float32)),
                pb_utils.Tensor("probabilities", p),
            ]))
        return responses
