"""Two PGKD cycles with the real pretrained MiniLM student and the real sentence encoder behind the
simulated guided teacher, on a 10-class subset of banking77 (about a minute on 2 CPU cores)."""
import json

import pytest
from conftest import write_jsonl
from pgkd.cli import main
from pgkd.data import read_samples

pytestmark = pytest.mark.slow


@pytest.fixture
def banking10(banking77, tmp_path):
    train = read_samples(banking77 / "train.jsonl")
    test = read_samples(banking77 / "test.jsonl")
    classes = sorted({s.label for s in train})[:10]
    folder = tmp_path / "banking10"
    folder.mkdir()
    kept = {c: [s for s in train if s.label == c][:40] for c in classes}     # 100 labeled, a pool of 300
    write_jsonl(folder / "train.jsonl", [s.model_dump() for rows in kept.values() for s in rows])
    picked = {c: [s for s in test if s.label == c][:15] for c in classes}
    write_jsonl(folder / "test.jsonl", [s.model_dump() for rows in picked.values() for s in rows])
    return folder


def test_two_cycles_with_the_real_minilm_student(banking10, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--data", str(banking10), "--out", str(out), "--labeled", "100", "--student", "minilm",
                 "--teacher", "pool-guided", "--samples-per-cycle", "16", "--max-cycles", "2", "--epochs", "2",
                 "--cycle-epochs", "1", "--seed", "1", "--no-progress"]) == 0
    assert "embed" not in capsys.readouterr().err     # --no-progress: no sentence-encoder bars either (300 pool texts)
    report = json.loads((out / "report.json").read_text())
    assert [c["cycle"] for c in report["cycles"]] == [0, 1, 2]
    assert report["student"]["parameters"] > 20_000_000               # the real 22.7M-parameter encoder
    assert report["baseline"]["test"]["accuracy"] > 0.5               # chance is 0.1 on 10 classes
    assert all(c["accepted"] > 0 for c in report["cycles"][1:])
    assert report["cycles"][2]["train_size"] == 80 + sum(c["accepted"] for c in report["cycles"])
    capsys.readouterr()
    assert main(["predict", "--model", str(out / "best"), "My card still has not arrived"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in report["dataset"]["train_label_counts"]
