"""A run's options are declared once, as DistillConfig's fields (pgkd.options): every field is an option
of `pgkd distill`, `pgkd submit` and `python -m pgkd_services.local`; what is given reaches the config;
a new field is a new option with no other edit; a bad value is one line naming the flag, exit 2."""
import subprocess
import sys
from typing import Literal

import pytest
from pydantic import Field

import pgkd
from pgkd.cli import Parser, build_parser, main
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.options import add_options, flag, flags, from_options

FLAGS = {name: flag(name, field) for name, field in DistillConfig.model_fields.items()}
FORMERLY_UNREACHABLE = ["--validation-fraction", "0.3", "--max-length", "64", "--hard-negatives", "3",
                        "--misclassified", "4", "--correct", "5"]
GIVEN = {"validation_fraction": 0.3, "max_length": 64, "hard_negatives": 3, "misclassified": 4, "correct": 5}


class Captured(Exception):
    """Raised where a command would start its run, with the config it would run."""


def test_the_established_spellings_are_kept():
    assert FLAGS["cycle_learning_rate_scale"] == "--cycle-lr-scale"
    assert FLAGS["warm_start"] == "--no-warm-start" and FLAGS["track_test"] == "--track-test"
    assert FLAGS["teacher_max_per_call"] == "--teacher-max-per-call"


@pytest.mark.parametrize("command", [["-m", "pgkd.cli", "distill"], ["-m", "pgkd.cli", "submit"],
                                     ["-m", "pgkd_services.local"]])
def test_every_field_is_in_the_help(command):
    result = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    missing = [f for f in FLAGS.values() if f not in result.stdout]
    assert not missing, missing
    assert "(default: 1000)" in result.stdout and "LLM teacher" in result.stdout   # defaults shown, the group


def test_the_defaults_are_the_configs():
    args = build_parser().parse_args(["distill", "--data", "d", "--out", "o"])
    assert from_options(DistillConfig, args) == DistillConfig(data="d")
    bus = build_parser().parse_args(["bench", "bus", "--data", "d"])
    assert from_options(DistillConfig, bus) == DistillConfig(data="d", max_cycles=3)   # bench bus's own default


def test_the_formerly_unreachable_options_reach_the_config(monkeypatch, toy_data):
    def run(config, out, progress=True):
        raise Captured(config)
    monkeypatch.setattr("pgkd.loop.embedded.run", run)
    with pytest.raises(Captured) as got:
        main(["distill", "--data", str(toy_data), "--out", "o", *FORMERLY_UNREACHABLE, "--no-warm-start",
              "--cycle-lr-scale", "0.5", "--track-test", "--no-progress"])
    config = got.value.args[0]
    assert {k: getattr(config, k) for k in GIVEN} == GIVEN
    assert (config.warm_start, config.cycle_learning_rate_scale, config.track_test) == (False, 0.5, True)


def test_submit_takes_them_too(monkeypatch, toy_data):
    def submit_run(config, *args, **kwargs):
        raise Captured(config)
    monkeypatch.setattr("pgkd_services.cli.submit_run", submit_run)
    with pytest.raises(Captured) as got:
        main(["submit", "--data", str(toy_data), *FORMERLY_UNREACHABLE, "--run-id", "r1"])
    assert {k: getattr(got.value.args[0], k) for k in GIVEN} == GIVEN


def test_local_checks_them_and_passes_them_on(monkeypatch, toy_data, tmp_path):
    import pgkd_services.local as local

    def one_run(args, run_options):
        raise Captured(run_options)
    monkeypatch.setattr(local, "_one_run", one_run)
    with pytest.raises(Captured) as got:
        local.main(["--folder", str(tmp_path / "c"), "--data", str(toy_data), *FORMERLY_UNREACHABLE])
    assert got.value.args[0] == ["--data", str(toy_data), *FORMERLY_UNREACHABLE]


def test_a_new_field_is_a_new_option_with_no_other_edit():
    class Extended(DistillConfig):
        warmup_ratio: float | None = Field(None, gt=0, description="share of steps spent warming up")
        schedule: Literal["linear", "cosine"] = Field("linear", description="the learning-rate schedule")

    def options(model):
        parser = Parser(prog="t")
        add_options(parser, model)
        return parser, {s for a in parser._actions for s in a.option_strings}
    base, before = options(DistillConfig)
    parser, after = options(Extended)
    assert after - before == {"--warmup-ratio", "--schedule"}
    config = from_options(Extended, parser.parse_args(["--data", "d", "--warmup-ratio", "0.1", "--schedule", "cosine"]))
    assert (config.warmup_ratio, config.schedule, config.labeled) == (0.1, "cosine", 1000)
    assert "share of steps spent warming up" in parser.format_help()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--data", "d", "--schedule", "step"])    # choices from the Literal
    assert e.value.code == 2
    assert flags(parser)("warmup_ratio") == "--warmup-ratio"


@pytest.mark.parametrize("given, named", [(["--labeled", "0"], "--labeled 0: "),
                                          (["--validation-fraction", "2"], "--validation-fraction 2.0: "),
                                          (["--cycle-lr-scale", "3"], "--cycle-lr-scale 3.0: "),
                                          (["--target-score", "nan"], "--target-score nan: "),
                                          (["--teacher-timeout", "inf"], "--teacher-timeout inf: "),
                                          (["--seed", "-1"], "--seed -1: ")])
@pytest.mark.parametrize("command", ["distill", "submit", "local"])
def test_a_bad_value_is_one_line_naming_the_flag(capsys, toy_data, tmp_path, command, given, named):
    if command == "local":
        import pgkd_services.local as local
        code = local.main(["--folder", str(tmp_path / "c"), "--data", str(toy_data), *given])
        prefix = "local: error: "
    else:
        out = ["--out", str(tmp_path / "o")] if command == "distill" else []
        code = main([command, "--data", str(toy_data), *out, *given])
        prefix = "pgkd: error: "
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(prefix + named), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_guidance_and_selection_both_out_of_fold_names_both_flags(capsys, toy_data, tmp_path):
    assert main(["distill", "--data", str(toy_data), "--out", str(tmp_path / "o"), "--guidance-source",
                 "out-of-fold", "--selection-source", "out-of-fold"]) == 2
    assert capsys.readouterr().err.startswith(
        "pgkd: error: --guidance-source out-of-fold and --selection-source out-of-fold cannot both be out-of-fold")


@pytest.mark.parametrize("option, value, message", [("labeled", "30", "labeled='30': expected a number"),
                                                    ("target_score", "0.9", "target_score='0.9': expected a number"),
                                                    ("track_test", "yes", "track_test='yes': expected True or False")])
def test_the_python_api_takes_no_text_for_a_number(toy_data, option, value, message):
    with pytest.raises(UserError, match=message):
        pgkd.distill(toy_data, student="tiny", progress=False, **{option: value})
