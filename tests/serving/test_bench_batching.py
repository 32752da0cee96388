"""`pgkd bench serve --batching-delays`: the served student under each dynamic-batching delay, side by side on
one server (the measurement behind the default delay in BENCHMARKS.md), at a tiny size: it runs, every delay
and protocol is measured in every round, and Triton's queue time is read; the figures themselves are not
asserted (speed belongs in BENCHMARKS.md)."""
from __future__ import annotations

import json

from conftest import TOY_CLASSES, make_toy_dataset
from pgkd.cli import main
from pgkd.serving.repository import MAX_QUEUE_DELAY_US
from pgkd.students.finetuned import FineTunedStudent


def test_bench_serve_batching_delays_tiny(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "toy", train_per_class=4, test_per_class=4)
    FineTunedStudent.create("tiny", sorted(TOY_CLASSES), seed=5).save(tmp_path / "student")
    out = tmp_path / "batching"
    argv = ["bench", "serve", "--model", str(tmp_path / "student"), "--data", str(data), "--calls", "3", "--clients",
            "3", "--client-calls", "2", "--out", str(out)]
    assert main([*argv, "--batching-delays", f"{MAX_QUEUE_DELAY_US},0", "--repeats", "2"]) == 0
    result = json.loads((out / "batching.json").read_text())
    assert [(r["round"], r["delay_us"], r["protocol"]) for r in result["rounds"]] == [
        (1, MAX_QUEUE_DELAY_US, "grpc"), (1, MAX_QUEUE_DELAY_US, "http"), (1, 0, "grpc"), (1, 0, "http"),
        (2, 0, "grpc"), (2, 0, "http"), (2, MAX_QUEUE_DELAY_US, "grpc"), (2, MAX_QUEUE_DELAY_US, "http")]   # in turn
    for row in result["rounds"]:
        assert row["one_client"]["clients"] == 1 and row["clients"]["clients"] == 3, row
        assert row["one_client"]["texts_per_second"] > 0 and row["one_client"]["queue_ms"] >= 0, row
    assert [(r["delay_us"], r["protocol"]) for r in result["summary"]] == [
        (MAX_QUEUE_DELAY_US, "grpc"), (MAX_QUEUE_DELAY_US, "http"), (0, "grpc"), (0, "http")]
    assert f"| {MAX_QUEUE_DELAY_US} us (default) | grpc |" in (out / "batching.md").read_text()
    assert "3 clients: texts/s" in capsys.readouterr().out
    capsys.readouterr()
    assert main([*argv, "--batching-delays", "0,0"]) == 2           # each delay once
    assert "--batching-delays 0,0: distinct" in capsys.readouterr().err
