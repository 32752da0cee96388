"""The pgkd teacher LLM as a Triton Python-backend model.

A Hugging Face causal LM behind the text-in / text-out convention of Triton's vLLM and TensorRT-LLM
models (see config.pbtxt for the tensors). Parameters, from config.pbtxt:

- model_name_or_path: hub id or local folder; the environment variable PGKD_TEACHER_MODEL overrides it.
- default_max_tokens: max_new_tokens for requests that do not send max_tokens.

Requests that Triton's dynamic batcher delivers together are generated as one left-padded batch per
group of identical settings (max_tokens, temperature). A failure is answered with a TritonError for
the requests concerned; it never takes the model down.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_MAX_TOKENS = 1024


@dataclass
class _Job:
    """One prompt: a row of one request (a request may carry several rows, shape [n, 1])."""

    request: int  # index of the request in execute()'s list
    row: int
    text: str
    max_tokens: int
    temperature: float


def _parameter(model_config: dict, key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _rows(request, name: str, batch: int) -> np.ndarray | None:
    """The optional input `name` as one value per row, or None when the request did not send it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size == 1 and batch > 1:  # one setting for all the rows of the request
        values = np.repeat(values, batch)
    if values.size != batch:
        raise ValueError(f"{name} has {values.size} values for {batch} prompts")
    return values


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.model_name = os.environ.get("PGKD_TEACHER_MODEL") or _parameter(
            model_config, "model_name_or_path", DEFAULT_MODEL)
        self.default_max_tokens = int(_parameter(model_config, "default_max_tokens", str(DEFAULT_MAX_TOKENS)))

        # Triton says where this instance lives: with KIND_AUTO it is a GPU instance (with its device id)
        # whenever Triton sees GPUs. An explicit KIND_CPU instance stays on the CPU even if torch sees one.
        kind = args.get("model_instance_kind", "")
        if torch.cuda.is_available() and kind != "CPU":
            self.device = torch.device("cuda", int(args.get("model_instance_device_id", 0) or 0))
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.device = torch.device("cpu")
            dtype = torch.float32  # half precision on CPU is slow or unsupported for many ops

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        # Decoder-only models continue from the last position, so a padded batch must be padded on
        # the left for every prompt to end right where generation starts.
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=dtype)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is not None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            else:
                self.tokenizer.add_special_tokens({"pad_token": "<pad>"})
                self.model.resize_token_embeddings(len(self.tokenizer))
        self.model.to(self.device).eval()

        # Token ids that end a completion: counted as generated tokens (as vLLM and OpenAI do), and
        # whatever follows them in a padded batch is padding, not output.
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

        pb_utils.Logger.log_info(
            f"teacher: {self.model_name} on {self.device} ({dtype}), "
            f"chat template: {self.use_chat_template}, default_max_tokens: {self.default_max_tokens}")

    # --- execute -------------------------------------------------------------------------------------

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        results: list[dict[int, tuple[str, int, int]]] = [{} for _ in requests]
        sizes: list[int] = [0] * len(requests)
        jobs: list[_Job] = []

        for index, request in enumerate(requests):
            try:
                request_jobs = self._jobs(index, request)
            except Exception as error:  # a malformed request fails alone
                responses[index] = self._error(error)
                continue
            sizes[index] = len(request_jobs)
            jobs.extend(request_jobs)

        # One generate() call per group of identical settings: max_new_tokens and sampling are
        # arguments of the whole call, not per row.
        groups: dict[tuple[int, float], list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.max_tokens, job.temperature), []).append(job)

        failed: dict[int, Exception] = {}
        for (max_tokens, temperature), group in groups.items():
            try:
                outputs = self._generate([job.text for job in group], max_tokens, temperature)
            except Exception:
                # Retry one by one, so that a prompt that breaks the batch (too long for the model,
                # say) fails alone instead of failing its neighbours.
                outputs = []
                for job in group:
                    try:
                        outputs.extend(self._generate([job.text], max_tokens, temperature))
                    except Exception as error:
                        failed.setdefault(job.request, error)
                        outputs.append(None)
            for job, output in zip(group, outputs):
                if output is not None:
                    results[job.request][job.row] = output

        for index in range(len(requests)):
            if responses[index] is not None:
                continue
            if index in failed:
                responses[index] = self._error(failed[index])
                continue
            rows = [results[index][row] for row in range(sizes[index])]
            responses[index] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("text_output",
                                np.array([[text.encode("utf-8")] for text, _, _ in rows], dtype=np.object_)),
                pb_utils.Tensor("prompt_tokens", np.array([[p] for _, p, _ in rows], dtype=np.int32)),
                pb_utils.Tensor("completion_tokens", np.array([[c] for _, _, c in rows], dtype=np.int32)),
            ])
        return responses

    def _jobs(self, index: int, request) -> list[_Job]:
        texts = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        batch = texts.size
        max_tokens = _rows(request, "max_tokens", batch)
        temperature = _rows(request, "temperature", batch)
        jobs = []
        for row, raw in enumerate(texts):
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            tokens = self.default_max_tokens if max_tokens is None else int(max_tokens[row])
            if tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {tokens}")
            temp = 0.0 if temperature is None else float(temperature[row])
            if not np.isfinite(temp) or temp < 0:
                raise ValueError(f"temperature must be a finite number >= 0, got {temp}")
            jobs.append(_Job(index, row, text, tokens, temp))
        return jobs

    def _prompt(self, text: str) -> str:
        if self.use_chat_template:  # instruct models answer a user turn, not a raw continuation
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    @torch.inference_mode()
    def _generate(self, texts: list[str], max_tokens: int, temperature: float) -> list[tuple[str, int, int]]:
        """(new text, prompt tokens, completion tokens) for each text."""
        prompts = [self._prompt(text) for text in texts]
        # The chat template already contains the special tokens (BOS and the like) where the model wants them.
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                 add_special_tokens=not self.use_chat_template).to(self.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        # Only ids and mask: some tokenizers also return token_type_ids, which causal LMs reject.
        generated = self.model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                        max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                        **sampling)
        # With left padding every row's prompt ends at the same column: what follows is new.
        new_tokens = generated[:, encoded["input_ids"].shape[1]:].tolist()
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()

        outputs = []
        for tokens, prompt_length in zip(new_tokens, prompt_lengths):
            length = len(tokens)
            for position, token in enumerate(tokens):
                if token in self.eos_ids:  # the rest of the row is padding of the batch
                    length = position + 1
                    break
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            outputs.append((text, int(prompt_length), length))
        return outputs

    @staticmethod
    def _error(error: Exception):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))

    def finalize(self) -> None:
        # Drop the weights now rather than at interpreter exit, and give the GPU memory back.
        self.model = None
        self.tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
