"""The distilled student served on the real Triton server here (the tritonserver bundled with PyTriton):
`pgkd export` writes the model repository, the server loads it, `pgkd classify` over HTTP and gRPC
answers as `pgkd predict` does; bad requests are answered with an error and the server keeps serving;
a version that fails to load leaves the old one serving."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_toy_dataset
from pgkd.data import load_dataset
from pgkd.net import free_ports
from pgkd.serving.client import StudentClient, classify
from pgkd.serving.deploy import DeployFailed, activate
from pgkd.serving.repository import MAX_QUEUE_DELAY_US, check_repository, reject_version, versions, write_version
from pgkd.serving.server import explicit_control
from pgkd.serving.tritonserver import run_tritonserver
from pgkd.students import create_student, load_student
from pgkd.types import TrainConfig

TEXTS = ["my card was stolen from my wallet", "please send money to my payee account", "reset my pin code now",
         "i want a refund of my money back", "héllo — ünïcode ✓ text", "card"]


def pgkd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it (a process: its exit code and its whole stderr)."""
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def pgkd_here(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """The command in this process (seconds cheaper than a new one): exit code, stdout, stderr."""
    import io

    from pgkd.cli import main
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained tiny student saved as a folder, exported with `pgkd export` as ONNX (model `student`)
    and as TorchScript (`student_torch`), both on one server."""
    folder = tmp_path_factory.mktemp("serving")
    data = load_dataset(make_toy_dataset(folder / "toy"))
    student = create_student("tiny", data.labels, seed=3)
    student.train(data.train, [], TrainConfig(epochs=3, seed=3), progress=False)
    student.save(folder / "best")
    repository = folder / "repo"
    for name, fmt in (("student", "onnx"), ("student_torch", "torch")):
        done = pgkd("export", str(folder / "best"), "--out", str(repository), "--format", fmt, "--model-name", name)
        assert done.returncode == 0, done.stderr
    with run_tritonserver(repository, models=["student", "student_torch"],
                          extra_args=[*explicit_control("student"), "--load-model=student_torch"]) as server:
        yield folder, repository, server


def test_classify_over_http_and_grpc_answers_as_pgkd_predict(served, capsys, monkeypatch):
    folder, repository, server = served
    code, out, err = pgkd_here(capsys, monkeypatch, "predict", "--model", str(folder / "best"), *TEXTS)
    assert code == 0, err
    expected = [json.loads(line) for line in out.splitlines()]
    done = pgkd("classify", "--url", f"http://{server.http_url}", *TEXTS)
    assert done.returncode == 0, done.stderr
    runs = {"http, a process": done.stdout}
    lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS)   # JSON Lines on stdin, as predict takes them
    code, runs["grpc, stdin"], err = pgkd_here(capsys, monkeypatch, "classify", "--url", f"grpc://{server.grpc_url}",
                                               stdin=lines)
    assert code == 0, err
    for how, stdout in runs.items():
        answers = [json.loads(line) for line in stdout.splitlines()]
        assert [a["text"] for a in answers] == TEXTS, how
        assert [a["label"] for a in answers] == [e["label"] for e in expected], how
        assert np.allclose([a["probability"] for a in answers], [e["probability"] for e in expected], atol=2e-3), how


def test_the_python_api_exports_and_the_client_batches_and_both_formats_give_the_students_probabilities(
        served, tmp_path):
    import pgkd
    folder, _, server = served
    student = load_student(folder / "best")
    version = pgkd.export(student, tmp_path / "models", fmt="torch")
    assert (version.number, version.manifest["format"], version.manifest["labels"]) == (1, "torch", student.labels)
    texts = [f"{t} {i}" for i in range(40) for t in TEXTS[:4]]          # 160 texts: three requests of 64
    expected = student.predict_proba(texts)
    for model in ("student", "student_torch"):
        answers = pgkd.classify(f"http://{server.http_url}", texts, model=model, batch_size=64)
        assert [a["label"] for a in answers] == [student.labels[i] for i in expected.argmax(1)]
    with StudentClient(f"grpc://{server.grpc_url}") as client:
        result = client.infer(texts[:10])
    assert np.allclose(result["probabilities"], expected[:10], atol=1e-3)
    assert result["version"] == "1"


def _raw_request(server, values: list[bytes]):
    """A request as any Triton client may send it, bypassing pgkd's client checks."""
    import tritonclient.http as http
    data = np.array([[v] for v in values], dtype=np.object_)
    inputs = [http.InferInput("text", list(data.shape), "BYTES")]
    inputs[0].set_data_from_numpy(data)
    with http.InferenceServerClient(server.http_url) as client:
        return client.infer("student", inputs)


def test_a_bad_request_gets_its_own_error_and_the_server_keeps_serving(served, capsys, monkeypatch):
    from tritonclient.utils import InferenceServerException
    _, _, server = served
    for values, says in (([b"fine", "x".encode() * 100_000], "text 2: 100000 characters, more than the 10000"),
                         ([b"   "], "text 1: empty"),
                         ([b"ok", b"\xff\xfe broken"], "text 2: not UTF-8")):
        with pytest.raises(InferenceServerException, match=says):
            _raw_request(server, values)
    import tritonclient.http as http
    with http.InferenceServerClient(server.http_url) as client:
        numbers = http.InferInput("text", [2, 1], "INT32")          # a text that is not a string
        numbers.set_data_from_numpy(np.array([[1], [2]], dtype=np.int32))
        with pytest.raises(InferenceServerException, match="data-type is .INT32., but model .student. expects .BYTES."):
            client.infer("student", [numbers])
        nothing = http.InferInput("text", [0, 1], "BYTES")         # an empty list
        nothing.set_data_from_numpy(np.zeros((0, 1), dtype=np.object_))
        with pytest.raises(InferenceServerException):
            client.infer("student", [nothing])
    assert classify(f"http://{server.http_url}", ["my card was stolen"])[0]["label"]
    # pgkd classify: one line, exit 2, for what it can tell before sending, and for what the server refused
    for args, says in ((["--url", f"http://{server.http_url}", "x" * 100_000], "text 1: 100000 characters"),
                       (["--url", "ftp://nowhere"], "expected http://HOST:PORT or grpc://HOST:PORT")):
        code, _, err = pgkd_here(capsys, monkeypatch, "classify", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    code, _, err = pgkd_here(capsys, monkeypatch, "classify", "--url", f"http://{server.http_url}",
                             stdin='{"text": 42}\n')
    assert code == 2 and 'non-empty "text"' in err
    from pgkd.errors import UserError
    with pytest.raises(UserError, match="no texts to classify"):
        classify(f"http://{server.http_url}", [])
    with pytest.raises(TypeError, match=r"text 1: not a string \(int\)"):      # a wrong type, as in Python
        classify(f"http://{server.http_url}", [42])
    assert server.process.poll() is None


def test_a_version_that_fails_to_load_leaves_the_old_one_serving_and_is_set_aside(served):
    folder, repository, server = served
    before = (repository / "student" / "labels.txt").read_text()
    renamed = load_student(folder / "best").with_labels(load_student(folder / "best").labels + ["a_new_label"])
    version = write_version(repository, renamed, {"test": "damaged"})
    assert (repository / "student" / "labels.txt").read_text() != before
    (version.path / "model.onnx").write_bytes(b"not an onnx graph")       # damaged after its manifest
    with pytest.raises(DeployFailed, match="model.onnx does not match the sha256") as failed:
        activate(repository, version, server.http_url)
    assert "version 1 goes on serving" in str(failed.value)
    assert versions(repository) == [1] and (repository / "student" / "rejected" / str(version.number)).is_dir()
    assert (repository / "student" / "labels.txt").read_text() == before
    answers = classify(f"http://{server.http_url}", TEXTS)
    assert all(a["label"] != "a_new_label" for a in answers)
    with StudentClient(f"http://{server.http_url}") as client:
        assert client.infer(TEXTS[:1])["version"] == "1"
    assert check_repository(repository).number == 1
    # the next version gets a number never used before (Triton may remember the rejected one)
    assert write_version(repository, renamed, {"test": "next"}).number == version.number + 1
    reject_version(repository, version.number + 1)          # and set aside: labels.txt back to version 1's
    assert (repository / "student" / "labels.txt").read_text() == before


def test_a_server_that_does_not_answer_is_no_verdict_on_the_version(tmp_path):
    from pgkd.net import free_port
    student = create_student("tiny", ["a", "b"], seed=1)
    write_version(tmp_path / "models", student, {"test": "first"})
    second = write_version(tmp_path / "models", student, {"test": "second"})
    with pytest.raises(DeployFailed, match="version 2 written, not loaded: the server does not answer"):
        activate(tmp_path / "models", second, f"127.0.0.1:{free_port()}", wait_s=0)
    assert versions(tmp_path / "models") == [1, 2]         # kept: the server loads it when it starts


def test_export_and_serve_refuse_bad_input_with_one_line(served, tmp_path, capsys, monkeypatch):
    folder, repository, _ = served
    not_a_student = tmp_path / "notes"
    not_a_student.mkdir()
    (not_a_student / "todo.txt").write_text("buy milk")
    cases = [
        (["export", str(not_a_student), "--out", str(tmp_path / "r1")], "not a saved student"),
        (["export", str(folder / "best"), "--out", str(not_a_student)], "neither new, empty, nor a model repository"),
        (["export", str(folder / "best"), "--out", str(tmp_path / "r2"), "--format", "torch", "--int8"],
         "--int8 needs --format onnx"),
        (["export", "nowhere/at/all", "--out", str(tmp_path / "r3")], "not a folder, nor a checkpoint URI"),
    ]
    half = tmp_path / "half"
    shutil.copytree(repository / "student", half / "student", ignore=shutil.ignore_patterns("rejected"))
    (half / "student" / "1" / "pgkd-version.json").unlink()           # as if the copy stopped half-way
    cases.append((["serve", "--model", str(half), "--http-port", "1"], "no pgkd-version.json"))
    for name, damage, says in (("nolabels", lambda f: (f / "labels.txt").unlink(), "labels.txt: cannot read it"),
                               ("fewlabels", lambda f: (f / "labels.txt").write_text("one\n"),
                                "labels.txt: not the label map of version 1 (1 lines"),
                               ("badconfig", lambda f: (f / "config.pbtxt").write_text("garbage {"),
                                "config.pbtxt: not a Triton model configuration"),
                               ("crlf", lambda f: (f / "labels.txt").write_bytes(
                                   (f / "labels.txt").read_bytes().replace(b"\n", b"\r\n")),
                                "labels.txt: Windows line endings")):
        damaged = tmp_path / name     # one line naming the file, not a page of Triton's log
        shutil.copytree(repository / "student", damaged / "student")
        damage(damaged / "student")
        cases.append((["serve", "--model", str(damaged), "--http-port", "1"], says))
    for args, says in cases:
        code, _, err = pgkd_here(capsys, monkeypatch, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and says in err, (args, err)
    done = pgkd(*cases[0][0])     # and as a process: no traceback on its way out
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"pgkd: error: {not_a_student}: not a saved student (no config.json, nor pgkd_frozen_student.json of a frozen-encoder one)"]
    assert [p.name for p in not_a_student.iterdir()] == ["todo.txt"]   # nothing written into a user's folder
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_the_frozen_encoder_student_exports_to_the_same_probabilities(tmp_path):
    """The frozen-encoder student (MiniLM, mean pooling, a linear head) as one ONNX graph."""
    import onnxruntime as ort
    from pgkd.serving.graph import export_onnx, tokenizer_of
    data = load_dataset(make_toy_dataset(tmp_path / "toy", train_per_class=15, test_per_class=2))
    student = create_student("minilm-frozen", data.labels, seed=1)
    student.train(data.train, data.train[:8], TrainConfig(seed=1), progress=False)
    session = ort.InferenceSession(str(export_onnx(student, tmp_path / "frozen.onnx")))
    batch = tokenizer_of(student)(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    logits = session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert np.allclose(probs, student.predict_proba(TEXTS), atol=1e-4)


def test_a_new_replica_serves_the_latest_promotion_before_it_reaches_the_broker(tmp_path):
    """The deployer of a server that starts empty deploys the model's latest promotion from the artifact
    store in `prepare`, before any broker (none listens at the one it is given)."""
    from pgkd.artifacts import ArtifactStore
    from pgkd.distributed.messages import StudentPromoted
    from pgkd.distributed.metrics import LoopMetrics
    from pgkd.distributed.steps import record_promotion, store_checkpoint
    from pgkd.serving.client import served_version
    from prometheus_client import CollectorRegistry

    from pgkd_services.deployer import DeployerService, ServingSettings
    from pgkd_services.runtime import Settings
    store = ArtifactStore(f"file://{tmp_path}/artifacts")
    student = create_student("tiny", ["a", "b", "c"], seed=2)
    record_promotion(store, StudentPromoted(run_id="earlier", cycle=3, source="run", scores={}, decision="test",
                                            checkpoint=store_checkpoint(store, "runs/earlier/best.json", student)))
    repository = tmp_path / "models"
    repository.mkdir()
    with run_tritonserver(repository, models=[], extra_args=[*explicit_control(), "--exit-on-error=false"]) as server:
        assert served_version(server.http_url) is None
        registry = CollectorRegistry()
        deployer = DeployerService(serving=ServingSettings(repository, server.http_url, replica="new"),
                                   settings=Settings(broker_url="kafka://127.0.0.1:1", artifacts=store.url),
                                   store=store, metrics=LoopMetrics(registry))
        deployer.prepare()
        assert served_version(server.http_url) == "1"
        assert registry.get_sample_value("pgkd_serving_promotions_total", {"model": "student", "outcome": "deployed"}) == 1
        assert check_repository(repository).manifest["source"]["run_id"] == "earlier"
        assert classify(f"http://{server.http_url}", ["anything"])[0]["label"] in {"a", "b", "c"}
        deployer.prepare()        # a restart: the server has that promotion already
        assert versions(repository) == [1]
        assert registry.get_sample_value("pgkd_serving_promotions_total", {"model": "student", "outcome": "skipped"}) == 1


def test_the_config_is_a_valid_triton_model_config_with_batching_labels_and_one_version(served):
    """What NGC's tritonserver reads too: parsed with Triton's own protobuf schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    folder, repository, _ = served
    config = text_format.Parse((repository / "student" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("student", "python", 64)
    assert config.dynamic_batching.max_queue_delay_microseconds == MAX_QUEUE_DELAY_US   # declared once
    assert [i.name for i in config.input] == ["text"] and config.input[0].data_type == model_config_pb2.TYPE_STRING
    assert {o.name: o.label_filename for o in config.output} == {"label": "", "probability": "",
                                                                 "probabilities": "labels.txt"}
    assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_AUTO]
    assert config.version_policy.latest.num_versions == 1
    assert (repository / "student" / "labels.txt").read_text().splitlines() == load_student(folder / "best").labels


def test_the_served_labels_are_read_from_the_server_and_a_calibration_of_other_labels_is_refused(
        served, tmp_path, capsys):
    """The label map comes back through Triton's classification extension, in the probabilities' order,
    over HTTP and gRPC; `pgkd cascade serve` compares the calibration's labels with it, name by name (a
    reviewer's calibration of 64 labels, 10 named differently, was taken)."""
    from pgkd.calibration import Calibration
    from pgkd.cli import main
    from pgkd.serving.client import StudentClient
    folder, _, server = served
    labels = list(load_student(folder / "best").labels)
    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):
        with StudentClient(url) as client:
            assert client.served_labels() == labels and len(labels) >= 3
    other = [*labels[:1], labels[1] + "_renamed", *labels[2:]]
    (tmp_path / "pgkd-calibration.json").write_text(Calibration(labels=other, source="held", samples=0).model_dump_json())
    ports = [str(p) for p in free_ports(4)]
    code = main(["cascade", "serve", "--student", f"http://{server.http_url}", "--teacher",
                 "openai://127.0.0.1:1/v1?model=m", "--calibration", str(tmp_path), "--threshold", "0.5",
                 "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                 "--cascade-metrics-port", ports[3]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the calibration of another student" in err[0], err
    assert f"label 2 is {other[1]!r}, the served student's {labels[1]!r}" in err[0], err
