"""Whose fault it is, said once: the served student answers a bad request (an empty text, one that is not
UTF-8, one too long) with HTTP 400 / gRPC INVALID_ARGUMENT for that request alone, the good requests
batched with it answered; and the client (`pgkd classify`, `pgkd.classify`) says exit 2 only for what
the user can fix (a bad text, an option, a model name the server does not serve) and exit 1, one line,
for the server and the network (no answer in time, unreachable, no version loaded, not a Triton server)."""
from __future__ import annotations

import http.server
import io
import json
import re
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
from pgkd.errors import UserError
from pgkd.serving.client import ServingError, StudentClient, classify
from pgkd.serving.repository import config_text, model_folder, write_version
from pgkd.serving.server import explicit_control
from pgkd.serving.tritonserver import run_tritonserver
from pgkd.students import create_student

LABELS = ["billing", "card_lost", "refund"]
GOOD = [b"my card was stolen", b"please refund me", b"why was I billed twice"]
BAD = {b"   ": "text 1: empty", b"\xff\xfe broken": "text 1: not UTF-8", b"x" * 10_001: "text 1: 10001 characters"}
# Holds each request up to half a second for others: requests sent together are run as one batch.
BATCHED = "batched"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server: `student` as pgkd export writes it, `spare` (a second model, unloaded by a test) and
    `batched` (the same student, with a long batching delay)."""
    repository = tmp_path_factory.mktemp("served-errors") / "models"
    student = create_student("tiny", LABELS, seed=1)
    for name in ("student", "spare", BATCHED):
        write_version(repository, student, {"test": "served errors"}, model=name)
    config = config_text(BATCHED, max_queue_delay_us=500_000)
    (model_folder(repository, BATCHED) / "config.pbtxt").write_text(config, encoding="utf-8")
    with run_tritonserver(repository, models=["student", "spare", BATCHED],
                          extra_args=[*explicit_control("student"), "--load-model=spare",
                                      f"--load-model={BATCHED}"]) as triton:
        yield triton


def _texts(module, values: list[bytes]):
    data = np.array([[v] for v in values], dtype=np.object_)
    tensor = module.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


def _executions(server, model: str) -> tuple[int, int]:
    """(inferences, executions) the model ran so far: fewer executions than inferences is batching."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_bad_texts_are_http_400_each_alone_and_the_good_requests_of_their_batch_are_answered(server):
    import tritonclient.http as http_client
    from tritonclient.utils import InferenceServerException
    before = _executions(server, BATCHED)
    with http_client.InferenceServerClient(server.http_url, concurrency=8) as client:
        values = [GOOD[0], *BAD, GOOD[1], GOOD[2]]
        sent = [(value, client.async_infer(BATCHED, _texts(http_client, [value]))) for value in values]
        for value, request in sent:
            if value in BAD:
                with pytest.raises(InferenceServerException) as refused:
                    request.get_result()
                assert refused.value.status() == "400" and BAD[value] in refused.value.message(), refused.value
            else:
                assert request.get_result().as_numpy("label")[0][0].decode() in LABELS
    inferences, executions = (a - b for a, b in zip(_executions(server, BATCHED), before))
    assert executions < inferences == len(values), (inferences, executions)   # run in one batch, or in few


def test_bad_texts_are_grpc_invalid_argument_each_alone_and_the_good_requests_beside_them_answered(server):
    import queue

    import tritonclient.grpc as grpc_client
    answers: queue.Queue = queue.Queue()
    values = [GOOD[0], *BAD, GOOD[1], GOOD[2]]
    with grpc_client.InferenceServerClient(server.grpc_url) as client:
        for value in values:
            client.async_infer(BATCHED, _texts(grpc_client, [value]),
                               callback=lambda result, error, value=value: answers.put((value, result, error)))
        got = [answers.get(timeout=60) for _ in values]
    for value, result, error in got:
        if value in BAD:
            assert error is not None and error.status() == "StatusCode.INVALID_ARGUMENT", error
            assert BAD[value] in error.message()
        else:
            assert error is None and result.as_numpy("label")[0][0].decode() in LABELS, error
    # and what Triton itself refuses stays the client's fault too: a text that is not a string
    with grpc_client.InferenceServerClient(server.grpc_url) as client:
        numbers = grpc_client.InferInput("text", [1, 1], "INT32")
        numbers.set_data_from_numpy(np.array([[7]], dtype=np.int32))
        from tritonclient.utils import InferenceServerException
        with pytest.raises(InferenceServerException) as refused:
            client.infer("student", [numbers])
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_client_says_exit_2_for_the_request_and_exit_1_for_the_server(server, protocol):
    url = f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"
    with pytest.raises(UserError, match="text 2: empty"):          # the user's text: exit 2
        classify(url, ["fine", "   "])
    with pytest.raises(UserError, match="no model 'nope' at .*; it serves .*student"):   # a name to fix
        classify(url, ["fine"], model="nope")
    with StudentClient(url, timeout=1e-6) as client:               # no answer in time: the server's
        with pytest.raises(ServingError, match="no answer within the timeout of 1e-06 s"):
            client.infer(["fine"])
    assert classify(url, ["fine"])[0]["label"] in LABELS


def test_a_model_with_no_version_loaded_is_the_servers_state_not_the_users_fault(server):
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/spare/unload", data=b"{}",
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()
    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):
        with pytest.raises(ServingError, match="model 'spare' has no version loaded"):
            classify(url, ["fine"], model="spare")


def test_a_server_that_serves_no_model_yet_is_exit_1(tmp_path, capsys, monkeypatch):
    """`pgkd serve --wait-for-version` before the deployer wrote the first version."""
    (tmp_path / "models").mkdir()
    with run_tritonserver(tmp_path / "models", models=[], extra_args=[*explicit_control(), "--exit-on-error=false"]) \
            as empty:
        for url in (f"http://{empty.http_url}", f"grpc://{empty.grpc_url}"):
            code, _, err = _pgkd_here(capsys, monkeypatch, "classify", "--url", url, "hello")
            assert code == 1 and err.count("\n") == 1 and "serves no model yet" in err, err


class _NotTriton(http.server.BaseHTTPRequestHandler):
    """A web server that is not Triton: a page for every path, or an empty JSON object."""

    def do_POST(self):
        status, body = (404, b"<html>not here</html>") if "html" in self.server.kind else (200, b"{}")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture(params=["html", "empty json"])
def not_triton(request):
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotTriton)
    web.kind = request.param
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{web.server_address[1]}"
    web.shutdown()
    web.server_close()


def test_a_server_that_is_not_triton_is_exit_1_in_one_line(not_triton, capsys, monkeypatch):
    code, out, err = _pgkd_here(capsys, monkeypatch, "classify", "--url", f"http://{not_triton}", "hello")
    assert (code, out) == (1, "") and err.count("\n") == 1 and err.startswith(f"pgkd: http://{not_triton}"), err


def test_http_to_the_grpc_port_is_exit_1_in_one_line(server, capsys, monkeypatch):
    code, _, err = _pgkd_here(capsys, monkeypatch, "classify", "--url", f"http://{server.grpc_url}", "hello")
    assert code == 1 and err.count("\n") == 1 and "not a Triton server's" in err and "grpc://" in err, err


def test_a_batch_size_above_the_served_models_limit_is_split_by_the_client(server, capsys, monkeypatch):
    """The served model takes 64 texts a request (max_batch_size): --batch-size 1000 is sent in 64s."""
    texts = [f"text number {i}" for i in range(150)]
    stdin = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):
        code, out, err = _pgkd_here(capsys, monkeypatch, "classify", "--url", url, "--batch-size", "1000", stdin=stdin)
        assert code == 0 and err == "", err
        assert [json.loads(line)["text"] for line in out.splitlines()] == texts
    with StudentClient(f"http://{server.http_url}") as client:
        assert client.max_batch_size() == 64
        with pytest.raises(UserError, match="text 130: empty"):    # numbered in the call, not the request
            client.classify(texts[:129] + [" "], batch_size=1000)


def test_classify_prints_a_long_text_as_predict_does_by_its_start(server, capsys, monkeypatch):
    """`pgkd classify` prints the lines `pgkd predict` prints: a text over 60 characters as its start."""
    from pgkd.cli import PREVIEW_CHARS, preview
    long = "my card was stolen yesterday and I need a new one sent " * 40
    code, out, err = _pgkd_here(capsys, monkeypatch, "classify", "--url", f"http://{server.http_url}", long, "hi")
    assert code == 0 and err == "", err
    shown = [json.loads(line)["text"] for line in out.splitlines()]
    assert shown == [preview(long), "hi"] and len(shown[0]) <= PREVIEW_CHARS and shown[0].endswith("…")


@pytest.mark.parametrize("value, says", [("0", "0.0: must be more than 0"),
                                         ("inf", "inf: must be a finite number of seconds"),
                                         ("nan", "nan: must be more than 0")])
def test_a_timeout_that_is_no_number_of_seconds_is_one_line_and_exit_2(server, value, says, capsys, monkeypatch):
    """Before any request (the server is there, and unasked): gRPC took an infinite timeout for one passed."""
    code, out, err = _pgkd_here(capsys, monkeypatch, "classify", "--url", f"grpc://{server.grpc_url}",
                                "--timeout", value, "hello")
    assert (code, out) == (2, "") and re.fullmatch(rf"pgkd: error: (--)?timeout {re.escape(says)}\n", err), err


def test_the_commands_errors_are_one_line_without_a_traceback_as_a_process(server):
    for args, code, says in ((["--url", f"grpc://{server.grpc_url}", "--timeout", "inf", "hi"], 2, "finite number"),
                             (["--url", f"grpc://{server.grpc_url}", "--timeout", "1e-6", "hi"], 1, "no answer within"),
                             (["--url", f"http://{server.http_url}", "fine", "   "], 2, "text 2: empty")):
        done = subprocess.run([sys.executable, "-m", "pgkd.cli", "classify", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == code and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def _pgkd_here(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """The command in this process: exit code, stdout, stderr."""
    from pgkd.cli import main
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err
