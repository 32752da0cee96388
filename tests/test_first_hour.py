"""A new user's first hour (issue 26): inputs a first user gives by mistake get one clear error, or the
obvious answer, never a traceback, a hang or a wait on the hub."""
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import TOY_CLASSES, make_toy_dataset

import pgkd
from pgkd.errors import UserError
from pgkd.types import MAX_TEXT_CHARS
from pgkd.students.finetuned import FineTunedStudent

TINY = dict(labeled=40, epochs=1, cycle_epochs=1, learning_rate=1e-2, head_learning_rate=1e-2, batch_size=16,
            samples_per_cycle=8, seed=1, progress=False)


def pgkd_command(*args, env=None, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student") / "best"
    FineTunedStudent.create("tiny", sorted(TOY_CLASSES)).save(folder)
    return folder


# -- a loaded student's predict --------------------------------------------------------------------------

def test_no_texts_predict_nothing(saved_student):
    student = pgkd.load_student(saved_student)
    assert student.predict([]) == []
    assert student.predict_proba([]).shape == (0, len(TOY_CLASSES))


def test_a_string_for_a_list_of_texts_is_a_type_error_naming_the_fix(saved_student):
    student = pgkd.load_student(saved_student)
    with pytest.raises(TypeError, match=r"a list of texts.*\[text\]"):
        student.predict("lost my card")
    with pytest.raises(TypeError, match=r"a list of texts"):
        student.predict_proba("lost my card")


class TokenizerSpy:
    """A tokenizer that records the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **options):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tokenizer(texts, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_text_of_megabytes_predicts_quickly_as_its_first_characters(saved_student):
    """Only the first 128 tokens are read: the tokenizer must not be given the whole text (20 MB took
    a minute and 3 GB)."""
    student = pgkd.load_student(saved_student)
    student.tokenizer = spy = TokenizerSpy(student.tokenizer)
    text = "please refund my money back now " * 250_000          # 8 MB
    label = student.predict([text])
    assert spy.longest <= MAX_TEXT_CHARS
    assert label == student.predict([text[:MAX_TEXT_CHARS]])


def test_an_unknown_student_name_fails_at_once_without_the_hub(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    data = make_toy_dataset(tmp_path / "toy")
    # Before: 22 lines of hub retries over about a minute, then the error. What shows the hub was not
    # tried is the output (no retry line), not a time, which a busy machine can stretch.
    done = pgkd_command("distill", "--data", str(data), "--student", "no-such-model", "--labeled", "40",
                        "--out", str(tmp_path / "run"), "--no-progress", env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "retry" in line.lower()]
    assert errors == [errors[-1]] and "no-such-model" in errors[-1] and "'minilm'" in errors[-1], done.stderr
    assert "Traceback" not in done.stderr


# -- data that cannot be split ------------------------------------------------------------------------------

def test_labels_all_of_one_class_are_refused_before_training():
    rows = [{"text": f"refund my money number {i}", "label": "refund"} for i in range(50)]
    with pytest.raises(UserError, match="at least two"):
        pgkd.distill(rows, teacher="pool-random", student="tiny", max_cycles=0, **TINY)


def test_two_samples_a_class_are_refused_before_training():
    rows = [{"text": f"{words[0]} {words[1]} {i}", "label": label} for label, words in TOY_CLASSES.items()
            for i in range(2)]
    with pytest.raises(UserError, match="none to validate on"):
        pgkd.distill(rows, teacher="pool-random", student="tiny", max_cycles=0, **{**TINY, "labeled": 4})


def test_the_command_refuses_one_class_data_in_one_line(tmp_path):
    (tmp_path / "one").mkdir()
    rows = "".join(f'{{"text": "refund my money {i}", "label": "refund"}}\n' for i in range(40))
    (tmp_path / "one" / "train.jsonl").write_text(rows)
    (tmp_path / "one" / "test.jsonl").write_text(rows)
    done = pgkd_command("distill", "--data", str(tmp_path / "one"), "--student", "tiny", "--labeled", "10",
                        "--out", str(tmp_path / "run"), "--no-progress", timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "pgkd: error:" in done.stderr and "class" in done.stderr


# -- a user's teacher that never answers ------------------------------------------------------------------

class SilentTeacher:
    def __init__(self):
        self.never = threading.Event()

    def generate(self, request):
        self.never.wait()


@pytest.mark.timeout(120)       # before the fix, the run waited forever
def test_a_users_teacher_that_never_answers_stops_the_run_at_the_teacher_timeout(tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    teacher = SilentTeacher()
    started = time.monotonic()
    try:
        result = pgkd.distill(data, teacher=teacher, student="tiny", max_cycles=2, teacher_timeout=1.0,
                              out=tmp_path / "run", **TINY)
    finally:
        teacher.never.set()
    assert time.monotonic() - started < 60
    assert result.report.stop_reason.startswith("teacher_unavailable") and "timed out" in result.report.stop_reason
    assert (tmp_path / "run" / "report.json").is_file()


# -- export and classify ----------------------------------------------------------------------------------

def test_exporting_none_is_a_type_error_that_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="student"):
        pgkd.export(None, tmp_path / "models")
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("texts, options, error, match", [
    ("hello", {}, TypeError, "a list of texts"),
    (["fine", "bad \udc80 text"], {}, UserError, "text 2: not UTF-8"),
    (["hello"], {"batch_size": 0}, UserError, "batch_size=0"),
    (["hello"], {"batch_size": -1}, UserError, "batch_size=-1"),
    (["hello"], {"batch_size": 2.5}, TypeError, "batch_size"),
    (["hello"], {"timeout": 0}, UserError, "timeout=0"),
])
def test_classify_checks_its_arguments_before_any_request(texts, options, error, match):
    with pytest.raises(error, match=match):
        pgkd.classify("http://127.0.0.1:9", texts, **options)      # nothing listens on port 9


def test_classify_command_with_batch_size_zero_is_one_line():
    done = pgkd_command("classify", "--batch-size", "0", "--url", "http://127.0.0.1:9", "hello")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "batch" in done.stderr, done.stderr
