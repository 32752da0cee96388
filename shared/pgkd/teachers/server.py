"""`pgkd teacher serve`: a simulated teacher served as a Triton LLM model, on a real Triton server.

The model follows the text-in / text-out convention of Triton's vLLM and TensorRT-LLM models
(BYTES `text_input`, optional `max_tokens` and `temperature`; BYTES `text_output`, with the token
counts as `prompt_tokens` / `completion_tokens`), so `--teacher triton://HOST:PORT/teacher` reaches
it exactly as it would reach an LLM. It reads only the prompt, as an LLM would (prompt.read_prompt),
answers with a JSON list drawn from the labeled pool the student never saw, and is a simulation,
not an LLM: its answers say nothing about how well a real LLM writes samples.

The server is PyTriton's bundled tritonserver, on CPU; it needs numpy<2 and the running Python's
LIBDIR on LD_LIBRARY_PATH, which `serve` sets before it starts the server.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import sysconfig
import threading
import time

import numpy as np

from pgkd.data import load_dataset, make_splits
from pgkd.net import DEFAULT_HOST, require_free_ports, triton_host, url_host
from pgkd.errors import EnvironmentFailure
from pgkd.processes import Stopped, adopted_children, child_log, quiet_triton, stop_signals
from pgkd.settings import TritonSettings, read
from pgkd.encoder import EmbeddingCache, loading_bars
from pgkd.teachers.llm import TokenCounter
from pgkd.teachers.classifier import UNKNOWN_TEXTS, SimulatedLLMClassifier, confusable_classes
from pgkd.teachers.prompt import CLASSIFY_INSTRUCTIONS, PromptError, read_classification, read_prompt
from pgkd.teachers.simulated import Simulation, make_simulated_teacher

MODEL_NAME = "teacher"


class SimulatedTeacherModel:
    """The inference function: prompts in, JSON answers out, one request at a time (the teacher
    remembers what it gave, so two requests must not interleave)."""

    def __init__(self, teacher, latency: float = 0.0, classifier=None):
        self.teacher, self.classifier = teacher, classifier
        # Sent with every answer, so the client's report says what answered it.
        self.served_by = json.dumps({**teacher.describe(), "served_by": "pgkd teacher serve (PyTriton)"}).encode()
        self.latency = latency
        self.count_tokens = TokenCounter()
        self._lock = threading.Lock()

    def answer(self, prompt: str) -> str:
        if self.classifier is not None and prompt.startswith(CLASSIFY_INSTRUCTIONS.splitlines()[0]):
            try:
                request = read_classification(prompt)
            except (PromptError, ValueError) as e:
                return f"I cannot answer that: {e}"
            labels, _ = self.classifier.classify(request)
            return json.dumps({"labels": labels}, ensure_ascii=False)
        try:
            request = read_prompt(prompt)
        except (PromptError, ValueError) as e:
            return f"I cannot answer that: {e}"   # chatter, as an LLM would give; the client rejects it
        with self._lock:
            batch = self.teacher.generate(request)
        return json.dumps([s.model_dump() for s in batch.samples], ensure_ascii=False)

    def __call__(self, requests: list[dict]) -> list[dict]:
        if self.latency:      # an LLM's response time, once a batch: an LLM server answers concurrent requests
            time.sleep(self.latency)     # together (continuous batching), not one after the other
        responses = []
        for request in requests:
            prompts = [p.decode("utf-8", errors="replace") if isinstance(p, bytes) else str(p)
                       for p in request["text_input"].reshape(-1)]
            answers = [self.answer(p) for p in prompts]
            responses.append({
                "text_output": np.array([[a.encode()] for a in answers], dtype=object),
                "prompt_tokens": np.array([[self.count_tokens(p)] for p in prompts], dtype=np.int32),
                "completion_tokens": np.array([[self.count_tokens(a)] for a in answers], dtype=np.int32),
                "served_by": np.array([[self.served_by] for _ in answers], dtype=object),
            })
        return responses


@contextlib.contextmanager
def _named_log(log_file):
    """A failure of the teacher's Triton server, in one line that names its log (kept: pgkd.processes.child_log)."""
    try:
        yield
    except EnvironmentFailure:
        raise
    except Exception as e:  # noqa: BLE001 -- PyTriton's errors, whose messages may hold a traceback
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise EnvironmentFailure(f"the simulated teacher's Triton server failed: {type(e).__name__}"
                                 f"{': ' + first[:300] if first else ''}; tritonserver's log: {log_file}") from None


def _quietly(function, *args):
    """The encoder loads without transformers' bars (a server's log says what it serves, not how it loads)."""
    with loading_bars(False):
        return function(*args)


def serve(simulation: Simulation, http_port: int, grpc_port: int, metrics_port: int,
          host: str = DEFAULT_HOST) -> None:
    """Serve on `host` until SIGTERM, SIGHUP or Ctrl-C. The pool is the train split minus the labeled
    samples a run with the same --data, --labeled and --seed trains on, so the simulation never hands the
    student its own samples (the client's screening would reject them anyway)."""
    o = simulation
    triton_log = read(TritonSettings).log       # a bad PGKD_TRITON_LOG is said before anything loads
    dataset = load_dataset(o.data, o.text_column, o.label_column, seed=o.seed)
    splits = make_splits(dataset, o.labeled, o.seed, o.validation_fraction)
    # A port taken (or given twice) is said in one line, before anything loads, not found out by PyTriton,
    # which waits a minute for a tritonserver that exited at once. One taken between this check and Triton's
    # bind still is.
    host = triton_host(host)
    require_free_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    embed = EmbeddingCache()
    teacher = make_simulated_teacher(o.kind, splits.pool, seed=o.seed, label_noise=o.label_noise, embed=embed)
    # The cascade's classification prompts: a simulated LLM that knows every gold label of the dataset (only).
    classifier = SimulatedLLMClassifier(dataset.train + dataset.validation + dataset.test, splits.labels,
                                        o.llm_accuracy, seed=o.seed,
                                        confusable=_quietly(confusable_classes, splits.labels, embed))
    model = SimulatedTeacherModel(teacher, latency=o.latency, classifier=classifier)

    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=5,
                          allow_gpu_metrics=False)
    # SIGTERM (docker stop, kill, make demo's cleanup) and SIGHUP (a closed terminal) leave through the
    # `with Triton`, which stops tritonserver and removes PyTriton's workspace. PyTriton starts tritonserver
    # with SIGTERM as its parent-death signal: a SIGKILL of this process stops it too (the workspace stays,
    # in adopted_children's folder, until the next pgkd server starts).
    serving = False
    with stop_signals(), contextlib.suppress(Stopped), child_log("tritonserver.log", triton_log) as log_file, \
            _named_log(log_file), adopted_children() as folder, \
            quiet_triton(Triton)(config=dataclasses.replace(config, log_file=log_file),
                                 workspace=folder / "pytriton") as triton:
        triton.bind(model_name=MODEL_NAME, infer_func=model,
                    inputs=[Tensor(name="text_input", dtype=bytes, shape=(1,)),
                            Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
                            Tensor(name="temperature", dtype=np.float32, shape=(1,), optional=True)],
                    outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,)),
                             Tensor(name="prompt_tokens", dtype=np.int32, shape=(1,)),
                             Tensor(name="completion_tokens", dtype=np.int32, shape=(1,)),
                             Tensor(name="served_by", dtype=bytes, shape=(1,))],
                    config=ModelConfig(max_batch_size=8, batching=True), strict=False)
        print(f"pgkd: serving the simulated teacher {teacher.name} ({len(splits.pool)} pool texts; a simulation, "
              f"not an LLM) as Triton model '{MODEL_NAME}' on {host}: http :{http_port}, grpc :{grpc_port}; "
              f"--teacher triton://{url_host(host)}:{http_port}/{MODEL_NAME}\n"    # one write: both lines, or none
              f"pgkd: classification prompts (the cascade's) are answered by a simulated LLM of accuracy "
              f"{o.llm_accuracy:g}, not an LLM: {UNKNOWN_TEXTS}", flush=True)
        serving = True
        with contextlib.suppress(KeyboardInterrupt):    # Ctrl-C once serving: the server's normal end
            triton.serve()
    if serving:   # SIGTERM, SIGHUP or Ctrl-C, as `pgkd serve` says it
        print("pgkd: stopped serving the simulated teacher", file=sys.stderr, flush=True)
