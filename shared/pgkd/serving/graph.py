"""A student as one graph, tokens in, logits out: ONNX (fp32, or dynamic int8) or TorchScript.

Both kinds of student become the same function of (input_ids, attention_mask): the fine-tuned
student is its sequence-classification model; the frozen-encoder student is MiniLM, mean pooling,
unit length and its linear head, exactly what `FrozenEncoderStudent.predict_proba` computes.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from pgkd.students.finetuned import FineTunedStudent

ONNX_OPSET = 17


class _FineTunedLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _FrozenEncoderLogits(torch.nn.Module):
    def __init__(self, encoder, coef: np.ndarray, intercept: np.ndarray):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(coef.shape[1], coef.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.asarray(coef, dtype=np.float32)))
            self.head.bias.copy_(torch.from_numpy(np.asarray(intercept, dtype=np.float32)))

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(torch.nn.functional.normalize(pooled, dim=-1))


def tokenizer_of(student):
    """The Hugging Face tokenizer the student's texts go through."""
    return student.tokenizer if isinstance(student, FineTunedStudent) else student.embed.encoder.tokenizer


def logits_module(student) -> torch.nn.Module:
    """The student's inference as a torch module on the CPU, in eval mode (the student's own model
    is not moved: a copy is made when it lives elsewhere)."""
    if isinstance(student, FineTunedStudent):
        model = student.model if student.device.type == "cpu" else _cpu_copy(student.model)
        return _FineTunedLogits(model).eval()
    encoder = student.embed.encoder.model
    encoder = encoder if encoder.device.type == "cpu" else _cpu_copy(encoder)
    return _FrozenEncoderLogits(encoder, student.coef, student.intercept).eval()


def _cpu_copy(model):
    import copy
    return copy.deepcopy(model).to("cpu")


def _example(student):
    batch = tokenizer_of(student)(["an example text", "another"], padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def export_onnx(student, path: Path) -> Path:
    """The student as an ONNX graph with dynamic batch and sequence length. The TorchScript-based
    exporter: the dynamo one needs onnxscript and gives the same graph for these models. Its tracer
    warnings are about Python branches in transformers' masking code that do not depend on the
    inputs' values (the tests compare the graph's answers with the student's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(logits_module(student), _example(student), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    return path


def quantize_int8(fp32: Path, int8: Path) -> Path:
    """Dynamic int8 quantization of the matrix multiplies, with a scale per output channel: on the demo
    student per-tensor scales lost 3 points of validation accuracy (per-channel: 1), BENCHMARKS.md."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    return int8


def export_torchscript(student, path: Path) -> Path:
    """The student traced to TorchScript (runs in torch alone, or in Triton's PyTorch backend)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(logits_module(student), _example(student), strict=False, check_trace=False)
    traced.save(str(path))
    return path
