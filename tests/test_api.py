"""The Python API: pgkd.distill with names, with a user's own teacher and student objects, with
samples in memory; and the README's snippet, run exactly as written."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_CLASSES, make_toy_dataset

import pgkd
import pgkd.errors

REPO = Path(__file__).resolve().parents[1]
TINY = dict(labeled=40, epochs=2, cycle_epochs=1, learning_rate=1e-2, head_learning_rate=1e-2, batch_size=16,
            samples_per_cycle=8, seed=1, progress=False)


class ParaphrasingTeacher:
    """A plain class, not one of pgkd's: it answers with dicts, and one item that is not a sample."""

    def __init__(self):
        self.requests = []

    def generate(self, request):
        self.requests.append(request)
        words = {label: words for label, words in TOY_CLASSES.items()}
        rows = [{"text": f"{' '.join(words[label][:3])} please number {request.cycle} {i}", "label": label}
                for i, label in enumerate(request.taxonomy * 2)]
        return rows + [{"text": 42}]


def test_a_users_own_teacher_object_drives_a_two_cycle_run(tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    teacher = ParaphrasingTeacher()
    result = pgkd.distill(data, teacher=teacher, student="tiny", max_cycles=2, **TINY)
    report = result.report
    assert [c.cycle for c in report.cycles] == [0, 1, 2]
    assert [r.cycle for r in teacher.requests] == [1, 2] and all(r.n == 8 for r in teacher.requests)
    prompt = pgkd.render_prompt(teacher.requests[0])        # what an LLM client would send its model
    assert teacher.requests[0].report is not None and all(label in prompt for label in TOY_CLASSES)
    for cycle in report.cycles[1:]:
        assert (cycle.generated, cycle.accepted) == (8, 8) and cycle.rejected == {"malformed_sample": 1}
    assert report.cycles[2].train_size == report.cycles[0].train_size + 16
    assert report.teacher["kind"] == "python object" and report.teacher["class"].endswith("ParaphrasingTeacher")
    assert report.config["teacher"] == "python:ParaphrasingTeacher"
    assert set(result.student.predict(["lost my card", "refund please"])) <= set(TOY_CLASSES)
    assert not list(tmp_path.glob("*/report.json"))         # no `out`: nothing written


class CentroidStudent:
    """A user's student: nearest class centroid of bag-of-words vectors."""

    def __init__(self, labels):
        self.labels = sorted(labels)
        self.centroids = np.zeros((len(self.labels), 64))
        self.trained_on = []

    def _vectors(self, texts):
        out = np.zeros((len(texts), 64))
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, sum(map(ord, word)) % 64] += 1
        return out

    def train(self, train, validation, config, progress=True, description="train"):
        self.trained_on.append(len(train))
        x = self._vectors([s.text for s in train])
        for j, label in enumerate(self.labels):
            self.centroids[j] = x[[s.label == label for s in train]].mean(axis=0)

    def predict_proba(self, texts):
        scores = -np.linalg.norm(self._vectors(texts)[:, None, :] - self.centroids[None], axis=2)
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def state(self):
        return self.centroids.copy()

    def load_state(self, state):
        self.centroids = state.copy()

    def save(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        np.save(Path(path) / "centroids.npy", self.centroids)


def test_samples_in_memory_and_a_users_own_student(tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    student = CentroidStudent(TOY_CLASSES)
    result = pgkd.distill(rows, teacher="pool-random", student=student, max_cycles=1, out=tmp_path / "run", **TINY)
    assert result.student is student and student.trained_on == [32, 40]     # cycle 0, then 8 more samples
    assert result.report.dataset["sizes"]["test"] == 48                       # a stratified 20% of 240
    assert result.report.student["spec"] == "python:CentroidStudent" and result.report.student["parameters"] is None
    assert result.report.best.test.accuracy > 0.5                             # chance is 0.25
    assert (tmp_path / "run" / "best" / "centroids.npy").is_file() and (tmp_path / "run" / "report.json").is_file()


def test_a_saved_student_loads_and_predicts(tmp_path):
    data = make_toy_dataset(tmp_path / "toy")
    result = pgkd.distill(str(data), teacher="pool-random", student="tiny", max_cycles=0, out=tmp_path / "run", **TINY)
    loaded = pgkd.load_student(tmp_path / "run" / "best")
    texts = ["wire to a payee", "reset my pin code"]
    assert loaded.predict(texts) == result.student.predict(texts)
    assert loaded.labels == result.student.labels == sorted(TOY_CLASSES)


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(TypeError, match="unknown option.*max_cycle\\b"):
        pgkd.distill(tmp_path, max_cycle=3)
    with pytest.raises(TypeError, match="warm_start=False"):
        pgkd.distill(tmp_path, student=CentroidStudent(["a"]), warm_start=False)
    with pytest.raises(pgkd.errors.UserError, match="an object with a generate"):
        pgkd.distill(make_toy_dataset(tmp_path / "toy"), teacher=object())
    with pytest.raises(pgkd.errors.UserError, match=r"data\[1\]: empty text"):
        pgkd.distill([{"text": "a", "label": "x"}, {"text": " ", "label": "y"}])
    # the trial's: each was an AttributeError or TypeError from deep inside, some after the run had begun
    for call, says in ((lambda: pgkd.distill(None), "data: expected a dataset's path"),
                       (lambda: pgkd.distill(123), "data: expected a dataset's path"),
                       (lambda: pgkd.distill(tmp_path, student=42), "student: expected a name, a folder, or an "
                                                                   "object with the pgkd.Student protocol"),
                       (lambda: pgkd.distill(tmp_path, out=123), "out: expected a folder's path"),
                       (lambda: pgkd.load_student(None), "path: expected a folder's path"),
                       (lambda: pgkd.classify(None, ["x"]), "url: expected a server's URL")):
        with pytest.raises(TypeError, match=says):
            call()
    student = CentroidStudent(["a"])
    with pytest.raises(TypeError, match=r"text 2: not a string \(int\)"):
        pgkd.students.contract.predicted_labels(student, ["fine", 1])


@pytest.mark.slow
def test_the_readmes_python_snippet_runs_as_written(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The Python API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracies, predicted = result.stdout.strip().splitlines()
    before, after = (float(x) for x in accuracies.split(" -> "))
    assert 0 < before <= 1 and 0 < after <= 1
    assert len(eval(predicted)) == 1                           # one label for the one text
