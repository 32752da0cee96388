"""`pgkd cascade serve`: the cascade (pgkd.serving.cascade) as a Triton model, beside the student's server.

It runs on a real Triton server (PyTriton's bundled tritonserver, as `pgkd teacher serve` does), so
clients keep the KServe v2 protocol over HTTP and gRPC: `pgkd classify --model-name cascade`, tritonclient
and perf_analyzer work as they do with the student. The model asks the served student (`pgkd serve`,
over its URL) for calibrated probabilities, and the teacher LLM (any teacher URL pgkd takes) for the
texts below the threshold.

Tensors of the model `cascade` (batch dimension first; a request carries one text or several):
    text           BYTES [1]   UTF-8 text
    ->
    label          BYTES [1]   the answer
    probability    FP32  [1]   the student's calibrated confidence in its own label
    probabilities  FP32  [-1]  the student's calibrated probabilities (labels.txt order)
    answered_by    BYTES [1]   student | teacher | error
    student_label  BYTES [1]   the student's label
    teacher_label  BYTES [1]   the teacher's, "" when it was not asked or gave none of the taxonomy
    fallback       BYTES [1]   why a deferred text kept the student's answer (teacher_timeout, ...), or ""
    error          BYTES [1]   what is wrong with the text (empty, too long, not UTF-8), or ""

A bad text is answered in its own row (`answered_by` error, `error` saying what and which), and the
other texts are answered: PyTriton can fail only a whole batch, with a traceback as its message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import sysconfig
import threading
import time

import numpy as np

from pgkd.errors import EnvironmentFailure
from pgkd.net import DEFAULT_HOST, require_free_ports, triton_host, url_host
from pgkd.processes import Stopped, adopted_children, child_log, interrupted, quiet_triton, stop_signals
from pgkd.serving.cascade import ERROR, Answer, Cascade, ServedCalibration
from pgkd.serving.client import STUDENT_UNAVAILABLE
from pgkd.serving.triton_model import check_text
from pgkd.settings import TritonSettings, read
from pgkd.types import MAX_TEXT_CHARS

MODEL_NAME = "cascade"
# PyTriton's start is racy under load: Triton starts the model's instances at once, and the second and later
# ones wait 1 s only for the Unix socket the first one opens (PyTriton's get_config_from_handshake_server);
# one that misses it fails the model's load, and tritonserver may abort with it. Any failure before the
# server serves is tried again with a fresh tritonserver.
START_ATTEMPTS = 5
START_PAUSE = 1.0     # seconds between two attempts
OUTPUTS = ("label", "probability", "probabilities", "answered_by", "student_label", "teacher_label", "fallback",
           "error")


class CascadeModel:
    """The inference function: every text of a batch of requests goes to the student in one call,
    the deferred ones to the teacher together. `student` makes a client for one thread, with
    `infer(texts) -> {"probabilities": ...}` (pgkd.serving.client.StudentClient)."""

    def __init__(self, cascade: Cascade, student, calibrations: ServedCalibration, metrics=None):
        self.cascade, self.calibrations, self.metrics = cascade, calibrations, metrics
        self.labels = calibrations.current.labels
        self._make_student, self._local, self._lock = student, threading.local(), threading.Lock()

    def _student(self):
        if getattr(self._local, "student", None) is None:
            self._local.student = self._make_student()
        return self._local.student

    def answers(self, values: list) -> tuple[list[Answer], np.ndarray]:
        """One answer per value, in order, and the student's probabilities (zeros for a bad value): a bad
        value is an error row, the rest are answered."""
        texts, rows, answers = [], [], [None] * len(values)
        probs = np.zeros((len(values), len(self.labels)), dtype=np.float32)
        for number, value in enumerate(values, start=1):
            try:
                texts.append(check_text(value, number, MAX_TEXT_CHARS))
                rows.append(number - 1)
            except ValueError as e:
                answers[number - 1] = Answer(label="", answered_by=ERROR, confidence=0.0, student_label="",
                                             error=str(e))
        if texts:
            result = self._student().infer(texts)
            self._follow(result["version"])
            student = np.asarray(result["probabilities"], dtype=np.float32)
            if student.shape[1] != probs.shape[1]:    # a version whose calibration could not be read
                probs = np.zeros((len(values), student.shape[1]), dtype=np.float32)
            probs[rows] = student
            for row, answer in zip(rows, self.cascade.answer(texts, result["label"], result["probability"])):
                answers[row] = answer
        if self.metrics is not None:
            self.metrics.texts.labels(ERROR).inc(sum(a.answered_by == ERROR for a in answers))
        return answers, probs

    def _follow(self, version: str) -> None:
        """A new version of the student answers: its labels and threshold, from its calibration."""
        with self._lock:
            calibration = self.calibrations.for_version(version)
            if calibration is not None:
                self.labels = self.cascade.labels = list(calibration.labels)
                self.cascade.policy.recalibrate(calibration)

    def __call__(self, requests: list[dict]) -> list[dict]:
        began = time.perf_counter()
        values = [request["text"].reshape(-1) for request in requests]
        flat = [v for request_values in values for v in request_values]
        try:
            answers, probs = self.answers(flat)
        except Exception as e:  # noqa: BLE001 -- the student unreachable: every text says so, the server goes on
            message = f"{STUDENT_UNAVAILABLE}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
            answers = [Answer(label="", answered_by=ERROR, confidence=0.0, student_label="", error=message)
                       for _ in flat]
            probs = np.zeros((len(flat), len(self.labels)), dtype=np.float32)
            if self.metrics is not None:
                self.metrics.texts.labels(ERROR).inc(len(flat))
        if self.metrics is not None:
            self.metrics.request_latency.observe(time.perf_counter() - began)
        responses, start = [], 0
        for request_values in values:
            end = start + len(request_values)
            responses.append(self._response(answers[start:end], probs[start:end]))
            start = end
        return responses

    @staticmethod
    def _response(answers: list[Answer], probs: np.ndarray) -> dict:
        def column(name: str) -> np.ndarray:
            return np.array([[getattr(a, name).encode("utf-8")] for a in answers], dtype=object)
        return {"label": column("label"), "answered_by": column("answered_by"),
                "student_label": column("student_label"), "teacher_label": column("teacher_label"),
                "fallback": column("fallback"), "error": column("error"),
                "probability": np.array([[a.confidence] for a in answers], dtype=np.float32),
                "probabilities": probs}


# Seconds tritonserver takes at a stop to finish in-flight requests and unload the model. Its Python backend
# finalizes the instances one after another, and PyTriton's stub takes about 2 s each (8 instances: 16 s);
# a tritonserver that exits before leaves its /tmp/python_env_XXXXXX behind, which nothing can tell apart
# from another server's. Within Kubernetes' default grace of 30 s (docker-compose.yml sets the cascade's).
EXIT_TIMEOUT = 25


def serve(model: CascadeModel, http_port: int, grpc_port: int, metrics_port: int, host: str = DEFAULT_HOST,
          instances: int = 8, max_batch_size: int = 64, announce: str = "") -> None:
    """Serve `model` on `host` until SIGTERM, SIGHUP or Ctrl-C (PyTriton's tritonserver, CPU). A start that
    fails is tried again with a fresh tritonserver, up to START_ATTEMPTS times: EnvironmentFailure (one line)
    when none serves, or when the server fails once it serves."""
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

    host = triton_host(host)
    require_free_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=EXIT_TIMEOUT,
                          allow_gpu_metrics=False)
    outputs = [Tensor(name=n, dtype=np.float32, shape=(-1,) if n == "probabilities" else (1,))
               if n.startswith("probabilit") else Tensor(name=n, dtype=bytes, shape=(1,)) for n in OUTPUTS]
    # PyTriton restricts Triton's statistics API (and the repository, shared memory, trace and logging ones) to
    # a token of its own; perf_analyzer reads the statistics, which say nothing a client should not know. The
    # others stay restricted: nobody loads or unloads models on the cascade's server.
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    # tritonserver's log goes to a file (pgkd.processes.child_log), not to the terminal; a failure names it
    serving = False
    with stop_signals(), contextlib.suppress(Stopped), \
            child_log("tritonserver.log", read(TritonSettings).log) as log_file:
        for attempt in range(1, START_ATTEMPTS + 1):
            serving = False
            try:
                with adopted_children() as folder, contextlib.ExitStack() as stack:
                    triton = quiet_triton(Triton)(config=dataclasses.replace(config, log_file=log_file),
                                                  security_config=security, workspace=folder / "pytriton")
                    stack.callback(triton.stop)    # also when the start fails: its tritonserver and workspace
                    triton.run()
                    # No dynamic batching: a request batched with others would wait for their texts' teacher
                    # answers too (a student answer would take the LLM's time). Each request is one execution,
                    # its texts one call to the student (whose own server batches across the cascade's calls),
                    # and `instances` of them run at once.
                    triton.bind(model_name=MODEL_NAME, infer_func=[model] * instances,
                                inputs=[Tensor(name="text", dtype=bytes, shape=(1,))], outputs=outputs,
                                config=ModelConfig(max_batch_size=max_batch_size, batching=True, batcher=None),
                                strict=False)
                    serving = True
                    print(f"pgkd: serving the cascade as Triton model '{MODEL_NAME}' on {host}: http :{http_port}, "
                          f"grpc :{grpc_port}; pgkd classify --url http://{url_host(host)}:{http_port} --model-name "
                          f"{MODEL_NAME}" + (f"; {announce}" if announce else ""), flush=True)
                    with contextlib.suppress(KeyboardInterrupt):   # Ctrl-C once serving: the server's normal end
                        triton.serve()
                break
            except Exception as e:  # noqa: BLE001 -- a failed start is tried again; a failure once serving is not
                if interrupted():   # a Ctrl-C that PyTriton turned into a failed load: an interruption, not retried
                    raise KeyboardInterrupt from None
                if serving:
                    raise EnvironmentFailure(f"the cascade's Triton server failed while serving: "
                                             f"{summary(e)}; tritonserver's log: {log_file}") from None
                if attempt == START_ATTEMPTS:
                    raise EnvironmentFailure(f"the cascade's Triton server failed to start, attempt {attempt} of "
                                             f"{START_ATTEMPTS}: {summary(e)}; tritonserver's log: {log_file}") from None
                print(f"pgkd: the cascade's Triton server failed to start, attempt {attempt} of {START_ATTEMPTS} "
                      f"({summary(e)}); starting again", flush=True)
                # A port another program took meanwhile is said at once (PyTriton waits minutes for a server
                # that could not bind it); ours are closed, its tritonserver is gone.
                require_free_ports(host, {"--http-port": http_port, "--grpc-port": grpc_port,
                                          "--metrics-port": metrics_port})
                time.sleep(START_PAUSE)
    if serving:   # SIGTERM, SIGHUP or Ctrl-C, as `pgkd serve` says it
        print("pgkd: stopped serving the cascade", file=sys.stderr, flush=True)


def summary(error: Exception) -> str:
    """An exception in one line: its type and the first line of its message (PyTriton's may hold a traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
