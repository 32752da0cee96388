"""The served cascade with real servers: the calibrated student on Triton (`pgkd serve`'s tritonserver),
the simulated LLM on Triton behind it (`pgkd teacher serve`: a simulation, not an LLM), `pgkd cascade
serve` in front, Tansu (a Kafka-compatible broker, not Apache Kafka) carrying the teacher's labels,
and the ingest service (a process) storing them as teacher labels. A teacher killed mid-traffic
fails no request: the student's answers stand, flagged, and the fallbacks are counted."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_CLASSES, make_toy_dataset, tansu_broker, toy_text
from pgkd.calibration import FILE, calibrate
from pgkd.data import load_dataset, make_splits
from pgkd.net import free_ports
from pgkd.serving.tritonserver import run_tritonserver
from pgkd.students import create_student
from pgkd.types import TrainConfig
from process_tools import Pgkd

REPO = Path(__file__).resolve().parents[2]

SHARE = 0.2     # the LLM may answer a fifth of the texts, as the README's command says


def readme_cascade_command() -> list[str]:
    """The README's `pgkd cascade serve` command, its continued lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)
    block = next(b for b in blocks if "pgkd cascade serve" in b).replace("\\\n", " ")
    return shlex.split(next(line for line in block.splitlines() if "cascade serve" in line).split("  #")[0])


def infer(url: str, texts: list, protocol: str = "http", model: str = "cascade") -> dict[str, list]:
    """One KServe v2 request with tritonclient, as any client sends it."""
    if protocol == "http":
        import tritonclient.http as client
    else:
        import tritonclient.grpc as client
    values = np.array([[t if isinstance(t, bytes) else t.encode()] for t in texts], dtype=object)
    with client.InferenceServerClient(url) as c:
        inputs = [client.InferInput("text", list(values.shape), "BYTES")]
        inputs[0].set_data_from_numpy(values)
        result = c.infer(model, inputs)
    out = {}
    for name in ("label", "answered_by", "student_label", "teacher_label", "fallback", "error"):
        out[name] = [v.decode() for v in result.as_numpy(name).reshape(-1)]
    out["probability"] = result.as_numpy("probability").reshape(-1).tolist()
    out["probabilities"] = result.as_numpy("probabilities")
    return out


def metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{'{' + labels + '}' if labels else ''} "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name}{{{labels}}} in the metrics")


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cascade")
    data_path = make_toy_dataset(folder / "toy", train_per_class=80, test_per_class=30)
    data = load_dataset(data_path)
    splits = make_splits(data, 120, 1, 0.3)
    # A briefly trained student (so that its confidence varies), calibrated on held texts, the threshold
    # sending half of them to the LLM: a run ends so (tests/loop/test_calibrated_run.py).
    student = create_student("tiny", splits.labels, seed=3)
    student.train(splits.train, [], TrainConfig(epochs=2, seed=3, learning_rate=3e-3), progress=False)
    probs = student.predict_proba([s.text for s in splits.validation])
    index = {label: i for i, label in enumerate(splits.labels)}
    student.calibration = calibrate(probs, np.array([index[s.label] for s in splits.validation]), "held",
                                    max_teacher_share=SHARE, labels=splits.labels)
    student.save(folder / "best")
    done = Pgkd(folder, "export", str(folder / "best"), "--out", str(folder / "models"))
    assert done.process.wait(300) == 0, done.log()
    assert (folder / "models" / "student" / "1" / FILE).is_file()

    started = []
    with tansu_broker(folder) as broker, run_tritonserver(folder / "models", models=["student"]) as student_server:
        os.environ["PGKD_BROKER_URL"] = broker
        try:
            # The ingest service as a process on the same broker, its stream's base run the toy data's.
            from pgkd.distributed import steps
            from pgkd.loop.config import DistillConfig
            from service_processes import ServiceProcesses
            from stream_fixtures import BASE_CONFIG
            services = ServiceProcesses(broker, folder)
            started.append(services)
            created = services.pgkd("topics", "create")
            assert created.returncode == 0, created.stderr
            steps.run_through_steps(steps.submit(DistillConfig(data=str(data_path), **BASE_CONFIG), services.store,
                                                 run_id="base"), services.store)
            services.start("ingest", PGKD_STREAM_BASE_RUN="base", PGKD_STREAM_TRIGGER_COUNT="100000",
                           PGKD_STREAM_DRIFT_WINDOW="100000")
            services.ready()
            teacher_ports = free_ports(3)
            teacher = Pgkd(folder, "teacher", "serve", "--kind", "pool-random", "--data", str(data_path), "--labeled",
                           "120", "--llm-accuracy", "1", "--http-port", str(teacher_ports[0]), "--grpc-port",
                           str(teacher_ports[1]), "--metrics-port", str(teacher_ports[2]))
            started.append(teacher)
            teacher.wait_for("pgkd: serving the simulated teacher")
            ports = free_ports(4)
            policy = folder / "policy.json"
            # The README's command as written (relative paths), run from a folder laid out as the repository
            # root after `pgkd export --out models`; only the ports are free ones, and what the test also
            # needs is added: a policy file, the data for the prompt's examples, the labels to the broker.
            readme = readme_cascade_command()
            assert readme[:3] == [".venv/bin/pgkd", "cascade", "serve"] and "models/student" in readme
            argv = [a.replace("127.0.0.1:8000", student_server.http_url)
                     .replace("127.0.0.1:8010", f"127.0.0.1:{teacher_ports[0]}") for a in readme[1:]]
            server = Pgkd(folder, *argv, "--policy-file", str(policy), "--data", str(data_path), "--teacher-timeout",
                          "5", "--publish-labels", "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
                          "--metrics-port", str(ports[2]), "--cascade-metrics-port", str(ports[3]), cwd=folder,
                          env={"PGKD_TRITON_LOG": str(folder / "cascade-tritonserver.log")})
            started.append(server)
            server.wait_for("pgkd: serving the cascade")
            yield dict(folder=folder, data=data, splits=splits, student=student, server=server, teacher=teacher,
                       http=f"127.0.0.1:{ports[0]}", grpc=f"127.0.0.1:{ports[1]}", metrics=ports[3], policy=policy,
                       broker=broker, services=services)
        finally:
            os.environ.pop("PGKD_BROKER_URL", None)
            for process in started:
                if isinstance(process, Pgkd):
                    if process.process.poll() is None:   # stopped as a user stops it: a SIGKILL leaves files
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            process.stop(signal.SIGTERM)
                    process.kill()
                else:
                    process.kill_all()


def test_the_student_answers_what_it_is_sure_of_and_the_teacher_the_rest_over_http_and_grpc(cascade):
    texts = [s.text for s in cascade["data"].test[:40]]
    gold = [s.label for s in cascade["data"].test[:40]]
    threshold = cascade["student"].calibration.deferral.threshold
    expected = cascade["student"].predict_proba(texts)
    for protocol, url in (("http", cascade["http"]), ("grpc", cascade["grpc"])):
        out = infer(url, texts, protocol)
        assert np.allclose(out["probabilities"], expected, atol=2e-3), protocol     # calibrated, as predict_proba
        for i in range(len(texts)):
            sure = out["probability"][i] >= threshold
            assert out["student_label"][i] == cascade["student"].labels[int(expected[i].argmax())]
            if sure:
                assert (out["answered_by"][i], out["label"][i], out["teacher_label"][i]) == \
                       ("student", out["student_label"][i], "")
            else:     # the simulated LLM of accuracy 1 gives the gold label
                assert (out["answered_by"][i], out["label"][i], out["teacher_label"][i]) == ("teacher", gold[i], gold[i])
        assert 0 < out["answered_by"].count("teacher") < len(texts), protocol
        assert set(out["fallback"]) == {""} and set(out["error"]) == {""}


def test_pgkd_classify_and_perf_analyzer_work_on_the_cascade_unchanged(cascade):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "classify", "--url", f"http://{cascade['http']}",
                           "--model-name", "cascade", "I lost my card", "refund please"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["text"] for a in answers] == ["I lost my card", "refund please"]
    assert all(a["label"] in cascade["student"].labels and a["answered_by"] in ("student", "teacher") for a in answers)
    refused = subprocess.run([sys.executable, "-m", "pgkd.cli", "classify", "--url", f"http://{cascade['http']}",
                              "--model-name", "cascade", "fine", ""], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "pgkd: error: the server refused the request: text 2: empty"], refused.stderr     # as the student says it
    from test_perf_analyzer import perf_analyzer, perf_analyzer_environment
    binary = perf_analyzer()
    if binary is None:
        pytest.skip("perf_analyzer: tritonclient's wheels have no build for this machine")
    for protocol, url in (("http", cascade["http"]), ("grpc", cascade["grpc"])):
        done = subprocess.run(
            [binary, "-m", "cascade", "-u", url, "-i", protocol, "--string-data", "my card was stolen",
             # a fixed count, not windows until stable: a loaded 2-core machine varies 2x between windows
             "--concurrency-range", "4", "--request-count", "120"],
            capture_output=True, text=True, timeout=180, env=perf_analyzer_environment(cascade["folder"] / "libs"))
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        inferences = [int(n) for n in re.findall(r"Inference count: (\d+)", output)]
        succeeded = [int(n) for n in re.findall(r"Successful request count: (\d+)", output)]
        # read at the measurement's edges with 4 requests in flight: they may differ by as many (test_perf_analyzer)
        assert inferences and len(inferences) == len(succeeded) and min(inferences) > 0, output
        assert all(abs(i - s) <= 4 for i, s in zip(inferences, succeeded)), output


def test_a_bad_text_is_its_own_error_and_the_others_are_answered(cascade):
    out = infer(cascade["http"], ["I lost my card", "", "x" * 100_000, b"\xff\xfe caf\xe9", "refund please"])
    assert out["answered_by"][1:4] == ["error"] * 3
    assert out["error"][1] == "text 2: empty"
    assert out["error"][2].startswith("text 3: 100000 characters, more than the")
    assert out["error"][3] == "text 4: not UTF-8 (byte 1)"
    assert out["answered_by"][0] in ("student", "teacher") and out["answered_by"][4] in ("student", "teacher")
    assert infer(cascade["grpc"], ["still serving"], "grpc")["answered_by"][0] in ("student", "teacher")


def test_the_teachers_labels_reach_the_stream_as_teacher_labels(cascade, tmp_path):
    """Tansu carries them; the stream takes each as the ingest service does (Stream.take), and stores it
    in train, marked source teacher with the model that answered."""
    from confluent_kafka import Consumer, TopicPartition
    known = {s.text for s in cascade["data"].train + cascade["data"].test}
    rng = random.Random(7)       # traffic: texts of the toy kind that no split holds (the stream drops those)
    texts = list(dict.fromkeys(t for t in (toy_text(rng, label) for label in sorted(TOY_CLASSES) * 15)
                               if t not in known))
    out = infer(cascade["http"], texts)
    deferred = {t for t, who in zip(texts, out["answered_by"]) if who == "teacher"}
    assert deferred
    consumer = Consumer({"bootstrap.servers": cascade["broker"].removeprefix("kafka://"), "group.id": "test-cascade",
                         "enable.auto.commit": False})
    got, deadline = {}, time.monotonic() + 30
    try:
        consumer.assign([TopicPartition("pgkd.labeled-samples", p, 0) for p in range(3)])
        while not deferred <= set(got) and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and not message.error():
                row = json.loads(message.value())
                got[row["text"]] = message.value()
    finally:
        consumer.close()
    assert deferred <= set(got), cascade["server"].log()
    for text in deferred:
        row = json.loads(got[text])
        assert row["source"] == "teacher" and row["model"].startswith("triton://") and "label" in row

    # The ingest service (a process, on the same topic) stores each: in train, as a teacher label with its model.
    from stream_fixtures import stored
    store, deadline = cascade["services"].store, time.monotonic() + 60
    while not deferred <= {s.text for s in stored(store)}:
        assert time.monotonic() < deadline, cascade["services"].log_tails()
        time.sleep(0.25)
    kept = [s for s in stored(store) if s.text in deferred]
    assert len(kept) == len(deferred)
    assert all(s.source == "teacher" and s.split == "train" and s.model.startswith("triton://") for s in kept)
    teacher = sum(s.source == "teacher" for s in stored(store))     # these, and the earlier tests' deferred texts
    status = cascade["services"].pgkd("stream", "status")
    assert status.returncode == 0 and "0 human labels" in status.stdout, status.stdout
    assert f"{teacher} teacher labels (train only)" in status.stdout and teacher >= len(deferred), status.stdout


def test_the_operator_moves_the_threshold_with_the_policy_file_and_the_metrics_follow(cascade):
    texts = [s.text for s in cascade["data"].test[80:100]]
    assert f"no policy file {cascade['policy']} yet" in cascade["server"].log()    # said at start: a typo shows
    try:
        cascade["policy"].write_text(json.dumps({"max_teacher_share": 0}))        # the LLM switched off
        deadline = time.monotonic() + 15
        while metric(cascade["metrics"], "pgkd_cascade_threshold") != 0.0:
            infer(cascade["http"], texts[:1])
            assert time.monotonic() < deadline, cascade["server"].log()
            time.sleep(0.3)
        assert set(infer(cascade["http"], texts)["answered_by"]) == {"student"}
        cascade["policy"].write_text(json.dumps({"threshold": 1.5}))     # refused: the last good one stays
        deadline = time.monotonic() + 15        # read again within a second; more on a loaded machine
        while "threshold stays" not in cascade["server"].log():
            assert time.monotonic() < deadline, cascade["server"].log()
            time.sleep(0.2)
        assert set(infer(cascade["http"], texts)["answered_by"]) == {"student"}
    finally:
        cascade["policy"].write_text(json.dumps({"max_teacher_share": SHARE}))
    deadline = time.monotonic() + 15
    while metric(cascade["metrics"], "pgkd_cascade_teacher_share_target") != SHARE:   # the file read again
        assert time.monotonic() < deadline, cascade["server"].log()
        time.sleep(0.2)
    before = metric(cascade["metrics"], "pgkd_cascade_texts_total", 'answered_by="teacher"')
    out = infer(cascade["http"], texts)
    assert metric(cascade["metrics"], "pgkd_cascade_texts_total", 'answered_by="teacher"') == \
        before + out["answered_by"].count("teacher")
    assert metric(cascade["metrics"], "pgkd_cascade_teacher_share_target") == SHARE
    assert metric(cascade["metrics"], "pgkd_cascade_labels_total", 'outcome="published"') > 0


def test_a_teacher_killed_mid_traffic_fails_no_request_and_the_fallbacks_are_counted(cascade):
    """16 clients at once; the teacher's server is SIGKILLed while they send. Every request is answered;
    the deferred texts after the kill keep the student's answer, flagged."""
    texts = [s.text for s in cascade["data"].test]
    failures, answers, stop = [], [], threading.Event()

    def client(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                out = infer(cascade["http"], [texts[i % len(texts)], texts[(i + 7) % len(texts)]])
                answers.append(out)
            except Exception as e:  # noqa: BLE001 -- any failed request fails the test
                failures.append(repr(e))
            i += 16
    before = sum(metric(cascade["metrics"], "pgkd_cascade_fallbacks_total", f'reason="{r}"')
                 for r in ("teacher_timeout", "teacher_unavailable", "teacher_error"))
    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    time.sleep(3)
    cascade["teacher"].stop(signal.SIGKILL)
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(60)
    assert failures == []
    flagged = [(who, fb) for out in answers for who, fb in zip(out["answered_by"], out["fallback"]) if fb]
    assert flagged and all(who == "student" for who, _ in flagged)
    after = sum(metric(cascade["metrics"], "pgkd_cascade_fallbacks_total", f'reason="{r}"')
                for r in ("teacher_timeout", "teacher_unavailable", "teacher_error"))
    assert after - before == len(flagged)


def model_folders(pids) -> set[Path]:
    """The folders /tmp/folderXXXXXX that tritonserver made for its models (in /tmp, whatever TMPDIR says),
    as the command lines of `pids` (its Python-backend stubs) name them."""
    found = set()
    for pid in pids:
        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
            match = re.match(r"/tmp/folder[A-Za-z0-9]{6}(?=/|$)", arg)
            found |= {Path(match.group(0))} if match else set()
    return found


def test_a_stopped_cascade_leaves_no_process_temporary_folder_or_shared_memory(cascade):
    """SIGTERM: its tritonserver and every Python-backend stub gone (PyTriton leaves some stubs behind, so the
    cascade adopts its children and stops what is left), nothing in its TMPDIR, no /dev/shm segment of its own,
    and no model folder of its tritonserver in /tmp (which tritonserver leaves when it stops before it has
    unloaded the model's 8 instances)."""
    from process_tools import descendants, gone
    server = cascade["server"]
    pid = server.process.pid
    children = list(descendants(pid))
    assert children, server.log()
    folders = model_folders(children)
    assert folders, "no stub names its model folder"
    assert server.stop(signal.SIGTERM) == 0, server.log()
    assert server.log().rstrip().endswith("pgkd: stopped serving the cascade"), server.log()[-2000:]
    # unloaded before tritonserver's exit timeout: else its Python backend leaves /tmp/python_env_XXXXXX
    triton_log = (cascade["folder"] / "cascade-tritonserver.log").read_text(errors="replace")   # PGKD_TRITON_LOG
    assert "successfully unloaded 'cascade' version 1" in triton_log, triton_log[-3000:]
    assert gone(children), "a child of pgkd cascade serve outlived it"
    assert server.left_in_tmp() == []
    assert list(Path("/dev/shm").glob(f"pytrtion{pid}-*")) == []
    assert [f for f in folders if f.exists()] == []


class FlakyTriton:
    """PyTriton's Triton as `serve` uses it: each attempt's start fails with the next of `failures` (None: it
    serves), and `serve` raises `serving_failure`."""
    failures: list = []
    serving_failure: BaseException | None = None
    started: list["FlakyTriton"] = []

    def __init__(self, **_):
        self.stopped = False
        FlakyTriton.started.append(self)

    def run(self) -> None:
        pass

    def bind(self, **_) -> None:
        failure = FlakyTriton.failures.pop(0)
        if failure == "ctrl-c":     # a Ctrl-C that PyTriton turns into a failed load (its tritonserver gone)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                raise RuntimeError("[400] load failed for model 'cascade': version 1 is at UNAVAILABLE state") from None
        if failure is not None:
            raise failure

    def serve(self) -> None:
        if FlakyTriton.serving_failure is not None:
            raise FlakyTriton.serving_failure

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def flaky_start(monkeypatch, tmp_path):
    """`serve` on a FlakyTriton, without a pause between attempts or subreaping (this is pytest's process).
    Each attempt's Triton is stopped. A failure's kept log folder is the test's."""
    import contextlib
    import tempfile
    import pytriton.triton
    from pgkd.serving import cascade_server
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(pytriton.triton, "Triton", FlakyTriton)
    monkeypatch.setattr(cascade_server, "adopted_children", lambda: contextlib.nullcontext(tmp_path))
    monkeypatch.setattr(cascade_server, "START_PAUSE", 0)
    monkeypatch.setattr(FlakyTriton, "started", [])

    def start(failures: list, serving_failure: BaseException | None = None) -> None:
        monkeypatch.setattr(FlakyTriton, "failures", list(failures))
        monkeypatch.setattr(FlakyTriton, "serving_failure", serving_failure)
        try:
            cascade_server.serve(None, *free_ports(3), instances=2)
        finally:
            assert all(triton.stopped for triton in FlakyTriton.started)
    return start


def test_a_start_that_fails_in_any_way_is_tried_again_with_a_fresh_server(flaky_start, capsys):
    """PyTriton's start races under load (a missed handshake, a tritonserver that aborts and closes the
    connection): each failure before the server serves is tried again, and stopped."""
    from geventhttpclient.response import HTTPConnectionClosed
    flaky_start([RuntimeError("\nTraceback ...get_config_from_handshake_server..."),
                 HTTPConnectionClosed("connection closed."), None])
    out = capsys.readouterr().out
    assert "attempt 1 of 5 (RuntimeError: Traceback ...get_config_from_handshake_server...); starting again" in out
    assert "attempt 2 of 5 (HTTPConnectionClosed: connection closed.); starting again" in out
    assert "pgkd: serving the cascade" in out and len(set(map(id, FlakyTriton.started))) == 3


def test_a_start_that_always_fails_is_one_environment_failure(flaky_start, tmp_path, monkeypatch):
    from geventhttpclient.response import HTTPConnectionClosed
    from pgkd.errors import EnvironmentFailure
    monkeypatch.setenv("PGKD_TRITON_LOG", str(tmp_path / "triton.log"))
    with pytest.raises(EnvironmentFailure) as failed:
        flaky_start([HTTPConnectionClosed("connection closed.")] * 5)
    assert str(failed.value) == ("the cascade's Triton server failed to start, attempt 5 of 5: "
                                 f"HTTPConnectionClosed: connection closed.; tritonserver's log: {tmp_path}/triton.log")
    assert failed.value.__cause__ is None and failed.value.__suppress_context__


@pytest.mark.parametrize("failures, serving_failure, raised", [
    ([None], RuntimeError("tritonserver died"), "failed while serving: RuntimeError: tritonserver died"),
    ([KeyboardInterrupt()], None, KeyboardInterrupt),
    (["ctrl-c"], None, KeyboardInterrupt),
])
def test_a_failure_once_serving_or_a_ctrl_c_is_not_tried_again(flaky_start, failures, serving_failure, raised):
    from pgkd.errors import EnvironmentFailure
    with pytest.raises(EnvironmentFailure if isinstance(raised, str) else raised) as failed:
        flaky_start(failures, serving_failure)
    assert isinstance(raised, type) or raised in str(failed.value)
    assert len(FlakyTriton.started) == 1
