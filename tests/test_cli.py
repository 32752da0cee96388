"""The command line: bad input is one line on stderr and exit code 2, and no output folder."""
import json
import subprocess
import sys

import pytest
from conftest import write_jsonl
from pgkd.cli import main

TINY = ["--student", "tiny", "--labeled", "40", "--epochs", "1", "--max-cycles", "0", "--no-progress"]


def _bad(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("make_args, message", [
    (lambda d, t: ["--data", str(t / "missing")], "no such file or folder"),
    (lambda d, t: ["--data", str(d), "--labeled", "3"], "smaller than the number of classes (4)"),
    # what it says is enough is: --labeled 5 runs (the trial: it said 8, and 5 ran)
    (lambda d, t: ["--data", str(d), "--labeled", "4"], "leave none to validate on: each of the 4 classes takes one to "
                                                        "train on, and validation takes the second of a class (5 "
                                                        "labeled samples or more"),
    (lambda d, t: ["--data", str(d), "--student", "no/such-model"], "unknown student 'no/such-model'"),
    (lambda d, t: ["--data", str(d), "--teacher", "gpt-9"], "unknown teacher 'gpt-9'"),
    (lambda d, t: ["--data", str(d), "--metric", "vibes"], "unknown metric 'vibes'"),
    (lambda d, t: ["--data", str(d), "--labeled", "many"], "invalid int value"),
    (lambda d, t: ["--data", str(d), "--samples-per-cycle", "0"], "--samples-per-cycle"),
    (lambda d, t: ["--data", str(d), "--teacher-cache", "s3://"], "--teacher-cache s3://: no bucket"),
    (lambda d, t: ["--data", str(d), "--teacher-cache", "ftp://x/y"], "--teacher-cache ftp://x/y: unknown scheme 'ftp'"),
])
def test_bad_distill_input(capsys, toy_data, tmp_path, make_args, message):
    out = tmp_path / "out"
    err = _bad(capsys, ["distill", *TINY, "--out", str(out), *make_args(toy_data, tmp_path)])
    assert message in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("argv, message", [
    (["bench", "bus", "--data", "d", "--repeats", "0"], "--repeats 0: expected 1 or more"),
    (["submit", "--data", "d", "--wait", "--timeout", "-5"], "--timeout -5: expected seconds, more than 0"),
    (["distill", "--data", "d", "--prompt-file", "p.txt", "--out", "o"], "--prompt-file p.txt: is for --dry-run only"),
    (["distill", "--data", "d"], "--out: required: the folder the run writes (only --dry-run runs without one)"),
    (["distill", "--data", "d", "--teacher", "openai://h:1/v1?model=m&key-env=K", "--dry-run"],
     "--teacher openai://h:1/v1?model=m&key-env=K: unknown parameter 'key-env' (it takes model, key_env, structured)"),
    (["distill", "--data", "d", "--taxonomy", "", "--dry-run"], "--taxonomy : an empty name"),
    (["submit", "--data", "d", "--dry-run", "--run-id", "a b"], "--run-id 'a b': not a name"),
    # an empty name is refused, not taken for the default (the trial: `--datasets ''` began all four datasets)
    (["bench", "quality", "--datasets", "", "--out", "o"], "--datasets: '': an empty item in a comma-separated list"),
    (["bench", "peers", "--seeds", "1,,2", "--out", "o"], "--seeds: '1,,2': an empty item"),
    (["stream", "status", ""], "stream '': not a name"),
])
def test_bad_command_options_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert message in _bad(capsys, argv)
    assert list(tmp_path.iterdir()) == []


def test_bad_data_files(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_jsonl(empty / "train.jsonl", [])
    write_jsonl(empty / "test.jsonl", [])
    err = _bad(capsys, ["distill", *TINY, "--data", str(empty), "--out", str(tmp_path / "o")])
    assert "train split is empty" in err
    unseen = tmp_path / "unseen"
    unseen.mkdir()
    write_jsonl(unseen / "train.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(5)])
    write_jsonl(unseen / "test.jsonl", [{"text": "x", "label": "zzz"}])
    assert "in test that train never had: zzz" in _bad(capsys, ["distill", *TINY, "--data", str(unseen),
                                                                "--out", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": "", "label": "a"}\n')
    write_jsonl(broken / "test.jsonl", [{"text": "x", "label": "a"}])
    assert f"{broken / 'train.jsonl'}:2: empty text" in _bad(
        capsys, ["distill", *TINY, "--data", str(broken), "--out", str(tmp_path / "o")])


def test_distill_then_predict(capsys, toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert main(["distill", "--data", str(toy_data), "--out", str(out), "--labeled", "40", "--student", "tiny",
                 "--teacher", "pool-random", "--epochs", "1", "--max-cycles", "1", "--cycle-epochs", "1",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "baseline (cycle 0)" in printed and "stopped: max_cycles" in printed
    assert main(["predict", "--model", str(out / "best"), "lost my card", "refund please"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    labels = {"card_lost", "refund", "transfer", "pin_change"}
    assert [r["text"] for r in rows] == ["lost my card", "refund please"]
    assert all(r["label"] in labels and 0 < r["probability"] <= 1 for r in rows)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO('{"text": "wire to payee"}\n\n"reset pin"\n'))
    assert main(["predict", "--model", str(out / "best")]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["wire to payee", "reset pin"]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO('{"txt": 1}\n'))
    assert "stdin:1: expected a JSON object" in _bad(capsys, ["predict", "--model", str(out / "best")])


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real entry point, in a fresh process: one line, exit 2."""
    result = subprocess.run([sys.executable, "-m", "pgkd.cli", "distill", "--data", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"pgkd: error: {tmp_path / 'nope'}: no such file or folder"]


def test_commands_that_train_nothing_start_without_torch():
    """torch, transformers and scikit-learn take seconds to import: `pgkd --help`, and the modules
    that the bus and store commands (submit, send, status, topics, stream) run from, must not pay that."""
    code = ("import sys, pgkd.cli, pgkd_services.cli, pgkd.stream\n"
            "try:\n    pgkd.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("teacher, message", [
    ("triton://:abc/x", "no host"),
    ("triton+grpc://h:x/m", "port 'x': not a port (a whole number from 1 to 65535)"),
    ("openai://h:abc/v1?model=m", "port 'abc': not a port (a whole number from 1 to 65535)"),
    ("triton://127.0.0.1:99999/x", "port '99999': not a port (a whole number from 1 to 65535)"),
    ("triton://127.0.0.1:0/x", "port '0': not a port (a whole number from 1 to 65535)"),
    ("triton://", "no host"),
    ("triton://h:8000/", "expected triton://HOST:PORT/MODEL"),
    ("openai://h:8000/v1", "expected openai://HOST:PORT/v1?model=NAME"),
])
def test_a_malformed_teacher_url_is_one_line(capsys, toy_data, tmp_path, teacher, message):
    out = tmp_path / "out"
    err = _bad(capsys, ["distill", *TINY, "--data", str(toy_data), "--out", str(out), "--teacher", teacher])
    assert f"--teacher {teacher}: {message}" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    from pgkd.students.finetuned import FineTunedStudent
    folder = tmp_path_factory.mktemp("student") / "best"
    FineTunedStudent.create("tiny", ["a", "b"], seed=0).save(folder)
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").unlink(), "no file named model.safetensors"),
    (lambda f: open(f / "model.safetensors", "r+b").truncate(1000), "SafetensorError"),
    (lambda f: (f / "config.json").write_text("{not json"), "not a readable saved student"),
])
def test_a_damaged_student_folder_is_one_line(capsys, saved_student, tmp_path, damage, message):
    import shutil
    folder = tmp_path / "damaged"
    shutil.copytree(saved_student, folder)
    damage(folder)
    err = _bad(capsys, ["predict", "--model", str(folder), "hello"])
    assert f"{folder}: not a readable saved student" in err and message in err


def test_predict_refuses_text_that_is_not_utf8(capsys, saved_student, monkeypatch):
    import io
    # Python hands undecodable bytes of an argument over as lone surrogates (b"caf\xe9" -> "caf\udce9").
    assert "argument 2: not UTF-8 text" in _bad(capsys, ["predict", "--model", str(saved_student), "ok",
                                                         b"caf\xe9".decode("utf-8", "surrogateescape")])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')))
    assert "stdin:2: not UTF-8 text (byte 0xe9" in _bad(capsys, ["predict", "--model", str(saved_student)])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "\\udcff"}\n')))
    assert "stdin:1: not UTF-8 text" in _bad(capsys, ["predict", "--model", str(saved_student)])
    # A byte-order mark (Excel's "UTF-8" files) is not text.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO('\ufeff{"text": "café"}\n'.encode())))
    assert main(["predict", "--model", str(saved_student)]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "café"


def test_an_engine_warning_reaches_the_terminal_as_a_pgkd_line():
    """Where no logging is set up (the commands; a service sets up its own), a warning of the engine's loggers
    is `pgkd: ...` on stderr, not a bare line from Python's last-resort handler."""
    code = ("import logging, sys; from pgkd import cli; cli._warnings_as_pgkd_lines(); "
            "logging.getLogger('pgkd.teachers').warning('teacher t refused structured answers'); "
            "logging.getLogger('pgkd.teachers').info('not shown')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "pgkd: teacher t refused structured answers\n")
