"""--taxonomy FILE: the classes with descriptions, in CSV, JSON or YAML; every bad file is one line
naming the file and the row, exit 2, before any work; and --dry-run, which spends nothing."""
import json
import subprocess
import sys

import pytest
from conftest import TOY_CLASSES, make_toy_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgkd.data import load_dataset, make_splits, with_taxonomy
from pgkd.errors import UserError
from pgkd.taxonomy import read_taxonomy

DESCRIBED = {"card_lost": "the card is lost, stolen or missing", "refund": "wants money back, a refund",
             "transfer": "sending money to another account", "pin_change": "changing or resetting the PIN"}


def write_csv(path, rows, header="label,description") -> str:
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_dataset(tmp_path_factory.mktemp("data") / "toy")


def test_the_three_formats_read_the_same_classes(tmp_path):
    csv_path = write_csv(tmp_path / "t.csv", ['card_lost,"the card is lost, stolen or missing",i lost my card | '
                                              'my wallet was stolen', "refund,wants money back"],
                         header="label,description,examples")
    classes = [{"label": "card_lost", "description": "the card is lost, stolen or missing",
                "examples": ["i lost my card", "my wallet was stolen"]},
               {"label": "refund", "description": "wants money back"}]
    (tmp_path / "t.json").write_text(json.dumps(classes))
    (tmp_path / "t.yaml").write_text("classes:\n" + "".join(
        f"  - label: {c['label']}\n    description: {c['description']}\n" +
        ("    examples: [" + ", ".join(json.dumps(e) for e in c.get("examples", [])) + "]\n"
         if c.get("examples") else "") for c in classes))
    read = [read_taxonomy(p).classes for p in (csv_path, tmp_path / "t.json", tmp_path / "t.yaml")]
    assert read[0] == read[1] == read[2]
    assert read[0][0].examples == ("i lost my card", "my wallet was stolen")


@pytest.mark.parametrize("name, content, expected", [
    ("t.csv", "label,description\ncard_lost,lost card\ncard_lost,again\n", "t.csv:3: duplicate label 'card_lost'"),
    ("t.csv", "label,description\ncard_lost,\n", "t.csv:2: label 'card_lost' has an empty description"),
    ("t.csv", "label,text\ncard_lost,x\n", "t.csv:1: missing column(s) description"),
    ("t.csv", "label,description\ncard_lost,a,b\n", "t.csv:2: more fields than the header"),
    ("t.csv", "label,description\n", "t.csv: no classes"),
    ("t.json", '[{"label": "a", "description": "x"}, {"label": "b"}]', "t.json: class 2: label 'b' has an empty"),
    ("t.json", '{"label": ', "t.json:1: not JSON"),
    ("t.json", '{"a": 1}', "t.json: expected a list of classes"),
    ("t.yaml", "- label: a\n  description: [unclosed\n", "t.yaml:3: not YAML"),
    ("t.txt", "a,b\n", "unknown taxonomy format '.txt'"),
    ("deep.json", "[" * 100000 + "]" * 100000, "deep.json: nested too deeply"),
    ("deep.yaml", "- " * 50000 + "x", "deep.yaml: nested too deeply"),
    ("t.json", '[{"label": 7, "description": "x"}]', "class 1: the label is not text (int 7; quote it)"),
    ("t.json", '[{"label": "a\\nb", "description": "x"}]', "label 'a\\nb' has a line break"),
    ("t.json", '[{"label": "a", "description": "x", "examples": ["1", "2", "3", "4", "5", "6"]}]',
     "6 examples of 'a'; at most 5 a class"),
])
def test_a_bad_taxonomy_file_is_one_line_naming_the_file_and_row(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_taxonomy(path)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_not_utf8_is_named_with_the_byte(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"label,description\ncard_lost,caf\xe9\n")
    with pytest.raises(UserError, match=r"t.csv:2: not UTF-8 text \(invalid continuation byte at byte 31\)"):
        read_taxonomy(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".json", ".yaml"]))
def test_any_bytes_are_read_or_refused_with_a_user_error(tmp_path, content, suffix):
    path = tmp_path / f"t{suffix}"
    path.write_bytes(content)
    try:
        taxonomy = read_taxonomy(path)
    except UserError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
    else:
        assert taxonomy.classes and all(c.description.strip() for c in taxonomy.classes)


def test_the_data_must_be_described_and_extra_classes_are_allowed_and_noted(tmp_path, toy):
    dataset = load_dataset(toy)
    missing = write_csv(tmp_path / "missing.csv", [f"{c},\"{d}\"" for c, d in list(DESCRIBED.items())[:3]])
    with pytest.raises(UserError, match=r"missing.csv: no row for label\(s\) 'pin_change' of "):
        with_taxonomy(dataset, missing)
    extra = write_csv(tmp_path / "extra.csv", [f"{c},\"{d}\"" for c, d in DESCRIBED.items()] + ["card_fraud,fraud on a card"])
    described = with_taxonomy(dataset, extra)
    assert described.labels == sorted([*TOY_CLASSES, "card_fraud"])
    assert any("card_fraud" in note and "no sample in the data" in note for note in described.notes)
    splits = make_splits(described, 40, 1)
    assert "card_fraud" in splits.labels and splits.taxonomy.descriptions["card_fraud"] == "fraud on a card"


def pgkd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_dry_run_prints_tokens_calls_and_cost_and_writes_nothing(tmp_path, toy):
    taxonomy = write_csv(tmp_path / "classes.csv", [f"{c},\"{d}\"" for c, d in DESCRIBED.items()])
    before = set(tmp_path.iterdir())
    args = ["distill", "--data", str(toy), "--labeled", "40", "--taxonomy", taxonomy, "--dry-run",
            "--teacher", "openai://127.0.0.1:9/v1?model=m", "--max-cycles", "3", "--samples-per-cycle", "40",
            "--teacher-max-per-call", "16", "--teacher-max-tokens", "1000", "--teacher-max-prompt-tokens", "2000"]
    done = pgkd(*args, cwd=tmp_path)             # an unreachable teacher: a dry run calls none
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "- card_lost: the card is lost, stolen or missing" in out     # the prompt, with the descriptions
    assert "teacher calls at most: 18 (3 cycles x 3 calls, each with its one repair request)" in out
    assert "tokens at most: " in out and "18,000 completion" in out
    assert "cost at most: unknown (no --price-prompt-per-1k" in out
    assert set(tmp_path.iterdir()) == before                              # nothing written
    priced = pgkd(*args, "--price-prompt-per-1k", "0.5", "--price-completion-per-1k", "1", "--prompt-file",
                  "prompt.txt", cwd=tmp_path)
    assert priced.returncode == 0, priced.stderr
    prompt_tokens = int(priced.stdout.split("tokens at most: ")[1].split(" prompt")[0].replace(",", ""))
    assert f"cost at most: {prompt_tokens * 0.5 / 1000 + 18000 / 1000:.4f}" in priced.stdout
    assert (tmp_path / "prompt.txt").read_text().startswith("You are the teacher") and "## Classes" not in priced.stdout
    again = pgkd(*args, "--prompt-file", "prompt.txt", cwd=tmp_path)      # never overwritten
    assert again.returncode == 2 and again.stderr.strip() == "pgkd: error: --prompt-file prompt.txt: exists already; name a new file"


@pytest.mark.parametrize("extra, expected", [
    (["--teacher-max-prompt-tokens", "50"], "pgkd: error: --teacher-max-prompt-tokens 50: even the smallest prompt takes"),
    (["--taxonomy", "nope.csv"], "pgkd: error: nope.csv: no such file"),
])
def test_a_run_that_cannot_start_says_so_in_one_line_before_any_work(tmp_path, toy, extra, expected):
    out = tmp_path / "out"
    done = pgkd("distill", "--data", str(toy), "--labeled", "40", "--teacher", "openai://127.0.0.1:9/v1?model=m",
                "--out", str(out), "--no-progress", *extra, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().startswith(expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_dry_run_on_the_demos_settings_prints_tokens_and_cost_and_writes_no_result(tmp_path, banking77):
    """`make demo`'s own run (Makefile), with --dry-run and prices: its --out is never made."""
    demo = ["distill", "--data", str(banking77), "--labeled", "1000", "--teacher", "triton://127.0.0.1:8010/teacher",
            "--teacher-cache", "none", "--student", "minilm", "--samples-per-cycle", "32", "--max-cycles", "10",
            "--patience", "5", "--seed", "1", "--out", "runs/demo"]
    done = pgkd(*demo, "--dry-run", "--price-prompt-per-1k", "0.003", "--price-completion-per-1k", "0.015",
                "--prompt-file", "first-prompt.txt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tokens = int(done.stdout.split("first prompt: ")[1].split(" tokens")[0])
    assert 1000 < tokens <= 8000                          # 77 classes, 16 + 16 + 16 samples: trimmed to the default
    assert "teacher calls at most: 20 (10 cycles x 1 call, each with its one repair request)" in done.stdout
    cost = float(done.stdout.split("cost at most: ")[1].split(" ")[0])
    assert cost > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first-prompt.txt"]      # no runs/demo
    assert (tmp_path / "first-prompt.txt").read_text().count("\n- ") >= 77


def test_a_csv_description_may_hold_a_line_break_and_yaml_scalars_stay_as_written(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('label,description,examples\nNO,"Norway: the country\nin the north",fjords | a|b\nSE,Sweden,\n')
    classes = read_taxonomy(path).classes
    assert [(c.label, c.description, c.examples) for c in classes] == [
        ("NO", "Norway: the country in the north", ("fjords", "a|b")), ("SE", "Sweden", ())]
    (tmp_path / "t.yaml").write_text("- {label: NO, description: 010}\n- {label: 010, description: yes}\n"
                                     "- {label: 1.5, description: null}\n")
    assert [(c.label, c.description) for c in read_taxonomy(tmp_path / "t.yaml").classes] == [
        ("NO", "010"), ("010", "yes"), ("1.5", "null")]


def test_a_label_with_a_line_break_in_the_data_is_refused(tmp_path):
    from pgkd.data import read_samples
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "hello", "label": "a\\nb"}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:1: the label 'a\\nb' has a line break"):
        read_samples(path)


@pytest.mark.parametrize("name, expected", [
    ("", "--prompt-file '': an empty file name"),
    ("missing/p.txt", "--prompt-file missing/p.txt: no folder missing"),
    ("dangling", "--prompt-file dangling: exists already"),
])
def test_a_prompt_file_that_cannot_be_made_new_is_refused_before_any_work(tmp_path, toy, name, expected):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    done = pgkd("distill", "--data", str(toy), "--labeled", "40", "--dry-run", "--prompt-file", name, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == f"pgkd: error: {expected}" + (
        "; name a new file" if name == "dangling" else ""), done.stderr
    assert (tmp_path / "dangling").is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_dry_run_checks_out_as_the_run_would_and_writes_nothing_there(tmp_path, toy):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    done = pgkd("distill", "--data", str(toy), "--labeled", "40", "--dry-run", "--out", "mine", cwd=tmp_path)
    assert done.returncode == 2 and "--out mine: folder exists, is not empty and was not written by pgkd" in done.stderr
    fresh = pgkd("distill", "--data", str(toy), "--labeled", "40", "--dry-run", "--out", "new", cwd=tmp_path)
    assert fresh.returncode == 0 and not (tmp_path / "new").exists()


def test_a_trimmed_first_prompt_is_bounded_by_the_limit_and_file_examples_count(tmp_path, toy):
    from pgkd.data import load_dataset, make_splits, with_taxonomy
    from pgkd.loop.config import DistillConfig
    from pgkd.loop.dryrun import plan
    from pgkd.teachers.prompt import REPAIR_TOKENS
    taxonomy = tmp_path / "t.json"
    taxonomy.write_text(json.dumps([{"label": c, "description": d} for c, d in DESCRIBED.items()] + [
        {"label": "extra", "description": "a class the data lacks", "examples": ["word " * 400]}]))
    splits = make_splits(with_taxonomy(load_dataset(toy), str(taxonomy)), 40, 1)
    words = lambda text: len(text.split())  # noqa: E731
    config = DistillConfig(data=str(toy), labeled=40, teacher="openai://h:1/v1?model=m", taxonomy=str(taxonomy))
    whole = plan(config, splits, "t", False, words)
    assert not whole.prompt.trimmed and whole.first_prompt_tokens > 400          # the file's long example is in it
    tight = plan(config.model_copy(update={"teacher_max_prompt_tokens": whole.prompt.tokens}), splits, "t", False,
                 words)
    assert tight.prompt.trimmed and tight.first_prompt_tokens == whole.prompt.tokens - REPAIR_TOKENS


def test_budgets_bound_the_dry_runs_figures_and_a_cost_budget_needs_prices(tmp_path, toy):
    from pgkd.data import load_dataset, make_splits
    from pgkd.loop.config import DistillConfig
    from pgkd.loop.dryrun import plan
    splits = make_splits(load_dataset(toy), 40, 1)

    def figures(**options):
        config = DistillConfig(data=str(toy), labeled=40, teacher="openai://h:1/v1?model=m", **options)
        return plan(config, splits, "t", False, lambda text: len(text.split()))
    free = figures(teacher_max_prompt_tokens=1000, teacher_max_tokens=500, price_prompt_per_1k=1.0,
                   price_completion_per_1k=2.0)
    assert (free.calls, free.prompt_tokens, free.completion_tokens) == (20, 20 * 1000, 20 * 500)
    assert free.cost == pytest.approx(20 * 1.0 + 10 * 2.0)
    capped = figures(teacher_max_prompt_tokens=1000, teacher_max_tokens=500, price_prompt_per_1k=1.0,
                     price_completion_per_1k=2.0, token_budget=100, cost_budget=0.1)
    # One cycle past each budget at most: 2 calls of 1,000 prompt tokens and 500 completion tokens.
    assert (capped.prompt_tokens, capped.completion_tokens) == (100 + 2000, 100 + 1000)
    assert capped.cost == pytest.approx(0.1 + 2 * 1.0 + 1 * 2.0)    # below the tokens' own bound, 2.1 + 2.2
    simulated = plan(DistillConfig(data=str(toy), labeled=40), splits, "pool-guided", True, lambda t: len(t.split()))
    assert simulated.lines()[0].endswith("it calls no LLM and spends nothing)") and "cost" not in " ".join(
        simulated.lines()[:3])
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="would never stop the run: without price_prompt_per_1k"):
        DistillConfig(data="d", cost_budget=5)


def test_tokens_the_counter_does_not_know_count_by_their_bytes():
    from pgkd.teachers.llm import default_token_counter
    count = default_token_counter()
    assert count("🙂" * 10) == 40 and count("hello world") == 2
