"""A new user's first hour, the errors (issue 26, continued): a wait that ends, a damaged record named,
an answer that does not echo a long text, messages that name the caller's own parameter (`labeled=` in
Python, `--labeled` on the command line), and inputs refused before any work with one clear line."""
import json
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import TOY_CLASSES, make_toy_dataset
from pydantic import ValidationError

import pgkd
from pgkd.cli import build_parser, main
from pgkd.artifacts import ArtifactRef, ArtifactStore
from pgkd.distributed.messages import RunRequested
from pgkd.distributed.runs import RunFiles, fail_run
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.students.finetuned import FineTunedStudent

TINY = dict(labeled=40, epochs=1, cycle_epochs=1, learning_rate=1e-2, head_learning_rate=1e-2, batch_size=16,
            samples_per_cycle=8, seed=1, progress=False)


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student") / "best"
    FineTunedStudent.create("tiny", sorted(TOY_CLASSES)).save(folder)
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("data") / "toy")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def with_broker(kafka_url, tmp_path):
    """The real broker (Tansu), its topics created; the environment of a `pgkd` command that uses it."""
    from service_processes import ServiceProcesses
    bus = ServiceProcesses(kafka_url, tmp_path)
    created = bus.pgkd("topics", "create", timeout=60)
    assert created.returncode == 0, created.stderr
    return bus


# -- 1. `pgkd submit --wait` with no service running ---------------------------------------------------------

def test_submit_wait_with_no_service_running_ends_in_one_line(kafka_url, tmp_path):
    """Before: one line ("submitted run ..."), then nothing, forever."""
    bus = with_broker(kafka_url, tmp_path)
    data = make_toy_dataset(tmp_path / "toy")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pgkd.cli", "submit", "--data", str(data), "--labeled", "40",
                           "--run-id", "nobody", "--wait", "--start-timeout", "2"], env=bus.env, capture_output=True,
                          text=True, timeout=90)
    assert time.monotonic() - started < 60
    assert done.returncode == 1 and "submitted run nobody" in done.stdout, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert "run nobody: no trainer has taken it in 2 s" in line and "are the services running" in line, line
    assert "pgkd status nobody" in line
    assert bus.store.exists(RunFiles("nobody").request)          # it stays submitted
    assert build_parser().parse_args(["submit", "--data", "x", "--wait"]).start_timeout == 60   # the default


def test_a_run_a_trainer_took_is_waited_for_past_the_start_timeout(tmp_path):
    """The start timeout bounds the wait for a service only: a run that was taken takes as long as it needs."""
    from pgkd_services.cli import wait_for
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    files = RunFiles("slow")
    store.put_json(files.request, {})

    def trainer():
        time.sleep(0.3)
        store.put_bytes(f"{files.base}/handled/run-requested-0000.taken", b"")   # as a service marks it
        time.sleep(2.5)
        fail_run(store, "slow", 0, "the end")
    worker = threading.Thread(target=trainer)
    worker.start()
    try:
        completed = wait_for(store, "slow", timeout=None, poll=0.1, start_timeout=1.0)
    finally:
        worker.join()
    assert (completed.run_id, completed.reason) == ("slow", "the end")
    store.put_json(RunFiles("untaken").request, {})
    with pytest.raises(TimeoutError, match="run untaken: no trainer has taken it in 0.5 s"):
        wait_for(store, "untaken", timeout=None, poll=0.1, start_timeout=0.5)


# -- 2. a damaged record in the store ---------------------------------------------------------------------

def a_request(store, run_id="run1") -> RunRequested:
    request = RunRequested(run_id=run_id, cycle=0, config=DistillConfig(data="toy").model_dump(mode="json"),
                           dataset=ArtifactRef(uri=store.uri("datasets/x.json"), sha256="0" * 64, size=0))
    store.put_json(f"runs/{run_id}/request.json", request.model_dump(mode="json"))
    return request


@pytest.mark.parametrize("record", [{"run_id": "run1", "broker": "kafka://x:1"}, ["reason"]])
def test_status_of_a_not_submitted_record_without_its_reason_names_the_file(record, tmp_path, monkeypatch, capsys):
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("PGKD_ARTIFACTS", store.url)
    a_request(store)
    store.put_json("runs/run1/not_submitted.json", record)
    assert main(["status", "run1"]) == 2
    line = one_error_line(capsys)
    assert "runs/run1/not_submitted.json: damaged" in line and "reason" in line, line


def test_status_of_a_request_whose_config_is_not_one_names_the_file(tmp_path, monkeypatch, capsys):
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("PGKD_ARTIFACTS", store.url)
    request = a_request(store).model_dump(mode="json")
    store.put_json("runs/run1/request.json", {**request, "config": {"student": "tiny"}})
    assert main(["status", "run1"]) == 2
    line = one_error_line(capsys)
    assert "runs/run1/request.json: damaged" in line and "config.data" in line and "--data" not in line, line


# -- 3. `pgkd predict` does not echo a long text ---------------------------------------------------------

def test_predict_shows_a_long_text_as_its_start_and_a_short_one_whole(saved_student, capsys):
    long = "please refund my money back now " * 1000
    assert main(["predict", "--model", str(saved_student), "lost my card", long]) == 0
    out = capsys.readouterr().out
    short_row, long_row = (json.loads(line) for line in out.splitlines())
    assert short_row["text"] == "lost my card"
    assert len(long_row["text"]) <= 60 and long_row["text"].endswith("…") and long.startswith(long_row["text"][:-1])
    assert long_row["label"] in TOY_CLASSES and 0 < long_row["probability"] <= 1
    assert len(out) < 400


# -- 4. the same fact, named as the caller names it --------------------------------------------------------

def no_cuda(monkeypatch):     # nor MPS: the machine these cases describe, whatever runs them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


CASES = {
    "labeled below the classes": (
        lambda toy, student, tmp: pgkd.distill(toy, student="tiny", **{**TINY, "labeled": 2}),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "tiny", "--labeled", "2",
                                   "--out", str(tmp / "run")],
        "labeled=2 is smaller", "--labeled 2 is smaller"),
    "labeled above train": (
        lambda toy, student, tmp: pgkd.distill(toy, student="tiny", **{**TINY, "labeled": 100000}),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "tiny", "--labeled", "100000",
                                   "--out", str(tmp / "run")],
        "labeled=100000 is larger", "--labeled 100000 is larger"),
    "a teacher URL with no host": (
        lambda toy, student, tmp: pgkd.distill(toy, teacher="triton://", student="tiny"),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--teacher", "triton://", "--out", str(tmp / "r")],
        "teacher='triton://': no host", "--teacher triton://: no host"),
    "a teacher URL's port": (
        lambda toy, student, tmp: pgkd.distill(toy, teacher="triton://h:99999/m", student="tiny"),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--teacher", "triton://h:99999/m",
                                   "--out", str(tmp / "r")],
        "teacher='triton://h:99999/m': port '99999': not a port", "--teacher triton://h:99999/m: port '99999'"),
    "an out under a file": (
        lambda toy, student, tmp: pgkd.distill(toy, student="tiny", out=tmp / "afile" / "run", **TINY),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "tiny", "--labeled", "40",
                                   "--out", str(tmp / "afile" / "run")],
        "out='", "--out /"),
    "a device of no such name": (
        lambda toy, student, tmp: pgkd.distill(toy, student="minilm-frozen", device="tpu", **TINY),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "minilm-frozen", "--device", "tpu",
                                   "--dry-run"],
        "device='tpu': not a device", "--device tpu: not a device"),
    "no CUDA device for the frozen student": (
        lambda toy, student, tmp: pgkd.distill(toy, student="minilm-frozen", device="cuda", out=tmp / "r", **TINY),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "minilm-frozen", "--device", "cuda",
                                   "--labeled", "40", "--out", str(tmp / "r")],
        "device='cuda': no CUDA device", "--device cuda: no CUDA device"),
    "no MPS device": (
        lambda toy, student, tmp: pgkd.load_student(student, device="mps"),
        lambda toy, student, tmp: ["predict", "--model", str(student), "--device", "mps", "hello"],
        "device='mps': no MPS device", "--device mps: no MPS device"),
    "no CUDA device in a dry run": (
        None, lambda toy, student, tmp: ["distill", "--data", str(toy), "--device", "cuda", "--dry-run"],
        None, "--device cuda: no CUDA device"),
    "an empty student in a dry run": (
        None, lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "", "--dry-run"],
        None, "unknown student ''"),
    "an unknown student in a dry run": (
        lambda toy, student, tmp: pgkd.distill(toy, student="bogus", out=tmp / "r", **TINY),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--student", "bogus", "--dry-run"],
        "unknown student 'bogus'", "unknown student 'bogus'"),
    "no CUDA device": (
        lambda toy, student, tmp: pgkd.load_student(student, device="cuda"),
        lambda toy, student, tmp: ["predict", "--model", str(student), "--device", "cuda", "hello"],
        "device='cuda': no CUDA device", "--device cuda: no CUDA device"),
    "a URL that is not http or grpc": (
        lambda toy, student, tmp: pgkd.classify("ftp://x", ["hello"]),
        lambda toy, student, tmp: ["classify", "--url", "ftp://x", "hello"],
        "url='ftp://x': expected http://HOST:PORT", "--url ftp://x: expected http://HOST:PORT"),
    "a URL with a password (never printed)": (
        lambda toy, student, tmp: pgkd.classify("http://me:s3cret@127.0.0.1:8000", ["hello"]),
        lambda toy, student, tmp: ["classify", "--url", "http://me:s3cret@127.0.0.1:8000", "hello"],
        "url='http://127.0.0.1:8000' (a user and password before it, not shown)",
        "--url http://127.0.0.1:8000 (a user and password before it, not shown)"),
    "a URL's port": (
        lambda toy, student, tmp: pgkd.classify("http://127.0.0.1:0", ["hello"]),
        lambda toy, student, tmp: ["classify", "--url", "http://127.0.0.1:0", "hello"],
        "url='http://127.0.0.1:0': port '0'", "--url http://127.0.0.1:0: port '0'"),
    "int8 in TorchScript": (
        lambda toy, student, tmp: pgkd.export(student, tmp / "models", fmt="torch", int8=True),
        lambda toy, student, tmp: ["serve", "--model", str(student), "--format", "torch", "--int8"],
        "int8=True needs fmt='onnx'", "--int8 needs --format onnx"),
    "an empty data path": (
        lambda toy, student, tmp: pgkd.distill("", student="tiny"),
        lambda toy, student, tmp: ["distill", "--data", "", "--out", str(tmp / "r")],
        "data='': an empty name", "--data : an empty name"),
    "a taxonomy the data outgrows": (
        lambda toy, student, tmp: pgkd.distill(toy, student="tiny", taxonomy=tmp / "one.csv", **TINY),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--taxonomy", str(tmp / "one.csv"),
                                   "--out", str(tmp / "r")],
        "one.csv: no row for label(s)", "one.csv: no row for label(s)"),
    "a cost budget without prices": (
        lambda toy, student, tmp: pgkd.distill(toy, student="tiny", cost_budget=1.0),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--cost-budget", "1", "--out", str(tmp / "r")],
        "cost_budget=1.0 would never stop the run: without price_prompt_per_1k",
        "--cost-budget 1.0 would never stop the run: without --price-prompt-per-1k"),
    "a target score no share reaches": (
        lambda toy, student, tmp: pgkd.distill(toy, student="tiny", target_score=5.0),
        lambda toy, student, tmp: ["distill", "--data", str(toy), "--target-score", "5", "--dry-run"],
        "target_score=5.0 would never stop the run: metric='macro_f1' is between 0 and 1",
        "--target-score 5.0 would never stop the run: --metric macro_f1 is between 0 and 1"),
    "an empty text to predict": (
        None, lambda toy, student, tmp: ["predict", "--model", str(student), "hello", " "],
        None, "argument 2: an empty text"),
    "an unknown format": (
        lambda toy, student, tmp: pgkd.export(student, tmp / "models", fmt="tflite"),
        None, "fmt='tflite': one of onnx, torch", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_python_caller_is_told_the_argument_and_a_command_the_flag(case, toy, saved_student, tmp_path, monkeypatch,
                                                                    capsys):
    (tmp_path / "afile").write_text("a file\n")
    (tmp_path / "one.csv").write_text("label,description\ncard_lost,the card is lost\n")
    no_cuda(monkeypatch)
    call, argv, in_python, on_command = CASES[case]
    if call is not None:
        with pytest.raises((UserError, ValidationError)) as raised:
            call(toy, saved_student, tmp_path)
        message = str(raised.value)
        assert in_python in message and "--" not in message, message
    if argv is not None:
        assert main(argv(toy, saved_student, tmp_path)) == 2
        line = one_error_line(capsys)
        assert on_command in line, line


# -- 5. bad input: one line, before any work --------------------------------------------------------------

def test_send_refuses_a_row_too_large_for_kafka_naming_its_line_and_sends_nothing(kafka_url, tmp_path):
    """Before: the first rows went out, then MessageSizeTooLargeError, naming neither the line nor how
    many had been sent."""
    bus = with_broker(kafka_url, tmp_path)
    rows = [{"text": "lost my card", "label": "card_lost"}, {"text": "refund please", "label": "refund"},
            {"text": "x" * 2_000_000, "label": "refund"}, {"text": "wire to a payee", "label": "transfer"}]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = bus.pgkd("send", str(tmp_path / "labels.jsonl"), "--no-progress", timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert f"{tmp_path / 'labels.jsonl'}:3: a row of 2,000,0" in done.stderr and "nothing was sent" in done.stderr
    assert bus.bodies("labeled-samples") == []


class Answers42:
    def generate(self, request):
        return 42


def test_a_teacher_answering_42_is_counted_malformed_not_a_type_error(toy):
    result = pgkd.distill(toy, teacher=Answers42(), student="tiny", max_cycles=1, **{**TINY, "batch_size": 64})
    assert result.report.cycles[1].rejected == {"malformed_sample": 1}
    assert result.report.cycles[1].accepted == 0


@pytest.mark.parametrize("text, message", [
    (123, r"data\[5\]: the text is not a string \(int 123\)"),            # was "empty text"
    (["a", "list"], r"data\[5\]: the text is not a string \(list"),
    ("caf\udce9 au lait", r"data\[5\]: the text is not UTF-8 text \(a lone surrogate at character 4\)"),  # a TypeError
])
def test_a_python_text_that_is_not_a_string_or_not_utf8_is_named_as_such(text, message):
    rows = [{"text": f"{words[0]} {words[1]} {i}", "label": label} for label, words in TOY_CLASSES.items()
            for i in range(12)]
    rows[5] = {"text": text, "label": rows[5]["label"]}
    with pytest.raises(UserError, match=message):
        pgkd.distill(rows, teacher="pool-random", student="tiny", max_cycles=0, **{**TINY, "labeled": 20})


def test_a_loaded_student_refuses_a_lone_surrogate_naming_the_text(saved_student):
    student = pgkd.load_student(saved_student)
    with pytest.raises(UserError, match="text 2: not UTF-8 text"):
        student.predict(["café", "caf\udce9"])


def test_export_into_a_folder_under_a_file_is_one_line_before_the_student_loads(saved_student, tmp_path, capsys,
                                                                                  monkeypatch):
    (tmp_path / "afile").write_text("a file\n")

    def loads(*args, **kwargs):
        raise AssertionError("the student was loaded: the check came after the work")
    monkeypatch.setattr("pgkd.serving.student_from", loads)
    assert main(["export", str(saved_student), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder" in one_error_line(capsys)
    with pytest.raises(UserError, match="afile is a file, not a folder"):
        pgkd.export(pgkd.load_student(saved_student), tmp_path / "afile" / "sub")


# -- what a hostile trial on a fresh clone found after the fixes above ------------------------------------

@pytest.mark.parametrize("device", ["tpu", "", "meta"])
def test_a_device_torch_refuses_or_that_holds_no_numbers_is_one_line(device, saved_student, capsys):
    with pytest.raises(UserError, match=f"device='{device}': not a device"):
        pgkd.load_student(saved_student, device=device)
    assert main(["predict", "--model", str(saved_student), "--device", device, "hi"]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}: not a device" in err and len(err.strip().splitlines()) == 1, err


def test_a_student_folder_without_its_tokenizer_is_refused_not_answered_with_unknown_words(saved_student, tmp_path):
    import shutil
    damaged = tmp_path / "student"
    shutil.copytree(saved_student, damaged)
    for name in ("tokenizer.json", "vocab.txt"):
        (damaged / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match="no tokenizer"):
        pgkd.load_student(damaged)


@pytest.mark.parametrize("option, value", [("labeled", 0), ("max_cycles", -1)])
def test_the_apis_option_errors_are_a_user_error_naming_the_parameter(option, value, toy):
    with pytest.raises(UserError) as raised:
        pgkd.distill(toy, student="tiny", **{option: value})
    message = str(raised.value)
    assert message.startswith(f"{option}={value}: ") and "\n" not in message and "pydantic" not in message, message


def test_a_jsonl_file_without_the_text_column_names_the_column_not_an_empty_text(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": "hello there", "label": "x"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"train.jsonl:1: no 'text' field \(fields: a, label\)"):
        pgkd.distill(data, student="tiny")


def test_classifys_numbers_and_model_name_are_named_as_the_command_spells_them(capsys):
    for argv, says in [(["--timeout", "0"], "--timeout 0.0: must be more than 0"),
                       (["--batch-size", "0"], "--batch-size 0: must be more than 0"),
                       (["--model-name", "../x"], "--model-name '../x': not a name")]:
        assert main(["classify", "--url", "http://127.0.0.1:1", *argv, "hi"]) == 2
        assert says in capsys.readouterr().err
    with pytest.raises(UserError, match="model='../x': not a name"):
        pgkd.classify("http://127.0.0.1:1", ["hi"], model="../x")


def test_export_int8_takes_a_bool_not_a_truthy_string(saved_student, tmp_path):
    with pytest.raises(TypeError, match="int8 is True or False, got 'no'"):
        pgkd.export(saved_student, tmp_path / "models", int8="no")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("out", ["/proc/pgkd-x", "/sys/pgkd-x"])
def test_export_where_nothing_can_be_written_is_one_line_before_the_student_loads(out, saved_student, capsys,
                                                                                  monkeypatch):
    """/proc and /sys take no new folder (even for root): said as --out, exit 2, before the export's work."""
    def loads(*args, **kwargs):
        raise AssertionError("the student was loaded: the check came after the work")
    monkeypatch.setattr("pgkd.serving.student_from", loads)
    assert main(["export", str(saved_student), "--out", out]) == 2
    assert f"--out {out}: cannot write there (" in one_error_line(capsys)
    assert main(["export", str(saved_student), "--format", "hf", "--out", out]) == 2
    assert f"--out {out}: cannot write there (" in one_error_line(capsys)
    with pytest.raises(UserError, match=f"repository {out}: cannot write there"):
        pgkd.export(pgkd.load_student(saved_student), out)
