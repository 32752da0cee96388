"""Both benchmark commands on tiny configurations: they run, write what they promise, and resume."""
import json

from pgkd.cli import main

from pgkd.students.finetuned import FineTunedStudent

from conftest import TOY_CLASSES, make_toy_dataset


def test_bench_quality_tiny_and_resume(tmp_path, capsys):
    make_toy_dataset(tmp_path / "data" / "toy")
    out = tmp_path / "quality"
    argv = ["bench", "quality", "--data-dir", str(tmp_path / "data"), "--datasets", "toy", "--seeds", "1,2",
            "--arms", "baseline,pool-random,pool-guided,guided-no-report", "--student", "tiny", "--labeled", "40",
            "--samples-per-cycle", "8", "--max-cycles", "1", "--epochs", "1", "--cycle-epochs", "1",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "quality.json").read_text())
    arms = [(r["arm"], r["seed"]) for r in summary["runs"]]
    assert sorted(arms) == sorted((a, s) for a in ("baseline", "pool-random", "pool-guided", "guided-no-report")
                                  for s in (1, 2))
    assert {r["arm"] for r in summary["table"]} == {"baseline", "pool-random", "pool-guided", "guided-no-report"}
    assert all(r["seeds"] == 2 for r in summary["table"])
    guided = json.loads((out / "runs" / "toy" / "guided-no-report" / "seed1" / "report.json").read_text())
    assert guided["config"]["guidance"] == "no-report" and guided["config"]["max_cycles"] == 1
    assert not (out / "runs" / "toy" / "pool-guided" / "seed1" / "best").exists()   # benchmarks keep no models
    assert "| toy | pool-guided | 2 |" in (out / "quality.md").read_text()
    assert (out / "quality.png").stat().st_size > 1000
    # A second invocation reuses every finished run and gives the same table.
    stamp = (out / "runs" / "toy" / "pool-random" / "seed2" / "report.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    assert (out / "runs" / "toy" / "pool-random" / "seed2" / "report.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "quality.json").read_text())["table"] == summary["table"]
    assert "done before, reused" in capsys.readouterr().err


def test_bench_quality_rejects_unknown_arms(tmp_path, capsys):
    make_toy_dataset(tmp_path / "data" / "toy")
    assert main(["bench", "quality", "--data-dir", str(tmp_path / "data"), "--datasets", "toy",
                 "--arms", "oracle", "--out", str(tmp_path / "q")]) == 2
    assert "unknown arm(s) oracle" in capsys.readouterr().err


def test_bench_speed_tiny(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "toy")
    shipped = FineTunedStudent.create("tiny", sorted(TOY_CLASSES), seed=5)
    shipped.save(tmp_path / "shipped")
    out = tmp_path / "speed"
    argv = ["bench", "speed", "--data", str(data), "--student", "tiny", "--train-samples", "48", "--epochs", "1",
            "--inference-texts", "40", "--latency-calls", "5", "--batch-size", "8", "--out", str(out)]
    assert main([*argv, "--model", str(tmp_path / "shipped")]) == 0
    result = json.loads((out / "speed.json").read_text())
    assert result["config"]["inference_model"] == str(tmp_path / "shipped")
    assert result["training"]["pgkd_samples_per_second"] > 0 and result["training"]["trainer_samples_per_second"] > 0
    assert result["inference"]["ratio"] > 0 and result["inference"]["onnx_int8_texts_per_second"] > 0
    assert [row["batch"] for row in result["inference"]["latency"]["pgkd"]] == [1, 8]
    # ONNX fp32 must compute what torch computes, to the last digits: at most one of the test texts
    # may fall on the other side of a near-tie.
    assert abs(result["accuracy"]["onnx_fp32_change_points"]) <= 100 / result["accuracy"]["test_samples"] + 1e-9
    assert result["ceiling"]["matmul_gflops"] > 0 and 0 < result["ceiling"]["pgkd_share_of_ceiling"]
    assert "training, samples/s" in (out / "speed.md").read_text()
    FineTunedStudent.create("tiny", ["other", "labels"]).save(tmp_path / "foreign")
    capsys.readouterr()
    assert main([*argv, "--no-onnx", "--model", str(tmp_path / "foreign")]) == 2
    assert "its labels are not the classes of" in capsys.readouterr().err


def test_bench_serve_tiny(tmp_path, capsys):
    """Every path measured in one run, on the served model too; at most a near-tie apart in answers."""
    data = make_toy_dataset(tmp_path / "toy", train_per_class=10, test_per_class=10)
    FineTunedStudent.create("tiny", sorted(TOY_CLASSES), seed=5).save(tmp_path / "shipped")
    out = tmp_path / "serve"
    assert main(["bench", "serve", "--model", str(tmp_path / "shipped"), "--data", str(data), "--calls", "3",
                 "--clients", "3", "--client-calls", "2", "--out", str(out)]) == 0
    result = json.loads((out / "serve.json").read_text())
    assert list(result["paths"]) == ["torch", "onnx_fp32", "onnx_int8", "served_http", "served_grpc"]
    for name, path in result["paths"].items():
        assert [row["batch"] for row in path["latency"]] == [1, 32, 64], name
        assert path["concurrent"]["clients"] == 3 and path["test"]["texts_per_second"] > 0, name
        if name != "onnx_int8":   # the same function of the text: one near-tie at most
            assert path["test"]["agreement_with_torch"] >= 1 - 1 / 40 - 1e-9, name
    assert set(result["serving_overhead_at_batch_64"]) == {"served_http_vs_onnx_fp32", "served_grpc_vs_onnx_fp32",
                                                           "served_http_vs_torch", "served_grpc_vs_torch"}
    assert "served (Triton), gRPC" in (out / "serve.md").read_text()
    assert "Table 5 (theirs" in capsys.readouterr().out
    assert main(["bench", "serve", "--model", str(tmp_path / "nowhere"), "--data", str(data)]) == 2


def test_bench_quality_honours_zero_cycles(tmp_path):
    make_toy_dataset(tmp_path / "data" / "toy")
    out = tmp_path / "q"
    assert main(["bench", "quality", "--data-dir", str(tmp_path / "data"), "--datasets", "toy", "--seeds", "1",
                 "--arms", "baseline,pool-random", "--student", "tiny", "--labeled", "40", "--epochs", "1",
                 "--max-cycles", "0", "--out", str(out), "--no-progress"]) == 0
    runs = json.loads((out / "quality.json").read_text())["runs"]
    assert {r["cycles"] for r in runs} == {0} and {r["arm"] for r in runs} == {"baseline", "pool-random"}


def test_bench_stream_counts_every_message_and_records_the_triggered_run_and_its_decision(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "toy")
    out = tmp_path / "stream"
    argv = ["bench", "stream", "--data", str(data), "--labeled", "40", "--size", "100", "--bad-percent", "8",
            "--trigger-count", "40", "--max-cycles", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "stream.json").read_text())
    assert result["sent"] == 100 and result["rejected"] == {"empty_text": 2, "not_json": 2, "oversized": 2,
                                                            "unknown_label": 2}
    assert result["accepted"] + result["duplicates"] == 92 and result["duplicates"] == 0   # the pool is new data
    assert sum(result["stored"].values()) == 92
    (first, second) = result["runs"]      # 92 accepted, a run every 40
    assert first["trigger"] == "count: 40 new samples >= 40" and first["from_base"]
    decision = first["decision"]
    assert decision["replaced"] == (decision["new_score"] > decision["current_score"])
    assert result["current_student"] in ("base", "bench-0001", "bench-0002")
    state = json.loads((out / "artifacts" / "streams" / "bench" / "state.json").read_text())
    replaced = [r for r in state["runs"] if r["decision"]["replaced"]]
    # A student that became current is judged for drift only on samples it was not trained on.
    assert state["drift_checked_through"] >= max([r["samples_through"] for r in replaced], default=0)
    assert "| bench-0001 | count |" in (out / "stream.md").read_text()
    assert main(argv) == 0                   # an earlier result is replaced, not mixed in
    assert len(json.loads((out / "stream.json").read_text())["runs"]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*argv[:-3], "--out", str(tmp_path / "other"), "--no-progress"]) == 2
    assert "not written by pgkd" in capsys.readouterr().err


def test_bench_stream_at_scale_ingests_over_the_broker_restarts_and_cuts_a_dataset(tmp_path, capsys):
    """`bench stream --samples` on a tiny scale: ingest over a local Tansu (Kafka-compatible, not
    Apache Kafka), every sample stored once, a restart at each stage; the figures are the benchmark's."""
    out = tmp_path / "scale"
    assert main(["bench", "stream", "--samples", "1500", "--stages", "500", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "stream-scale.json").read_text())
    assert [r["stored"] for r in result["rows"]] == [500, 1500]
    assert [r["restart"]["at_stored"] for r in result["rows"]] == [500, 1500]
    assert all(r["ingest_per_second"] > 0 and r["restart"]["first_batch_stored_seconds"] > 0 for r in result["rows"])
    assert [r["train"] + r["validation"] for r in result["rows"]] == [400 + 500, 400 + 1500]   # the base's, the stream's
    assert "| 1,500 |" in (out / "stream-scale.md").read_text() and "Kafka-compatible, not Apache Kafka" in \
        capsys.readouterr().out
    assert main(["bench", "stream", "--samples", "0", "--out", str(out)]) == 2


def test_bench_bus_runs_embedded_and_through_the_steps_and_finds_the_same_report(tmp_path, capsys):
    data = make_toy_dataset(tmp_path / "toy")
    out = tmp_path / "bus"
    assert main(["bench", "bus", "--data", str(data), "--student", "tiny", "--teacher", "pool-random",
                 "--labeled", "40", "--samples-per-cycle", "8", "--max-cycles", "1", "--epochs", "1",
                 "--cycle-epochs", "1", "--out", str(out)]) == 0
    result = json.loads((out / "bus.json").read_text())
    assert result["reports_identical"] and result["cycles"] == 2 and result["config"]["max_cycles"] == 1
    assert len(result["wall"]["embedded"]) == len(result["wall"]["steps"]) == 1 and result["ratio"] > 0
    assert result["steps_seconds"]["store_checkpoint"] > 0 and result["store_bytes"]["write"] > 0
    assert not (out / "work").exists()           # the steps' store and cache are removed after each run
    assert "Ratio of the wall times" in capsys.readouterr().out


def test_bench_peers_quick_sets_setfit_beside_our_students_on_the_same_splits_and_resumes(tmp_path, capsys):
    """SetFit for real (its trainer, the MiniLM body), on a tiny configuration."""
    make_toy_dataset(tmp_path / "data" / "toy")
    out = tmp_path / "peers"
    argv = ["bench", "peers", "--quick", "--data-dir", str(tmp_path / "data"), "--datasets", "toy", "--labeled", "40",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "peers.json").read_text())
    methods = {r["method"] for r in summary["runs"]}
    assert methods == {"SetFit", "tiny: baseline", "tiny: distilled, guided", "tiny: distilled, unguided"}
    (setfit,) = [r for r in summary["runs"] if r["method"] == "SetFit"]
    assert setfit["train_samples"] == 40                       # every labeled sample: train and validation
    assert 0.0 <= setfit["test_accuracy"] <= 1.0 and setfit["train_seconds"] > 0
    # The toy task is easy: SetFit's real training must have learned it, or the wiring is wrong.
    assert setfit["test_accuracy"] >= 0.8, setfit
    assert summary["config"]["setfit"]["library"] == "setfit" and summary["config"]["setfit"]["num_iterations"] == 1
    assert "| toy | SetFit | 1 |" in (out / "peers.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert "done before, reused" in capsys.readouterr().err
    # --existing-only tabulates what was run, and runs nothing that is missing.
    for path in (out / "setfit" / "toy").glob("*.json"):
        path.unlink()
    assert main(argv + ["--existing-only"]) == 0
    methods = {r["method"] for r in json.loads((out / "peers.json").read_text())["runs"]}
    assert "SetFit" not in methods and "tiny: distilled, guided" in methods
    assert not list((out / "setfit" / "toy").glob("*.json"))
