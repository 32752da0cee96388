"""A saved student read by plain transformers, as docs/python-api.md shows (issue "A new user's first hour"):
the pipeline reads a long text as `pgkd predict` does (its first 128 tokens, not the encoder's 512, and
no crash past them), the saved tokenizer says so, and those lines run without transformers'
"run the custom code? [y/N]" prompt even with a stdin that never answers."""
import ast
import concurrent.futures
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOY_CLASSES, make_toy_dataset

import pgkd
from pgkd.data import load_dataset, make_splits
from pgkd.types import TrainConfig
from pgkd.students.finetuned import FineTunedStudent

REPO = Path(__file__).resolve().parents[2]
PROMPT = "run the custom code"          # transformers' question, which waits 15 s for an answer


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    """The tiny student, trained a little on the toy task (its labels mean something), as pgkd saves it."""
    root = tmp_path_factory.mktemp("plain")
    splits = make_splits(load_dataset(make_toy_dataset(root / "toy")), 160, seed=0)
    student = FineTunedStudent.create("tiny", splits.labels, seed=0)
    student.train(splits.train, splits.validation,   # no linear probe: seconds, not a quarter of a minute
                  TrainConfig(epochs=2, batch_size=16, learning_rate=1e-2, head_learning_rate=1e-2,
                              freeze_word_embeddings=False, head_init="random", seed=0), progress=False)
    student.save(root / "best")
    return root / "best"


def words(label: str, n: int) -> str:
    vocabulary = TOY_CLASSES[label]
    return " ".join(vocabulary[i % len(vocabulary)] for i in range(n))


# Over 128 tokens (the 225-token ticket) and over 512 (its 902-token one); each begins in one class
# and goes on in another, so a reader of more than the first 128 tokens may well answer otherwise.
LONG_TEXTS = [words("card_lost", 100) + " " + words("refund", 125),
              words("transfer", 90) + " " + words("pin_change", 810),
              words("refund", 60) + " " + words("card_lost", 600),
              words("pin_change", 300),
              "please help, " + words("transfer", 200)]


def readme_snippet() -> str:
    """The block of docs/python-api.md (linked from the README) that loads a student with plain transformers."""
    page = (REPO / "docs" / "python-api.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "AutoModelForSequenceClassification" in b]
    assert len(blocks) == 1, "docs/python-api.md has one block that loads a student with plain transformers"
    assert '"runs/demo/best"' in blocks[0]
    return blocks[0]


@pytest.fixture(scope="module")
def plain_runs(saved_student, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Programs that import transformers and not pgkd, run at once (each spends most of its time importing
    torch), with a stdin that stays open and is never written: a prompt would wait on it (subprocess.run's
    own stdin=PIPE closes it, and on a closed stdin transformers' input() fails at once)."""
    programs = {
        "pipeline": f"""
import json, sys
from transformers import pipeline
classify = pipeline("text-classification", model={str(saved_student)!r}, trust_remote_code=True)
labels = [answer["label"] for answer in classify({LONG_TEXTS!r})]
assert not any(name.split(".")[0] == "pgkd" for name in sys.modules), "pgkd was imported"
print("ANSWER", json.dumps(labels))
""",
        "readme": readme_snippet().replace('"runs/demo/best"', repr(str(saved_student))),
    }
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("modules")), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    read_end, write_end = os.pipe()

    def run(code: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([sys.executable, "-c", code], stdin=read_end, capture_output=True, text=True,
                                  env=env, timeout=120)
        except subprocess.TimeoutExpired as e:   # a prompt waiting on stdin: the test says so
            return subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", e.stderr or "")

    try:
        with concurrent.futures.ThreadPoolExecutor(len(programs)) as pool:
            return dict(zip(programs, pool.map(run, programs.values())))
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_plain_pipeline_labels_long_texts_as_pgkd_predict(saved_student, plain_runs):
    done = plain_runs["pipeline"]
    assert PROMPT not in done.stdout + done.stderr
    assert done.returncode == 0, done.stderr[-2000:]
    student = pgkd.load_student(saved_student)
    tokens = [len(ids) for ids in student.tokenizer(LONG_TEXTS)["input_ids"]]
    assert min(tokens) > 128 and max(tokens) > 512, tokens
    expected = student.predict(LONG_TEXTS)
    assert json.loads(done.stdout.rsplit("ANSWER ", 1)[1]) == expected
    assert len(set(expected)) > 1, expected          # the comparison tells texts apart


class TokenizerSpy:
    """A tokenizer that records the max_length it is called with."""

    def __init__(self, tokenizer):
        self.tokenizer, self.max_lengths = tokenizer, set()

    def __call__(self, texts, **options):
        self.max_lengths.add(options.get("max_length"))
        return self.tokenizer(texts, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_the_saved_tokenizer_says_the_length_pgkd_reads(saved_student):
    student = pgkd.load_student(saved_student)
    student.tokenizer = spy = TokenizerSpy(student.tokenizer)
    student.predict(LONG_TEXTS[:1])
    config = json.loads((saved_student / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {config["model_max_length"]} == spy.max_lengths == {128}
    from pgkd.types import MAX_LENGTH   # the one declared fact
    assert MAX_LENGTH == 128


def test_the_readmes_transformers_lines_run_as_written_without_a_prompt(saved_student, plain_runs):
    done = plain_runs["readme"]
    assert PROMPT not in done.stdout + done.stderr, done.stdout[-500:]
    assert done.returncode == 0, done.stderr[-2000:]
    printed = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    labels = pgkd.load_student(saved_student).labels
    assert printed and all(answer["label"] in labels for answer in printed)


def test_a_student_saved_by_an_earlier_pgkd_loads_and_saved_again_says_128(saved_student, tmp_path):
    """A folder from before: no custom pipeline in config.json, the encoder's 512 in tokenizer_config.json."""
    old = tmp_path / "old"
    old.mkdir()
    for path in saved_student.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    config = json.loads((old / "config.json").read_text(encoding="utf-8"))
    config.pop("custom_pipelines", None)
    (old / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer_config = json.loads((old / "tokenizer_config.json").read_text(encoding="utf-8"))
    (old / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 512}),
                                               encoding="utf-8")
    student = pgkd.load_student(old)
    assert student.predict(LONG_TEXTS) == pgkd.load_student(saved_student).predict(LONG_TEXTS)
    student.save(tmp_path / "new")                    # as docs/python-api.md says
    again = json.loads((tmp_path / "new" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert again["model_max_length"] == 128
    config = json.loads((tmp_path / "new" / "config.json").read_text(encoding="utf-8"))
    assert "text-classification" in config["custom_pipelines"]
    assert pgkd.load_student(tmp_path / "new").predict(LONG_TEXTS) == student.predict(LONG_TEXTS)
