"""`pgkd bench cascade` on the toy data, with a cheap noisy stand-in for the sentence encoder: the curve's
ends are the student alone and the simulated LLM alone, each threshold is chosen on the held validation
scores and never on test, the costs follow their formula, and the output says what it measured."""
import json
import zlib

import numpy as np
import pytest
from conftest import bag_of_words_embed, make_toy_dataset, write_jsonl, toy_text, TOY_CLASSES

import pgkd.calibration
import pgkd.encoder
from pgkd.bench import cascade
from pgkd.calibration import calibrate
from pgkd.cli import main
from pgkd.errors import UserError
from pgkd.teachers.llm import TokenCounter

RUN = dict(labeled=300, max_cycles=1, windows=3, seed=1)
PRICES = dict(price_per_million_tokens=0.4, price_per_million_output_tokens=1.6, student_cost_per_million=0.5)


class NoisyEncoder:
    """Hashed word counts plus a fixed per-text noise (384 wide, like MiniLM): a student that is often
    unsure and sometimes wrong, so that thresholds fall inside the range."""
    model = type("NoModel", (), {"parameters": lambda self: []})()

    def __init__(self, *args, **kwargs):
        pass

    def encode(self, texts):
        bow = np.pad(bag_of_words_embed(texts), ((0, 0), (0, 128)))
        noise = np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(0, 0.15, 384) for t in texts])
        return (bow + noise).astype(np.float32)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of the benchmark, every threshold choice recorded: the scores it was made on and what it chose."""
    root = tmp_path_factory.mktemp("cascade")
    make_toy_dataset(root / "data" / "toy", train_per_class=150, test_per_class=40)
    choices = []
    original = pgkd.calibration.choose_threshold

    def recording(confidence, correct, *args, **kwargs):
        try:
            deferral = original(confidence, correct, *args, **kwargs)
        except Exception:
            deferral = None        # a target these scores cannot meet
            raise
        finally:
            choices.append((np.asarray(confidence, dtype=np.float64).copy(), deferral))
        return deferral
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pgkd.calibration, "choose_threshold", recording)
        summary = cascade.run_cascade_bench(root / "data", ["toy"], root / "out", encoder=NoisyEncoder(),
                                            progress=False, **RUN, **PRICES)
    return root, summary, choices


def test_the_curve_ends_at_the_student_alone_and_the_simulated_llm_alone(bench):
    _, summary, _ = bench
    record = summary["datasets"][0]
    points = record["curve"]
    assert [p["teacher_share"] for p in points] == list(cascade.SHARES) and len(points) == 21
    assert points[0]["deferred"] == 0 and points[-1]["deferred"] == record["sizes"]["test"]
    assert points[0]["cascade_accuracy"] == pytest.approx(record["student_only"]["accuracy"])
    assert points[-1]["cascade_accuracy"] == pytest.approx(record["llm_only"]["accuracy"])
    # The toy student is imperfect and the simulated LLM (p = 0.95) too: the ends differ.
    assert record["student_only"]["accuracy"] < 0.99 and 0.85 < record["llm_only"]["accuracy"] < 1
    assert record["llm_only"]["simulated"] is True and record["llm_only"]["unknown_texts"] == 0


def test_curve_defers_the_least_sure_first():
    confidence = np.array([0.9, 0.2, 0.6, 0.4])
    student, llm, gold = np.array([0, 1, 1, 0]), np.array([1, 0, 0, 1]), np.array([0, 0, 1, 1])
    points = cascade.curve(confidence, student, llm, gold, shares=(0.0, 0.25, 0.5, 1.0))
    # 0.25: text 1 (0.2) goes to the simulated LLM and is right; 0.5: text 3 (0.4) too, right again.
    assert [p["cascade_accuracy"] for p in points] == [0.5, 0.75, 1.0, 0.5]


def test_every_threshold_is_chosen_on_the_held_validation_scores(bench):
    _, summary, choices = bench
    record = summary["datasets"][0]
    held, test = record["calibration"]["samples"], record["sizes"]["test"]
    assert held == record["sizes"]["validation"] != test       # out of fold: no validation text shown, all held
    targets, windows = record["targets"], record["stream"]["windows"]
    # one choice per target; per stream window, the promotion's two (the retrained student's and the serving
    # one's, after the first window) and then the serving student's
    assert len(choices) == len(targets) + len(windows) + 2 * (len(windows) - 1)
    assert all(len(confidence) == held for confidence, _ in choices)
    assert [t["threshold"] for t in targets] == [d.threshold for _, d in choices[:len(targets)]]
    stream = choices[len(targets):]
    assert [w["threshold"] for w in windows] == [d and d.threshold for _, d in [stream[0], *stream[3::3]]]
    for t, (_, d) in zip(targets, choices):
        assert t["chosen_on"]["student_share"] == d.student_share and t["chosen_on"]["samples"] == held


def test_the_thresholds_do_not_move_when_only_the_test_split_changes(bench, tmp_path, monkeypatch, capsys):
    """The same run through the command, with other test texts: every threshold made before any test
    traffic (the targets', the stream's first window's) is the same."""
    root, summary, _ = bench
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text((root / "data" / "toy" / "train.jsonl").read_text())
    import random
    rng, known = random.Random(99), {json.loads(line)["text"] for line in (data / "train.jsonl").open()}
    rows = []
    for label in TOY_CLASSES:
        while sum(r["label"] == label for r in rows) < 25:
            text = toy_text(rng, label)
            if text not in known:
                known.add(text)
                rows.append({"text": text, "label": label})
    write_jsonl(data / "test.jsonl", rows)
    monkeypatch.setattr(pgkd.encoder, "SentenceEncoder", NoisyEncoder)
    out = tmp_path / "out"
    assert main(["bench", "cascade", "--data-root", str(tmp_path / "data"), "--datasets", "toy", "--labeled", "300",
                 "--max-cycles", "1", "--windows", "3", "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    other = json.loads((out / "cascade.json").read_text())["datasets"][0]
    first = summary["datasets"][0]
    assert other["sizes"]["test"] == 100 != first["sizes"]["test"]
    assert [t["threshold"] for t in other["targets"]] == [t["threshold"] for t in first["targets"]]
    assert [t["chosen_on"] for t in other["targets"]] == [t["chosen_on"] for t in first["targets"]]
    assert other["stream"]["windows"][0]["threshold"] == first["stream"]["windows"][0]["threshold"]


def test_a_target_is_measured_on_test_at_the_threshold_chosen_on_held_scores():
    rng = np.random.default_rng(0)
    held_probs = rng.dirichlet(np.ones(4) * 0.5, size=200)
    held_targets = np.where(rng.random(200) < 0.8, held_probs.argmax(1), rng.integers(0, 4, 200))
    calibration = calibrate(held_probs, held_targets, "held")
    target = cascade.parse_targets("0.8", 0.95)[0]      # met: on the held texts it is up to 0.83 at 90% confidence
    deferral = target.choose(calibration)
    test_conf = rng.random(500)
    student, llm, gold = rng.integers(0, 4, 500), rng.integers(0, 4, 500), rng.integers(0, 4, 500)
    measured = cascade.route(test_conf, deferral.threshold, student, llm, gold)
    answered = test_conf >= deferral.threshold
    assert measured["student_share"] == pytest.approx(answered.mean())
    assert measured["teacher_share"] == pytest.approx(1 - answered.mean())
    assert measured["cascade_accuracy"] == pytest.approx(np.mean(np.where(answered, student, llm) == gold))
    assert measured["student_accuracy"] == pytest.approx(np.mean(student[answered] == gold[answered]))
    nothing = cascade.route(test_conf, None, student, llm, gold)     # an unreachable target: all deferred
    assert nothing["teacher_share"] == 1 and nothing["student_accuracy"] is None


def test_the_costs_follow_the_formula(bench):
    _, summary, _ = bench
    record = summary["datasets"][0]
    tokens = record["tokens"]
    llm = tokens["input_per_text"] * PRICES["price_per_million_tokens"] \
        + tokens["output_per_text"] * PRICES["price_per_million_output_tokens"]
    assert record["llm_only"]["cost_per_million"] == pytest.approx(llm)
    assert record["student_only"]["cost_per_million"] == PRICES["student_cost_per_million"]
    for t in record["targets"]:
        cost = PRICES["student_cost_per_million"] + t["test"]["teacher_share"] * llm
        assert t["cost_per_million"] == pytest.approx(cost)
        assert t["saving_against_llm"] == pytest.approx(1 - cost / llm)
    for w in record["stream"]["windows"]:
        assert w["cost_per_million"] == pytest.approx(PRICES["student_cost_per_million"] + w["teacher_share"] * llm)
    # One call per text: the prompt is the classes, 2 examples a class and the text, counted by MiniLM's tokenizer.
    assert tokens["texts_per_call"] == 1 and tokens["texts"] == record["sizes"]["test"]
    assert tokens["fixed_per_call"] < tokens["input_per_text"] < tokens["fixed_per_call"] + 40
    assert TokenCounter()(json.dumps({"labels": ["card_lost"]})) <= tokens["output_per_text"] + 2
    assert summary["prices"]["assumed"] is True and "not the LLM's own tokenizer" in summary["prices"]["tokens"]
    default = cascade.STUDENT_CPU_THREADS * cascade.PRICE_PER_CPU_HOUR / 3600 / cascade.STUDENT_TEXTS_PER_SECOND * 1e6
    assert cascade.STUDENT_COST_PER_MILLION == pytest.approx(default, abs=1e-4)


def test_the_stream_adds_the_simulated_llm_labels_of_each_window_to_train(bench):
    _, summary, _ = bench
    record = summary["datasets"][0]
    windows = record["stream"]["windows"]
    assert [w["window"] for w in windows] == [1, 2, 3]
    assert sum(w["texts"] for w in windows) == record["sizes"]["test"]
    assert windows[0]["teacher_labels"] == 0 and windows[0]["train_size"] == record["distilled"]["train_size"]
    for before, after in zip(windows, windows[1:]):
        deferred = round(before["teacher_share"] * before["texts"])
        assert after["teacher_labels"] == before["teacher_labels"] + deferred
        assert after["train_size"] == before["train_size"] + deferred
    assert record["stream"]["target"] == "p-0.01" and "not through Kafka" in record["stream"]["retraining"]


def test_a_retrained_student_serves_only_when_the_streams_promotion_rule_takes_it(bench):
    """As the stream promotes runs with a cascade target: a larger share of the validation texts answered at the
    target (the metric deciding a tie), or the serving student (and its threshold) stays."""
    _, summary, _ = bench
    windows = summary["datasets"][0]["stream"]["windows"]
    assert windows[0]["promoted"] is None and windows[0]["promotion"] is None
    share = lambda x: -1 if x is None else x   # noqa: E731 -- None: the target cannot be met there
    for before, w in zip(windows, windows[1:]):
        p = w["promotion"]
        assert p["metric"] == "macro_f1" and p["target"] == "target accuracy 0.94"
        if share(p["retrained_share"]) != share(p["serving_share"]):
            assert w["promoted"] == (share(p["retrained_share"]) > share(p["serving_share"]))
        else:
            assert w["promoted"] == (p["retrained"] > p["serving"])
        if not w["promoted"]:
            assert w["threshold"] == before["threshold"] and w["temperature"] == before["temperature"]


def test_a_retrained_student_that_is_not_better_never_serves(tmp_path, monkeypatch):
    make_toy_dataset(tmp_path / "data" / "toy", train_per_class=150, test_per_class=40)
    real = cascade.compare
    monkeypatch.setattr(cascade, "compare", lambda run_id, new, current, metric, run, validation, scores, **target:
                        real(run_id, current, current, metric, run, validation, (scores[1], scores[1]), **target))
    summary = cascade.run_cascade_bench(tmp_path / "data", ["toy"], tmp_path / "out", encoder=NoisyEncoder(),
                                        progress=False, **{**RUN, "windows": 2}, **PRICES)
    first, second = summary["datasets"][0]["stream"]["windows"]
    assert second["promoted"] is False and second["teacher_labels"] > 0
    assert (second["threshold"], second["temperature"]) == (first["threshold"], first["temperature"])
    assert "kept (the retrained one not better)" in (tmp_path / "out" / "cascade.md").read_text()


def test_the_output_records_what_was_measured(bench):
    root, summary, _ = bench
    out = root / "out"
    for name in ("cascade.json", "cascade.md", "cascade.png", ".pgkd-output.json"):
        assert (out / name).is_file(), name
    assert (out / "cascade.png").stat().st_size > 5000
    saved = json.loads((out / "cascade.json").read_text())
    assert saved["config"]["labeled"] == 300 and saved["config"]["targets"] == cascade.DEFAULT_TARGETS
    assert saved["config"]["guidance_source"] == "out-of-fold" and saved["seed"] == 1 == saved["config"]["seed"]
    assert saved["data"]["toy"]["sizes"]["test"] == 160 and saved["data"]["toy"]["classes"] == 4
    assert saved["student"]["spec"] == "minilm-frozen"
    assert saved["teacher"]["simulated"] is True and saved["teacher"]["accuracy"] == 0.95
    assert [t["value"] for t in saved["config"]["targets_parsed"]] == [0.94, 0.93, 0.2]
    assert len(saved["references"]) == 2 and "stream" in saved["goals"]
    text = (out / "cascade.md").read_text()
    assert "simulated LLM" in text and "theirs, not measured here" in text
    assert " LLM only" not in text.replace("simulated LLM only", "")    # never the simulation called an LLM


def test_targets_are_written_relative_to_p_as_numbers_or_as_shares():
    targets = cascade.parse_targets("p-0.01, 0.9,share:0.2", 0.95)
    assert [(t.kind, t.value) for t in targets] == [("accuracy", 0.94), ("accuracy", 0.9), ("share", 0.2)]
    for bad in ("x", "share:2", ""):
        with pytest.raises(UserError):
            cascade.parse_targets(bad, 0.95)


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    make_toy_dataset(tmp_path / "data" / "toy", train_per_class=10, test_per_class=5)
    base = ["bench", "cascade", "--data-root", str(tmp_path / "data"), "--datasets", "toy",
            "--out", str(tmp_path / "o")]
    assert main([*base, "--targets", "0.9,most"]) == 2
    assert "--targets" in capsys.readouterr().err
    assert main([*base, "--windows", "0"]) == 2
    assert "--windows 0" in capsys.readouterr().err
    assert main([*base, "--datasets", "absent"]) == 2
    assert "no folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()          # refused before anything is written
