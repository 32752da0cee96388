"""The Triton model repository of the teacher LLM (deploy/triton/models/teacher).

- config.pbtxt parses into Triton's ModelConfig and declares the text-in / text-out tensors of Triton's
  vLLM and TensorRT-LLM models, plus the token counts;
- model.py runs in a REAL tritonserver (the one bundled in nvidia-pytriton, with its Python backend),
  serving a tiny randomly initialised Llama with the MiniLM BERT tokenizer, over HTTP and gRPC.
"""
from __future__ import annotations

import ast
import json
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from triton_server import (
    DEPLOY_MODELS,
    RunningTriton,
    build_tiny_causal_lm,
    copy_model_repository,
    run_tritonserver,
    tritonserver_unavailable_reason,
)

CONFIG = DEPLOY_MODELS / "teacher" / "config.pbtxt"
MODEL_PY = DEPLOY_MODELS / "teacher" / "1" / "model.py"
DT = model_config_pb2.DataType
MODEL = "teacher"
TEST_DEFAULT_MAX_TOKENS = 4  # default_max_tokens in the test copy of the repository
PROMPT = "my card was stolen yesterday, how do i block it?"


def parse_config(path: Path = CONFIG) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


# --- the repository's files, offline ---------------------------------------------------------------

def test_config_pbtxt_declares_the_text_in_text_out_contract():
    config = parse_config()
    assert config.name == MODEL and config.backend == "python"
    assert config.max_batch_size == 8

    inputs = {i.name: (i.data_type, list(i.dims), i.optional) for i in config.input}
    assert inputs == {
        "text_input": (DT.TYPE_STRING, [1], False),
        "max_tokens": (DT.TYPE_INT32, [1], True),
        "temperature": (DT.TYPE_FP32, [1], True),
    }
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {
        "text_output": (DT.TYPE_STRING, [1]),
        "prompt_tokens": (DT.TYPE_INT32, [1]),
        "completion_tokens": (DT.TYPE_INT32, [1]),
    }

    assert config.HasField("dynamic_batching")
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 100_000
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_AUTO]
    assert all(g.count >= 1 for g in config.instance_group)

    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert set(parameters) == {"model_name_or_path", "default_max_tokens"}
    assert parameters["model_name_or_path"] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert int(parameters["default_max_tokens"]) > 0


def test_model_py_defines_the_python_backend_interface():
    tree = ast.parse(MODEL_PY.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    methods = {node.name for node in classes["TritonPythonModel"].body if isinstance(node, ast.FunctionDef)}
    assert {"initialize", "execute", "finalize"} <= methods


def test_copy_model_repository_points_the_copy_at_another_model_and_leaves_the_original(tmp_path):
    before = CONFIG.read_bytes()
    copy = copy_model_repository(tmp_path / "models", model_name_or_path=tmp_path / "lm",
                                 parameters={"default_max_tokens": "7"})
    assert CONFIG.read_bytes() == before
    copied = parse_config(copy / MODEL / "config.pbtxt")
    assert copied.parameters["model_name_or_path"].string_value == str(tmp_path / "lm")
    assert copied.parameters["default_max_tokens"].string_value == "7"
    # Everything else is the original's.
    copied.ClearField("parameters")
    original = parse_config()
    original.ClearField("parameters")
    assert copied == original
    assert (copy / MODEL / "1" / "model.py").read_bytes() == MODEL_PY.read_bytes()


# --- in the real tritonserver ----------------------------------------------------------------------

@dataclass
class Served:
    server: RunningTriton
    model_path: Path
    tokenizer: object

    def prompt_tokens(self, text: str) -> int:
        # The tiny model's tokenizer has no chat template: the model tokenizes the raw text.
        return len(self.tokenizer(text)["input_ids"])


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    reason = tritonserver_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("triton")
    model_path = build_tiny_causal_lm(root / "tiny-lm")
    repository = copy_model_repository(root / "models", model_name_or_path=model_path,
                                       parameters={"default_max_tokens": str(TEST_DEFAULT_MAX_TOKENS)})
    # --disable-auto-complete-config: the config is complete, and the Python backend then skips a first
    # stub process that would only import model.py to ask it for config additions (seconds on CPU).
    with run_tritonserver(repository, workdir=root / "server", timeout_s=120,
                          extra_args=["--disable-auto-complete-config"]) as server:
        yield Served(server, model_path, AutoTokenizer.from_pretrained(model_path))


def http_inputs(texts: list[str], max_tokens: list[int] | None = None,
                temperature: list[float] | None = None, module=httpclient) -> list:
    """One request with len(texts) rows (shape [n, 1]), as a vLLM / TensorRT-LLM client sends them."""
    n = len(texts)
    text = module.InferInput("text_input", [n, 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_))
    inputs = [text]
    if max_tokens is not None:
        tensor = module.InferInput("max_tokens", [n, 1], "INT32")
        tensor.set_data_from_numpy(np.array(max_tokens, dtype=np.int32).reshape(n, 1))
        inputs.append(tensor)
    if temperature is not None:
        tensor = module.InferInput("temperature", [n, 1], "FP32")
        tensor.set_data_from_numpy(np.array(temperature, dtype=np.float32).reshape(n, 1))
        inputs.append(tensor)
    return inputs


def unpack(result) -> list[tuple[str, int, int]]:
    texts = result.as_numpy("text_output")
    prompt = result.as_numpy("prompt_tokens")
    completion = result.as_numpy("completion_tokens")
    assert texts.dtype == np.object_ and prompt.dtype == np.int32 and completion.dtype == np.int32
    assert texts.shape == prompt.shape == completion.shape == (len(texts), 1)
    return [(t.decode("utf-8"), int(p), int(c)) for t, p, c in zip(texts[:, 0], prompt[:, 0], completion[:, 0])]


def assert_completion(served: Served, prompt: str, output: tuple[str, int, int], max_tokens: int):
    text, prompt_tokens, completion_tokens = output
    assert text.strip(), "empty text_output"
    # Only the new text: an echo (vLLM's default without exclude_input_in_output) starts with the prompt.
    assert not text.strip().startswith(prompt), "text_output echoes the prompt"
    assert prompt_tokens == served.prompt_tokens(prompt) > 0
    assert 0 < completion_tokens <= max_tokens
    # The tiny model has no EOS token: it always generates exactly max_tokens.
    assert completion_tokens == max_tokens


def test_model_loads_and_its_metadata_lists_the_tensors(served):
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready(MODEL)
        metadata = client.get_model_metadata(MODEL)
        config = client.get_model_config(MODEL)
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {
        "text_output": "BYTES", "prompt_tokens": "INT32", "completion_tokens": "INT32"}
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {
        "text_input": "BYTES", "max_tokens": "INT32", "temperature": "FP32"}
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config

    grpc_client = grpcclient.InferenceServerClient(served.server.grpc_url)
    try:
        grpc_metadata = grpc_client.get_model_metadata(MODEL)
    finally:
        grpc_client.close()
    assert [o.name for o in grpc_metadata.outputs] == ["text_output", "prompt_tokens", "completion_tokens"]


def test_http_infer_returns_only_the_new_text_and_the_token_counts(served):
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        first = unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[8])))
        again = unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[8])))
    assert_completion(served, PROMPT, first[0], max_tokens=8)
    assert again == first  # no temperature: greedy, deterministic


def test_grpc_infer_matches_http(served):
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        over_http = unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[8])))
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    try:
        over_grpc = unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[8], module=grpcclient)))
    finally:
        client.close()
    assert_completion(served, PROMPT, over_grpc[0], max_tokens=8)
    assert over_grpc == over_http


def test_without_max_tokens_the_default_max_tokens_parameter_applies(served):
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        (output,) = unpack(client.infer(MODEL, http_inputs([PROMPT])))
    assert_completion(served, PROMPT, output, max_tokens=TEST_DEFAULT_MAX_TOKENS)


def test_generate_endpoint_speaks_the_same_convention(served):
    """Triton's generate extension (POST /v2/models/teacher/generate with JSON), as in vLLM's docs."""
    body = json.dumps({"text_input": PROMPT, "max_tokens": 5}).encode("utf-8")
    request = urllib.request.Request(f"http://{served.server.http_url}/v2/models/{MODEL}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert_completion(served, PROMPT, (answer["text_output"], answer["prompt_tokens"], answer["completion_tokens"]),
                      max_tokens=5)


def test_temperature_above_zero_samples(served):
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        outputs = [unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[8], temperature=[1.5])))[0]
                   for _ in range(3)]
    for output in outputs:
        assert_completion(served, PROMPT, output, max_tokens=8)
    # Sampling 8 tokens from a 30522-token vocabulary three times: the same text thrice would mean greedy.
    assert len({text for text, _, _ in outputs}) > 1


def test_one_request_with_several_rows_and_settings(served):
    prompts = ["refund my money please", "hi", "how do i change the pin code of my card today"]
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        outputs = unpack(client.infer(MODEL, http_inputs(prompts, max_tokens=[2, 5, 3])))
    for prompt, output, max_tokens in zip(prompts, outputs, [2, 5, 3]):
        assert_completion(served, prompt, output, max_tokens)


def test_concurrent_requests_with_mixed_settings_all_succeed(served):
    """Concurrent requests go through the dynamic batcher, so execute() gets several at once: those
    with the same settings are generated as one left-padded batch, the others separately."""
    cases = [  # (prompt, max_tokens, temperature)
        ("send money to my account", 6, None),
        ("i lost my wallet and my card", 6, None),
        ("please reset my pin", 3, None),
        ("where is my refund", 6, 0.8),
        ("wire transfer to a new payee now", 6, None),
        ("my card is missing", 3, None),
    ]
    barrier = threading.Barrier(len(cases))
    results: dict[int, object] = {}

    def call(index: int) -> None:
        prompt, max_tokens, temperature = cases[index]
        try:
            with httpclient.InferenceServerClient(served.server.http_url) as client:  # one client per thread
                inputs = http_inputs([prompt], [max_tokens], None if temperature is None else [temperature])
                barrier.wait(timeout=30)
                results[index] = unpack(client.infer(MODEL, inputs))[0]
        except Exception as error:  # reported below, with the others
            results[index] = error

    def counts() -> tuple[int, int]:
        with httpclient.InferenceServerClient(served.server.http_url) as client:
            stats = client.get_inference_statistics(MODEL)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])

    # The statistics of the tests before may still be arriving (see below): take them once they are still.
    inferences_before, executions_before = counts()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = counts()
        if now == (inferences_before, executions_before):
            break
        inferences_before, executions_before = now
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors and len(results) == len(cases), errors
    for index, (prompt, max_tokens, _) in enumerate(cases):
        assert_completion(served, prompt, results[index], max_tokens)
    # The dynamic batcher did batch: fewer execute() calls than requests. (Requests that arrive while
    # one is being generated queue up and are delivered together.)
    # Triton updates its statistics after it has sent a response, so the last one may lag: wait for it.
    deadline = time.monotonic() + 10
    inferences, executions = counts()
    while inferences - inferences_before < len(cases) and time.monotonic() < deadline:
        time.sleep(0.1)
        inferences, executions = counts()
    assert inferences - inferences_before == len(cases)
    assert executions - executions_before < len(cases)


def test_a_bad_request_fails_alone_and_the_model_keeps_serving(served):
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        with pytest.raises(InferenceServerException, match="max_tokens"):
            client.infer(MODEL, http_inputs([PROMPT], max_tokens=[0]))
        with pytest.raises(InferenceServerException, match="temperature"):
            client.infer(MODEL, http_inputs([PROMPT], max_tokens=[4], temperature=[-1.0]))
        (output,) = unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[4])))
        assert client.is_model_ready(MODEL)
    assert_completion(served, PROMPT, output, max_tokens=4)
    assert served.server.process.poll() is None


def test_the_environment_variable_pgkd_teacher_model_overrides_the_parameter_and_chat_templates_apply(tmp_path):
    """PGKD_TEACHER_MODEL reaches model.py through tritonserver and its Python-backend stub, and wins
    over model_name_or_path (here a folder that does not exist: loading it would fail). The model it
    names has a chat template: the prompt is sent as a user message, which the token count shows."""
    if tritonserver_unavailable_reason():
        pytest.skip(tritonserver_unavailable_reason())
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}[CLS] {{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
                "{% if add_generation_prompt %}assistant :{% endif %}")
    model_path = build_tiny_causal_lm(tmp_path / "chat-lm", seed=1, chat_template=template)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    expected_prompt_tokens = len(tokenizer(chat, add_special_tokens=False)["input_ids"])
    assert expected_prompt_tokens > len(tokenizer(PROMPT)["input_ids"])  # the template adds tokens

    repository = copy_model_repository(tmp_path / "models", model_name_or_path=tmp_path / "no-such-model")
    with run_tritonserver(repository, workdir=tmp_path / "server", timeout_s=120,
                          env={"PGKD_TEACHER_MODEL": str(model_path)},
                          extra_args=["--disable-auto-complete-config"]) as server:
        with httpclient.InferenceServerClient(server.http_url) as client:
            (output,) = unpack(client.infer(MODEL, http_inputs([PROMPT], max_tokens=[3])))
        assert f"teacher: {model_path} on " in server.log()  # model.py logs what it loaded
        assert "chat template: True" in server.log()
    text, prompt_tokens, completion_tokens = output
    assert text.strip() and not text.strip().startswith(PROMPT)
    assert prompt_tokens == expected_prompt_tokens and completion_tokens == 3
