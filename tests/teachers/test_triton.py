"""The teacher through a real Triton server: `pgkd teacher serve` (PyTriton's bundled tritonserver,
on CPU) serving the simulated teacher, called by `pgkd distill --teacher triton://...` over HTTP and
gRPC; and the fault paths: the server going away mid-run, a timeout, labels outside the taxonomy."""
import json
import subprocess
import sys
import sysconfig
import time
from typing import IO

import numpy as np
import pytest
from conftest import make_toy_dataset
from pgkd import processes
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.net import free_port, free_ports

TINY = ["--labeled", "40", "--student", "tiny", "--samples-per-cycle", "8", "--epochs", "2", "--cycle-epochs", "1",
        "--learning-rate", "1e-2", "--head-learning-rate", "1e-2", "--batch-size", "16", "--seed", "1",
        "--teacher-cache", "none", "--no-progress"]


def wait_ready(http_url: str, process: subprocess.Popen, log, timeout: float = 120) -> None:
    import tritonclient.http as http
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the teacher server exited:\n{open(log.name).read()[-3000:]}"
        try:
            if http.InferenceServerClient(http_url).is_model_ready("teacher"):
                return
        except Exception:
            pass
        time.sleep(0.5)
    pytest.fail(f"the teacher server was not ready after {timeout} s:\n{open(log.name).read()[-3000:]}")


class TeacherServer:
    def __init__(self, data, folder, *extra: str):
        self.http_port, self.grpc_port = free_ports(2)
        self.log = (folder / f"teacher-{self.http_port}.log").open("w")
        self.process = processes.spawn(
            [sys.executable, "-m", "pgkd.cli", "teacher", "serve", "--kind", "pool-random", "--data", str(data),
             "--labeled", "40", "--seed", "1", "--http-port", str(self.http_port), "--grpc-port",
             str(self.grpc_port), "--metrics-port", str(free_port()), *extra], log=self.log)
        wait_ready(f"127.0.0.1:{self.http_port}", self.process, self.log)

    def kill(self) -> None:
        """The whole server at once: no time given to stop in order."""
        processes.stop(self.process, timeout=0)
        self.log.close()


@pytest.fixture
def toy(tmp_path):
    return make_toy_dataset(tmp_path / "toy")


@pytest.fixture
def teacher_server(toy, tmp_path):
    servers = []

    def start(*extra: str) -> TeacherServer:
        servers.append(TeacherServer(toy, tmp_path, *extra))
        return servers[-1]
    yield start
    for server in servers:
        server.kill()


def distill(data, out, teacher: str, *extra: str, log: IO | None = None):
    """`pgkd distill`, waited for; with `log`, started in the background, its output to `log`."""
    command = [sys.executable, "-m", "pgkd.cli", "distill", "--data", str(data), "--out", str(out),
               "--teacher", teacher, *TINY, *extra]
    if log is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    return processes.spawn(command, log=log)


def test_distill_through_triton_over_http_and_grpc(teacher_server, toy, tmp_path):
    server = teacher_server()
    for scheme, port in (("triton", server.http_port), ("triton+grpc", server.grpc_port)):
        out = tmp_path / scheme
        result = distill(toy, out, f"{scheme}://127.0.0.1:{port}/teacher", "--max-cycles", "2")
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        usage = report["teacher_usage"]
        assert usage["calls"] == 2 and usage["prompt_tokens"] > 500 and usage["completion_tokens"] > 50
        assert usage["seconds"] > 0 and usage["errors"] == {}
        assert [c["accepted"] for c in report["cycles"]] == [0, 8, 8]
        assert report["cycles"][1]["teacher_usage"]["calls"] == 1
        # The model says what it is: the report calls the simulation a simulation.
        assert report["teacher"]["simulated"] is True and report["teacher"]["served_model"]["name"] == "pool-random"
        # and so does the run's output, once, at its first answer (make demo's console never said it)
        said = [line for line in result.stderr.splitlines() if "is a simulation" in line]
        assert said == [f"pgkd: the teacher at {scheme}://127.0.0.1:{port}/teacher is a simulation, not an LLM "
                        "(pool-random)"], result.stderr


def test_a_teacher_server_that_goes_away_mid_run_ends_the_run_clearly(teacher_server, toy, tmp_path):
    server = teacher_server("--latency", "1")
    started = time.monotonic()
    output = tmp_path / "distill.log"
    with output.open("w") as log:
        process = distill(toy, tmp_path / "run", f"triton://127.0.0.1:{server.http_port}/teacher", "--max-cycles",
                          "6", "--teacher-retries", "1", "--teacher-timeout", "10", log=log)
    try:
        while "\ncycle  1:" not in output.read_text():
            assert process.poll() is None and time.monotonic() - started < 120, output.read_text()
            time.sleep(0.1)
        server.kill()
        process.wait(120)
    finally:
        processes.stop(process)
    out = output.read_text()     # stdout and stderr
    assert process.returncode == 1, out
    assert time.monotonic() - started < 120          # no hang
    report = json.loads((tmp_path / "run" / "report.json").read_text())   # what was done is kept
    assert report["stop_reason"].startswith("teacher_unavailable: teacher triton://127.0.0.1")
    assert 2 <= len(report["cycles"]) < 7 and "stopped: teacher_unavailable" in out


def test_a_teacher_slower_than_the_timeout_fails_the_cycle_without_hanging(teacher_server, toy, tmp_path):
    server = teacher_server("--latency", "3")
    result = distill(toy, tmp_path / "run", f"triton+grpc://127.0.0.1:{server.grpc_port}/teacher",
                     "--max-cycles", "3", "--teacher-retries", "1", "--teacher-timeout", "0.5")
    assert result.returncode == 1, result.stderr       # a hang would be caught by pytest-timeout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "timeout: no answer within 0.5 s" in report["stop_reason"] and len(report["cycles"]) == 1


def test_labels_outside_the_taxonomy_are_rejected_and_counted(toy, tmp_path, monkeypatch):
    """A Triton model (PyTriton, in this process) that answers with labels the taxonomy lacks."""
    monkeypatch.setenv("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"))
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    def answer(requests):
        wrong = json.dumps([{"text": f"order number {i} for a pizza", "label": "pizza"} for i in range(6)]
                           + [{"text": "i want my money back please", "label": "refund"}])
        return [{"text_output": np.array([[wrong.encode()]] * len(r["text_input"]), dtype=object)} for r in requests]

    port = free_port()
    with Triton(config=TritonConfig(http_port=port, grpc_port=free_port(), metrics_port=free_port())) as triton:
        triton.bind(model_name="teacher", infer_func=answer,
                    inputs=[Tensor(name="text_input", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
                    config=ModelConfig(max_batch_size=4), strict=False)
        triton.run()
        config = DistillConfig(data=str(toy), labeled=40, student="tiny", teacher=f"triton://127.0.0.1:{port}/teacher",
                               samples_per_cycle=7, max_cycles=1, epochs=2, cycle_epochs=1, learning_rate=1e-2,
                               head_learning_rate=1e-2, batch_size=16, teacher_cache="none")
        report = run(config, tmp_path / "run", progress=False).report
    cycle = report.cycles[1]
    assert (cycle.generated, cycle.accepted, cycle.rejected) == (7, 1, {"unknown_label": 6})
    assert report.teacher_usage.prompt_tokens > 0       # no token counts from this model: counted here
    assert report.teacher["simulated"] is False and report.stop_reason.startswith("max_cycles")


def test_the_deployed_python_backend_model_answers_garbage_and_the_run_records_it(toy, tmp_path):
    """deploy/triton's model with a tiny random causal LM: its answers are not JSON, so every one is
    rejected (after one repair request each), the cycles record it, and the run stops on its policy."""
    from triton_server import build_tiny_causal_lm, copy_model_repository, run_tritonserver
    model = build_tiny_causal_lm(tmp_path / "lm")
    repository = copy_model_repository(tmp_path / "models", model_name_or_path=model)
    with run_tritonserver(repository, extra_args=["--disable-auto-complete-config"]) as server:
        result = distill(toy, tmp_path / "run", f"triton://{server.http_url}/teacher", "--max-cycles", "2",
                         "--teacher-max-tokens", "16")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for cycle in report["cycles"][1:]:
        assert (cycle["generated"], cycle["accepted"]) == (0, 0)
        assert cycle["rejected"] == {"unparseable_answer": 2}
        usage = cycle["teacher_usage"]
        assert usage["calls"] == 2 and 0 < usage["completion_tokens"] <= 32 and usage["prompt_tokens"] > 100
    assert report["stop_reason"].startswith("max_cycles") and report["teacher"]["simulated"] is False
    assert [c["train_size"] for c in report["cycles"]] == [32, 32, 32]      # nothing added, nothing lost


def test_a_teacher_that_cannot_be_reached_is_one_line_before_any_training(toy, tmp_path):
    result = distill(toy, tmp_path / "run", f"triton://127.0.0.1:{free_port()}/teacher", "--teacher-retries", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr and "cycle 0" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pgkd: teacher triton://127.0.0.1:") and "cannot reach it" in last
    assert not (tmp_path / "run").exists()             # nothing trained, nothing written


def test_a_teacher_that_accepts_and_never_answers_is_named_and_bounded(toy, tmp_path):
    """A socket that accepts connections and never replies: the run says what it is waiting for,
    gives up after the check's own bound, and names the cause."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in range(16)], daemon=True).start()
    port = listener.getsockname()[1]
    try:
        result = distill(toy, tmp_path / "run", f"triton://127.0.0.1:{port}/teacher", "--teacher-timeout", "2")
    finally:
        listener.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-2] == f"pgkd: reaching the teacher at triton://127.0.0.1:{port}/teacher (up to 2 s an attempt)"
    assert lines[-1] == (f"pgkd: teacher triton://127.0.0.1:{port}/teacher: cannot reach it "
                         "(no answer within 2 s; 2 attempts)")
    assert not (tmp_path / "run").exists()


def test_triton_llm_models_get_the_answer_schema_as_vllm_and_tensorrt_llm_backends_take_it(tmp_path, monkeypatch):
    """Two Triton models (PyTriton, in this process) declared as Triton's vLLM backend and TensorRT-LLM
    ensemble declare their guided-decoding inputs; the teacher passes the answer's JSON schema to each
    the way that backend reads it, over HTTP and gRPC, and reads the structured answer back."""
    monkeypatch.setenv("LD_LIBRARY_PATH", sysconfig.get_config_var("LIBDIR"))
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from pgkd.teachers.llm import LLMSettings, LLMTeacher
    from pgkd.teachers.transports import VLLM_GUIDED_KEY
    from pgkd.types import GenerationRequest
    seen: list[dict] = []

    def answer_by(schema: dict) -> bytes:
        items = schema["properties"]["samples"]
        labels = items["items"]["properties"]["label"]["enum"]
        return json.dumps({"samples": [{"text": f"text {i} for {labels[i % len(labels)]}",
                                        "label": labels[i % len(labels)]} for i in range(items["minItems"])]}).encode()

    def vllm_like(requests):
        out = []
        for r in requests:
            parameters = json.loads(r["sampling_parameters"][0][0])
            seen.append({"backend": "vllm", **parameters})
            schema = json.loads(parameters[VLLM_GUIDED_KEY])["json"]     # a JSON string, parsed again
            out.append({"text_output": np.array([[answer_by(schema)]], dtype=object)})
        return out

    def tensorrt_like(requests):
        out = []
        for r in requests:
            kind, guide = r["guided_decoding_guide_type"][0][0].decode(), r["guided_decoding_guide"][0][0]
            seen.append({"backend": "tensorrt", "type": kind, "max_tokens": int(r["max_tokens"][0][0])})
            out.append({"text_output": np.array([[answer_by(json.loads(guide))]], dtype=object)})
        return out

    text = Tensor(name="text_input", dtype=bytes, shape=(1,))
    output = [Tensor(name="text_output", dtype=bytes, shape=(1,))]
    http_port, grpc_port = free_ports(2)
    with Triton(config=TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=free_port())) as triton:
        triton.bind(model_name="vllm_model", infer_func=vllm_like, outputs=output, config=ModelConfig(max_batch_size=1),
                    inputs=[text, Tensor(name="sampling_parameters", dtype=bytes, shape=(1,))], strict=False)
        triton.bind(model_name="ensemble", infer_func=tensorrt_like, outputs=output, config=ModelConfig(max_batch_size=1),
                    inputs=[text, Tensor(name="max_tokens", dtype=np.int32, shape=(1,)),
                            Tensor(name="guided_decoding_guide_type", dtype=bytes, shape=(1,)),
                            Tensor(name="guided_decoding_guide", dtype=bytes, shape=(1,))], strict=False)
        triton.run()
        request = GenerationRequest(taxonomy=["refund", "transfer"], examples=[], report=None, hard_negatives=[],
                                    misclassified=[], correct=[], n=3)
        for url in (f"triton://127.0.0.1:{http_port}/vllm_model", f"triton+grpc://127.0.0.1:{grpc_port}/ensemble"):
            teacher = LLMTeacher(url, LLMSettings(max_tokens=300, temperature=0.5, timeout=30),
                                 count_tokens=lambda t: len(t.split()))
            batch = teacher.generate(request)
            assert [s.label for s in batch.samples] == ["refund", "transfer", "refund"] and batch.rejected == {}
            assert teacher.describe()["structured"].startswith("json_schema")
    assert seen == [{"backend": "vllm", "max_tokens": 300, "temperature": 0.5, VLLM_GUIDED_KEY: seen[0][VLLM_GUIDED_KEY]},
                    {"backend": "tensorrt", "type": "json_schema", "max_tokens": 300}]
