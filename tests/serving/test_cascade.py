"""The cascade's request path (pgkd.serving.cascade) with a real OpenAI-compatible teacher server: a
teacher that hangs, refuses, answers garbage or a label outside the taxonomy never fails a text (the
student's answer, flagged, within the timeout); the policy's threshold, its file read again while
serving; the labels' publisher with the broker down never blocks; `pgkd cascade serve`'s bad input
is one line, exit 2."""
import json
import os
import socket
import time

import numpy as np
import pytest
from chat_server import ChatServer
from pgkd.calibration import Calibration, calibrate
from pgkd.cli import main
from pgkd.errors import UserError
from pgkd.serving.cascade import Cascade, CascadeMetrics, Policy, PolicySource, TeacherLabel, read_policy_file
from prometheus_client import CollectorRegistry

from pgkd_services.cascade import LabelPublisher, teacher_factory

LABELS = ["card_lost", "refund", "transfer"]
TEXTS = ["sure one", "unsure one", "unsure two", "sure two"]
PROBS = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05]], dtype=np.float32)
STUDENT = ([LABELS[i] for i in PROBS.argmax(axis=1)], PROBS.max(axis=1).tolist())   # what the served student answers


@pytest.fixture
def chat():
    return ChatServer()


def make(chat, timeout: float = 2.0, threshold: float = 0.5):
    registry = CollectorRegistry()
    metrics = CascadeMetrics(registry)
    labels: list[TeacherLabel] = []
    policy = PolicySource(Policy(threshold=threshold), on_change=metrics.policy_changed)
    cascade = Cascade(LABELS, teacher_factory(chat.url, timeout, 0.0, 0.0), policy, timeout=timeout,
                      sink=labels.extend, metrics=metrics)
    return cascade, registry, labels


def ports() -> list[str]:
    """Free ports for `pgkd cascade serve`: its defaults may be taken on the machine that runs the tests."""
    from pgkd.net import free_ports
    return [x for flag, port in zip(("--http-port", "--grpc-port", "--metrics-port", "--cascade-metrics-port"),
                                    free_ports(4)) for x in (flag, str(port))]


def value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("PGKD_TEST_KEY", "k")     # the chat server's key (ChatServer.teacher_url's key_env)


def test_the_student_keeps_what_it_is_sure_of_and_the_teacher_labels_the_rest_in_one_prompt(chat):
    chat.script = [("ok", json.dumps({"labels": ["refund", "transfer"]}))]
    cascade, registry, labels = make(chat)
    answers = cascade.answer(TEXTS, *STUDENT)
    assert [(a.answered_by, a.label) for a in answers] == [("student", "card_lost"), ("teacher", "refund"),
                                                             ("teacher", "transfer"), ("student", "refund")]
    assert [a.fallback for a in answers] == [""] * 4 and answers[1].student_label == "card_lost"
    assert len(chat.requests) == 1           # the batch's deferred texts together
    prompt = chat.requests[0]["body"]["messages"][-1]["content"]
    assert '1. "unsure one"' in prompt and '2. "unsure two"' in prompt and "sure one" not in prompt.replace("unsure", "")
    assert [(x.text, x.label) for x in labels] == [("unsure one", "refund"), ("unsure two", "transfer")]
    assert labels[0].model.startswith("openai://")
    assert value(registry, "pgkd_cascade_texts_total", answered_by="teacher") == 2
    assert value(registry, "pgkd_cascade_disagreements_total") == 1       # card_lost -> refund; transfer agreed
    assert value(registry, "pgkd_cascade_teacher_calls_total") == 1
    assert value(registry, "pgkd_cascade_teacher_tokens_total", kind="prompt") == 1000


@pytest.mark.parametrize("behaviour, reason", [
    (("sleep", 30, "{}"), "teacher_timeout"),                       # hangs
    (("status", 401), "teacher_unavailable"),                       # refuses (a key)
    (("status", 503), "teacher_unavailable"),                       # down
    (("ok", "I think these are about banking."), "teacher_error"),    # garbage: no list of labels
    (("ok", json.dumps({"labels": ["bank", "banking"]})), "out_of_taxonomy"),   # labels, none of the taxonomy
    (("ok", json.dumps({"labels": ["close_account", "refund"]})), None),   # one label unknown
])
def test_a_teacher_that_fails_in_any_way_leaves_the_students_answer_flagged_within_the_timeout(chat, behaviour,
                                                                                             reason):
    chat.script = [behaviour]
    # A short deadline for the teacher that hangs; a long one for the others, whose answer (a refusal,
    # garbage) must be read as such even when a loaded machine takes over a second to carry it.
    timeout = 1.0 if reason == "teacher_timeout" else 8.0
    cascade, registry, labels = make(chat, timeout=timeout)
    began = time.monotonic()
    answers = cascade.answer(TEXTS, *STUDENT)
    assert time.monotonic() - began < timeout + 2
    if reason is None:     # the unknown label alone falls back; the other is the teacher's
        assert [(a.answered_by, a.fallback) for a in answers[1:3]] == [("student", "out_of_taxonomy"),
                                                                       ("teacher", "")]
        return
    assert [(a.answered_by, a.label, a.fallback) for a in answers[1:3]] == [
        ("student", "card_lost", reason), ("student", "transfer", reason)]
    assert labels == []
    assert value(registry, "pgkd_cascade_fallbacks_total", reason=reason) == 2


def test_after_two_failures_the_teacher_is_not_asked_and_the_fallback_is_at_once(chat):
    chat.script = [("status", 503), ("status", 503)]
    cascade, registry, _ = make(chat)
    cascade.answer(TEXTS, *STUDENT)
    cascade.answer(TEXTS, *STUDENT)
    asked = len(chat.requests)
    answers = cascade.answer(TEXTS, *STUDENT)
    assert len(chat.requests) == asked and answers[1].fallback == "teacher_unavailable"


def test_the_policy_file_moves_the_threshold_and_a_bad_one_keeps_the_last(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=300)
    calibration = calibrate(probs, probs.argmax(axis=1), "held", labels=LABELS)
    file = tmp_path / "policy.json"
    file.write_text(json.dumps({"threshold": 0.7}))
    seen = []
    source = PolicySource(Policy(threshold=0.2), calibration, file, on_change=lambda t, p: seen.append(t))
    assert source.current() == 0.7                       # the file wins over the starting policy
    file.write_text(json.dumps({"max_teacher_share": 0.25}))
    os.utime(file, ns=(time.time_ns(), time.time_ns() + 10**9))
    source.check()
    share = source.current()
    assert share == calibration.threshold_for(max_teacher_share=0.25).threshold and seen[-1] == share
    for bad in ('{"threshold": 1.5}', "not json", '{"threshold": 0.5, "max_teacher_share": 0.1}'):
        file.write_text(bad)
        os.utime(file, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        source.check()
        assert source.current() == share
    assert source.errors == 3


def test_a_policy_file_that_would_block_or_is_huge_is_refused_and_requests_never_wait_on_it(tmp_path, monkeypatch):
    """A FIFO put where the policy file was hung every request (the file was read in the request path)."""
    import pgkd.serving.cascade as module
    monkeypatch.setattr(module, "POLICY_CHECK_SECONDS", 0.05)
    file = tmp_path / "policy.json"
    file.write_text(json.dumps({"threshold": 0.7}))
    source = PolicySource(Policy(threshold=0.2), file=file).watch()
    try:
        file.unlink()
        os.mkfifo(file)                                  # nobody ever writes to it
        time.sleep(0.3)
        began = time.monotonic()
        assert source.current() == 0.7 and time.monotonic() - began < 1.0   # a FIFO read would never end
        assert source.errors >= 1                         # refused (not waited on) by the watching thread
        file.unlink()
        file.write_text(json.dumps({"threshold": 0.6}))
        deadline = time.monotonic() + 5
        while source.current() != 0.6:                   # picked up with no request at all
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        source.close()
    for content, said in ((None, "must be a regular file"), (b" " * 70_000 + b"{}", "is over 65,536 bytes")):
        other = tmp_path / f"other-{len(said)}.json"
        if content is None:
            os.mkfifo(other)
        else:
            other.write_bytes(content)
        with pytest.raises(UserError, match=said):
            read_policy_file(other)


def test_a_target_needs_the_held_scores_and_one_they_cannot_meet_names_what_they_can():
    with pytest.raises(UserError, match="needs the student's calibration"):
        Policy(target_accuracy=0.9).resolve(None)
    with pytest.raises(UserError, match="calibrated without a target"):
        Policy().resolve(Calibration(source="held", samples=0))
    calibration = Calibration(source="held", samples=3, confidence=[0.9, 0.8, 0.7], correct=[False, True, True])
    with pytest.raises(UserError, match=r"cannot be met.*achievable: a target up to 0\.\d{4}"):
        Policy(target_accuracy=0.99).resolve(calibration)


def test_with_the_broker_down_labels_wait_in_a_bounded_buffer_then_are_dropped_and_never_block(monkeypatch):
    with socket.socket() as closed:           # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    registry = CollectorRegistry()
    metrics = CascadeMetrics(registry)
    publisher = LabelPublisher([f"127.0.0.1:{port}"], "pgkd.labeled-samples", capacity=100, metrics=metrics,
                               flush_timeout=1.0).start()
    try:
        began = time.monotonic()
        for i in range(50):
            publisher([TeacherLabel(text=f"text {i} {j}", label="refund", model="m") for j in range(10)])
        assert time.monotonic() - began < 3.0          # 500 labels handed over without waiting on the broker
        time.sleep(0.5)
        held = publisher.queue.qsize() + len(publisher._pending)
        assert publisher.published == 0 and 100 <= held <= 100 + 256     # the buffer, and one batch in hand
        assert value(registry, "pgkd_cascade_labels_waiting") in (held, publisher.waiting())   # as scraped
        assert abs(publisher.dropped + held - 500) <= 1                  # every label kept or counted
        assert metrics.labels.labels("dropped")._value.get() == publisher.dropped
    finally:
        stopping = time.monotonic()
        publisher.stop()
    assert time.monotonic() - stopping < 3       # a broker known down: no flush_timeout wait at the stop
    assert publisher.published == 0 and publisher.dropped == 500      # what the stop could not send: counted
    assert metrics.labels.labels("dropped")._value.get() == 500
    assert value(registry, "pgkd_cascade_labels_waiting") == 0


def test_a_broker_that_is_away_is_said_within_seconds_once_and_its_return_is_said(tmp_path, caplog):
    """The first failed send is said at once (not after kafka-python's minute of reconnects), then not
    again for a minute while the broker stays away; when it answers, the waiting labels go and that is said."""
    from conftest import tansu_broker
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    publisher = LabelPublisher([f"127.0.0.1:{port}"], "pgkd.labeled-samples", flush_timeout=5.0).start()
    caplog.set_level("WARNING", logger="pgkd.cascade")
    said = lambda: [r.getMessage() for r in caplog.records     # noqa: E731 -- this publisher's, not an earlier test's
                    if r.name == "pgkd.cascade" and r.thread == publisher._thread.ident]
    try:
        began = time.monotonic()
        publisher([TeacherLabel(text="my card is gone", label="card_lost", model="m")])
        while not said() and time.monotonic() - began < 30:
            time.sleep(0.2)
        assert said() and said()[0].startswith("cascade: cannot publish 1 teacher label(s)"), said()
        assert time.monotonic() - began < 15, said()
        time.sleep(12)                      # at least one more failed attempt: not said again
        assert len(said()) == 1, said()
        with tansu_broker(tmp_path) as url:
            publisher.bootstrap = [url.removeprefix("kafka://")]      # the broker back (where it now is)
            while publisher.published == 0 and time.monotonic() - began < 90:
                time.sleep(0.2)
            assert publisher.published == 1 and publisher.dropped == 0
            assert said()[-1] == "cascade: the broker is back: 1 teacher label(s) published to pgkd.labeled-samples"
            publisher.stop()
    finally:
        publisher.stop()


@pytest.mark.parametrize("flags, said", [
    (["--threshold", "1.5"], "threshold"),
    (["--target-accuracy", "0.999"], "cannot be met"),
    (["--teacher-timeout", "0"], "--teacher-timeout 0"),
    (["--teacher", "pool-guided"], "expected a teacher URL"),
    (["--instances", "0"], "--instances 0: expected 1 or more"),
    (["--instances", "100000"], "--instances 100000: at most 64"),
    (["--student-model", "../x"], "--student-model '../x': not a name"),
    (["--host", "::1"], "--host ::1: Triton listens on IPv4 addresses only"),
    (["--policy-file", "/nowhere/policy.json"], "--policy-file /nowhere/policy.json: no such folder"),
    (["--data", "DATA"], "--data DATA: its train split holds none of the student's 3 labels"),
])
def test_bad_input_to_cascade_serve_is_one_line_and_exit_2(flags, said, tmp_path, capsys):
    calibration = Calibration(labels=LABELS, source="held", samples=4, confidence=[0.9, 0.8, 0.7, 0.6],
                              correct=[False, True, True, True])
    (tmp_path / "pgkd-calibration.json").write_text(calibration.model_dump_json())
    args = {"--student": "http://127.0.0.1:1", "--teacher": "openai://127.0.0.1:1/v1?model=m",
            "--calibration": str(tmp_path), "--threshold": "0.5"}
    for i in range(0, len(flags), 2):
        args[flags[i]] = flags[i + 1]
    if args.get("--data") == "DATA":    # another dataset's labels
        (tmp_path / "other.jsonl").write_text("".join(json.dumps({"text": f"text {i}", "label": label}) + "\n"
                                                      for i, label in enumerate(["alarm_set", "weather"] * 10)))
        args["--data"] = str(tmp_path / "other.jsonl")
        said = said.replace("DATA", args["--data"])
    if "--target-accuracy" in args:
        del args["--threshold"]
    code = main(["cascade", "serve", *[x for pair in args.items() for x in pair], *ports()])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and said in err[0], err


def test_a_missing_or_damaged_calibration_is_one_line(tmp_path, capsys):
    (tmp_path / "pgkd-calibration.json").write_text('{"temperature": "hot"}')
    for where in (tmp_path, tmp_path / "nowhere"):
        code = main(["cascade", "serve", "--student", "http://127.0.0.1:1", "--teacher",
                     "openai://127.0.0.1:1/v1?model=m", "--calibration", str(where), *ports()])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "calibration" in err[0], err


def test_a_promoted_version_brings_its_labels_and_threshold_and_the_cascade_follows(tmp_path):
    """--calibration names the model's folder: each version's calibration is read when that version first
    answers; the threshold is the policy's again on the new held scores."""
    from pgkd.calibration import Deferral
    from pgkd.serving.cascade import ServedCalibration
    from pgkd.serving.cascade_server import CascadeModel

    def version(n: int, labels: list[str], threshold: float) -> None:
        (tmp_path / "student" / str(n)).mkdir(parents=True)
        deferral = Deferral(threshold=threshold, target="max teacher share 0.2", student_share=0.8,
                            student_accuracy=0.9, samples=10)
        (tmp_path / "student" / str(n) / "pgkd-calibration.json").write_text(Calibration(
            labels=labels, source="held", samples=10, deferral=deferral).model_dump_json())
    version(1, LABELS, 0.5)
    calibrations = ServedCalibration(tmp_path / "student")
    assert (calibrations.version, calibrations.current.deferral.threshold) == ("1", 0.5)
    answering = {"version": "1"}

    class Student:
        def infer(self, texts):
            n = 3 if answering["version"] == "1" else 4
            return {"version": answering["version"], "label": ["refund"] * len(texts), "probability": [0.6] * len(texts),
                    "probabilities": np.full((len(texts), n), 1 / n, dtype=np.float32)}
    policy = PolicySource(Policy(), calibrations.current)
    cascade = Cascade(LABELS, lambda: None, policy)
    model = CascadeModel(cascade, Student, calibrations)
    answers, _ = model.answers([b"a text"])
    assert answers[0].answered_by == "student" and policy.threshold == 0.5        # 0.6 >= 0.5
    version(2, [*LABELS, "close_account"], 0.7)
    answering["version"] = "2"
    answers, probs = model.answers([b"a text"])
    assert cascade.labels == [*LABELS, "close_account"] and policy.threshold == 0.7 and probs.shape == (1, 4)
    assert answers[0].fallback == "teacher_error"      # 0.6 < 0.7: deferred (this teacher is no teacher at all)


def test_a_student_that_cannot_be_reached_is_one_line_and_exit_1(tmp_path, capsys):
    """The environment's failure (Compose and Kubernetes start the cascade again), said before it serves."""
    calibration = Calibration(labels=LABELS, source="held", samples=0)
    (tmp_path / "pgkd-calibration.json").write_text(calibration.model_dump_json())
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code = main(["cascade", "serve", "--student", f"http://127.0.0.1:{port}", "--teacher",
                 "openai://127.0.0.1:1/v1?model=m", "--calibration", str(tmp_path), "--threshold", "0.5",
                 "--student-timeout", "2", *ports()])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"pgkd: --student http://127.0.0.1:{port}"), err
    assert err[0].endswith("(or --wait-for-student, to wait for it)"), err


def test_with_wait_for_student_it_waits_for_a_first_version_instead_of_exiting(tmp_path):
    """A student server whose deployer has not written a first student yet (an empty model folder)."""
    from process_tools import Pgkd
    (tmp_path / "student").mkdir()
    waiting = Pgkd(tmp_path, "cascade", "serve", "--student", "http://127.0.0.1:1", "--teacher",
                   "openai://127.0.0.1:1/v1?model=m", "--calibration", str(tmp_path / "student"), "--wait-for-student",
                   *ports())
    try:
        waiting.wait_for("pgkd: waiting for the student", timeout=60)
        assert "neither a calibration" in waiting.log()
        time.sleep(3)
        assert waiting.process.poll() is None      # still waiting
    finally:
        waiting.kill()


def test_a_version_that_is_not_a_number_never_becomes_a_path(tmp_path):
    from pgkd.serving.cascade import ServedCalibration
    (tmp_path / "student" / "1").mkdir(parents=True)
    (tmp_path / "student" / "1" / "pgkd-calibration.json").write_text(Calibration(labels=LABELS, source="h",
                                                                                   samples=0).model_dump_json())
    (tmp_path / "pgkd-calibration.json").write_text(Calibration(labels=["x"], source="h", samples=0).model_dump_json())
    calibrations = ServedCalibration(tmp_path / "student")
    assert calibrations.for_version("..") is None and calibrations.for_version("../..") is None
    assert calibrations.current.labels == LABELS


def test_a_student_gone_mid_traffic_is_the_servers_failure_not_the_texts(tmp_path, monkeypatch):
    """Every row says the student could not answer, and `pgkd classify` / the Python API take that as an
    environment failure (exit 1), not as a refused text (exit 2)."""
    from pgkd.errors import EnvironmentFailure
    from pgkd.serving.cascade import ServedCalibration
    from pgkd.serving.cascade_server import CascadeModel
    from pgkd.serving.client import STUDENT_UNAVAILABLE, StudentClient

    class Gone:
        def infer(self, texts):
            raise EnvironmentFailure("http://127.0.0.1:1: [Errno 111] Connection refused")
    (tmp_path / "pgkd-calibration.json").write_text(Calibration(labels=LABELS, source="held", samples=0).model_dump_json())
    model = CascadeModel(Cascade(LABELS, lambda: None, PolicySource(Policy(threshold=0.5))), Gone,
                         ServedCalibration(tmp_path / "pgkd-calibration.json"))
    (response,) = model([{"text": np.array([[b"a text"], [b"another"]], dtype=np.object_)}])
    errors = [e.decode() for e in response["error"].reshape(-1)]
    assert all(e.startswith(STUDENT_UNAVAILABLE) and "Connection refused" in e for e in errors), errors

    class Result:     # what tritonclient hands back for that response
        def as_numpy(self, name):
            return response.get(name)

        def get_response(self):
            return {"model_version": "1"}
    client = StudentClient("http://127.0.0.1:1", "cascade")
    monkeypatch.setattr(client, "_call", lambda *a, **k: Result())
    with pytest.raises(EnvironmentFailure, match=STUDENT_UNAVAILABLE):
        client.infer(["a text", "another"])
    response["error"] = np.array([[b""], [b"text 2: empty"]], dtype=np.object_)
    with pytest.raises(UserError, match="the server refused the request: text 2: empty"):
        client.infer(["a text", ""])

