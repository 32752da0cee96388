"""pgkd.settings: every PGKD_* variable in one model, listed by `pgkd settings`; a bad value is one line
naming the variable (exit 2 at the command line); a secret never shows."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgkd.cli import main
from pgkd.errors import UserError
from pgkd.settings import (SECTIONS, ArtifactSettings, KafkaSecuritySettings, ServiceSettings, Settings, described,
                           known_variables, one, read)

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cr3t-never-shown"


def refused(env: dict, section=None) -> str:
    with pytest.raises(UserError) as raised:
        read(section, env) if section else Settings.from_env(env)
    text = str(raised.value)
    assert "\n" not in text
    return text


def test_pgkd_settings_lists_every_variable_with_its_default_and_meaning(capsys):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    for row in described():
        line = next(line for line in out.splitlines() if line.split()[:1] == [row["variable"]])
        assert row["description"] in line
        assert (str(row["default"]) if row["default"] != "" else "-") in line.split()
    assert main(["settings", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["variable"] for row in rows} == known_variables()
    assert all(row["description"] for row in rows)
    assert len(known_variables()) == len(rows)   # no variable in two sections


def test_every_variable_the_code_names_is_a_setting():
    """A PGKD_* name the engine and the services spell out is one `pgkd settings` lists."""
    named = set()
    for folder in ("shared/pgkd", "services"):
        for path in (REPO / folder).rglob("*.py"):
            named |= set(re.findall(r"\bPGKD_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    not_settings = {"PGKD_STREAM_", "PGKD_KAFKA_", "PGKD_SERVING_", "PGKD_X"}   # prefixes and examples in prose
    assert named - not_settings <= known_variables(), sorted(named - not_settings - known_variables())
    assert {"PGKD_BROKER_URL", "PGKD_ARTIFACTS", "PGKD_CACHE", "PGKD_CONNECT_TIMEOUT", "PGKD_SERVING_THREADS",
            "PGKD_KAFKA_SASL_PASSWORD_FILE", "PGKD_STREAM_RUN", "PGKD_HTTP_HOST"} <= known_variables()


def test_defaults_and_empty_values():
    assert set(Settings.model_fields) == set(SECTIONS)
    settings = Settings.from_env({})
    assert settings.broker.url == "kafka://127.0.0.1:9092" and settings.broker.connect_timeout == 10
    assert settings.service.http_host == "127.0.0.1" and settings.service.metrics_port == 9100
    assert settings.stream.base_run is None and settings.serving.int8 is False
    # an empty variable is unset (the ConfigMap's PGKD_STREAM_BASE_RUN: "")
    assert Settings.from_env({"PGKD_STREAM_BASE_RUN": "", "PGKD_METRICS_PORT": " "}).service.metrics_port == 9100
    env = {"PGKD_SERVING_INT8": "1", "PGKD_STREAM_RUN": '{"max_cycles": 2}', "PGKD_CACHE": "/c"}
    settings = Settings.from_env(env)
    assert settings.serving.int8 is True and settings.stream.run == {"max_cycles": 2}
    assert settings.artifacts.cache == "/c"


def test_a_mapping_is_the_only_source(monkeypatch):
    monkeypatch.setenv("PGKD_METRICS_PORT", "1234")
    assert read(ServiceSettings, {}).metrics_port == 9100
    assert read(ServiceSettings).metrics_port == 1234
    assert one(ServiceSettings, "metrics_port") == 1234


@pytest.mark.parametrize("variable,value,message", [
    ("PGKD_METRICS_PORT", "70000", "not a port"),
    ("PGKD_HTTP_HOST", "not a host", "not a host"),
    ("PGKD_CONNECT_TIMEOUT", "inf", "expected a number of seconds above 0"),
    ("PGKD_BROKER_URL", "redis://x:6379", "expected kafka://host:port"),
    ("PGKD_PROMETHEUS_URL", "ftp://p:9090", "expected http://HOST:PORT"),
    ("PGKD_SERVING_INT8", "yes", "0 or 1"),
    ("PGKD_SERVING_FORMAT", "tf", "onnx"),
    ("PGKD_SERVING_URL", "h:0", "not a port"),
    ("PGKD_STREAM_DRIFT_MARGIN", "lots", "number"),
    ("PGKD_STREAM_RUN", "[1]", "not a JSON object"),
    ("PGKD_KAFKA_SECURITY_PROTOCOL", "TLS", "expected one of"),
    ("PGKD_ARTIFACTS", "s3://", "no bucket"),
    ("PGKD_ARTIFACTS", "gs:///prefix", "no bucket"),
    ("PGKD_TOPIC_PREFIX", "team a/", "a topic name's prefix takes letters"),
    ("PGKD_ARTIFACTS", "http://x/y", "not a store pgkd writes to"),
    ("PGKD_GRACEFUL_TIMEOUT", "inf", "finite"),
    # the trial's: `settings --check` took them, and each command failed later, less clearly
    ("PGKD_ARTIFACTS", "file:///dev/null", "not a folder (a store is a folder, or a bucket)"),
    ("PGKD_ARTIFACTS", "/tmp/x\ny", "holds a control character (U+000A)"),
    ("PGKD_CACHE", "/dev/null", "not a folder"),
    ("PGKD_CACHE", "/tmp/x\x1by", "holds a control character"),
])
def test_a_bad_value_is_one_line_naming_the_variable(variable, value, message):
    text = refused({variable: value})
    assert text.startswith(f"{variable}={value!r}: ") and message in text, text


def test_a_shortest_text_longer_than_the_longest_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("PGKD_STREAM_MIN_CHARS", "5000")
    assert main(["settings", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pgkd: error: PGKD_STREAM_MIN_CHARS=5000 is above PGKD_STREAM_MAX_CHARS=2000: no text could be "
                   "taken"], err


def test_a_bad_value_at_the_command_line_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("PGKD_ARTIFACTS", "s3://")
    assert main(["settings", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pgkd: error: PGKD_ARTIFACTS='s3://': no bucket (expected s3://BUCKET[/PREFIX])"]


def test_a_store_whose_library_this_machine_lacks_is_an_environment_failure_exit_1(monkeypatch, capsys):
    """s3fs is not installed with pgkd: an S3 store is a good URL this machine cannot reach, not bad input."""
    import importlib.util
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    monkeypatch.setenv("PGKD_ARTIFACTS", "s3://bucket/pgkd")
    assert main(["status", "run-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pgkd: PGKD_ARTIFACTS=s3://bucket/pgkd: ") and "s3fs" in err[0], err


def test_check_says_every_bad_variable_one_line_each_not_the_first_only(monkeypatch, capsys):
    """A reviewer had to fix and run again once per variable."""
    monkeypatch.setenv("PGKD_METRICS_PORT", "0")
    monkeypatch.setenv("PGKD_STREAM", "../x")
    monkeypatch.setenv("PGKD_CONNECT_TIMEOUT", "nan")
    monkeypatch.setenv("PGKD_BROKR_URL", "kafka://x:9092")       # a misspelling is noted even then
    assert main(["settings", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if line.startswith("pgkd: note: ")]
    assert any("PGKD_BROKR_URL" in n and "did you mean PGKD_BROKER_URL?" in n for n in notes), err
    err = [line for line in err if line not in notes]
    assert len(err) == 3 and all(line.startswith("pgkd: error: PGKD_") for line in err), err
    assert {line.split("=")[0] for line in err} == {"pgkd: error: PGKD_METRICS_PORT", "pgkd: error: PGKD_STREAM",
                                                     "pgkd: error: PGKD_CONNECT_TIMEOUT"}


def test_check_names_a_pgkd_variable_no_setting_reads_and_the_one_it_may_have_meant(monkeypatch, capsys):
    """A misspelt variable was silently ignored, even by --check (a reviewer's PGKD_CONNECTTIMEOUT)."""
    monkeypatch.setenv("PGKD_CONNECTTIMEOUT", "3")
    monkeypatch.setenv("PGKD_OPENAI_KEY", "k")            # an API key's variable may be named so: a note, not an error
    assert main(["settings", "--check"]) == 0
    err = capsys.readouterr().err.strip().splitlines()      # (another test's variable may be set in this process)
    assert "pgkd: note: PGKD_CONNECTTIMEOUT is not a variable pgkd reads (did you mean PGKD_CONNECT_TIMEOUT?)" in err
    assert "pgkd: note: PGKD_OPENAI_KEY is not a variable pgkd reads" in err
    assert all(line.startswith("pgkd: note: PGKD_") for line in err), err


def test_s3_without_a_bucket_is_not_a_local_folder(monkeypatch, tmp_path, capsys):
    from pgkd.artifacts import ArtifactStore
    monkeypatch.chdir(tmp_path)
    for url in ("s3://", "s3:///x"):
        with pytest.raises(UserError, match="no bucket"):
            ArtifactStore(url)
        monkeypatch.setenv("PGKD_ARTIFACTS", url)
        with pytest.raises(UserError, match="PGKD_ARTIFACTS=.*no bucket"):
            ArtifactStore()
    assert not (tmp_path / "s3:").exists()
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/store")
    assert ArtifactStore().url == f"file://{tmp_path}/store"


def test_a_secret_never_shows(tmp_path, capsys):
    env = {"PGKD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "PGKD_KAFKA_SASL_PASSWORD": PASSWORD}
    settings = Settings.from_env(env)
    assert settings.kafka.sasl_password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.kafka)
    assert PASSWORD not in settings.kafka.model_dump_json()
    # not in an error, even one about the secret itself
    both = refused({**env, "PGKD_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "p")})
    assert "both set" in both and PASSWORD not in both
    # not in `pgkd settings`, even with --check in an environment that has it
    assert main(["settings"]) == 0 and main(["settings", "--json"]) == 0
    assert PASSWORD not in capsys.readouterr().out
    assert all(row["default"] == "" for row in described() if row["secret"])


def test_a_secret_in_a_bad_value_is_never_shown():
    """A secret that fails its check is named by its variable alone."""
    from pydantic import SecretStr

    from pgkd.settings import Section, var

    class WithSecret(Section):
        token: SecretStr | None = var("PGKD_TEST_TOKEN", None, "a token", secret=True, min_length=40)

    text = refused({"PGKD_TEST_TOKEN": PASSWORD}, WithSecret)
    assert text.startswith("PGKD_TEST_TOKEN: ") and PASSWORD not in text


def test_the_secret_file_variant_reads_a_mounted_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")         # a Secret or `echo` leaves a newline
    kafka = read(KafkaSecuritySettings, {"PGKD_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert kafka.sasl_password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(kafka)
    assert "cannot read it" in refused({"PGKD_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    assert "the file is empty" in refused({"PGKD_KAFKA_SASL_PASSWORD_FILE": str(tmp_path / "empty")})
    # every secret has its *_FILE variant
    for section in SECTIONS.values():
        for field, info in section.model_fields.items():
            if info.json_schema_extra["secret"]:
                assert f"{section.variable(field)}_FILE" in section.variables()


def test_each_section_is_read_on_its_own():
    """A service reads the sections it needs: another part's bad variable does not stop it."""
    assert read(ArtifactSettings, {"PGKD_METRICS_PORT": "x"}).artifacts == "file://./artifacts"
    assert one(ArtifactSettings, "cache", {"PGKD_ARTIFACTS": "s3://", "PGKD_CACHE": "/c"}) == "/c"


def test_the_serving_formats_are_the_repositorys():
    from pgkd.serving.repository import FORMATS
    from pgkd.settings import SERVING_FORMATS
    assert tuple(FORMATS) == SERVING_FORMATS


def test_the_settings_module_imports_no_bus_and_no_services():
    code = ("import sys, pgkd.settings; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('faststream', 'aiokafka', 'kafka', 'pgkd_services', 'torch')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_password_file_passes_the_check_as_it_passes_the_commands(tmp_path, monkeypatch, capsys):
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    for variable, value in {"PGKD_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "PGKD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                            "PGKD_KAFKA_SASL_USERNAME": "u", "PGKD_KAFKA_SASL_PASSWORD_FILE": str(secret)}.items():
        monkeypatch.setenv(variable, value)
    assert main(["settings", "--check"]) == 0 and PASSWORD not in capsys.readouterr().out
    settings = Settings.from_env()                  # each section read, then validated again as part of the whole
    assert settings.kafka.sasl_password.get_secret_value() == PASSWORD
    monkeypatch.setenv("PGKD_KAFKA_SASL_PASSWORD", "another")
    assert main(["settings", "--check"]) == 2
    assert "are both set: give one" in capsys.readouterr().err


def test_a_reader_that_goes_away_is_not_an_error():
    """`pgkd settings | head -2`: the pipe closes under the command; no "Broken pipe" line, as Unix tools."""
    result = subprocess.run(f"{sys.executable} -m pgkd.cli settings | head -2", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert len(result.stdout.splitlines()) == 2 and result.stderr == "", result.stderr


def test_stream_status_names_the_stream_of_pgkd_stream(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/artifacts")
    monkeypatch.setenv("PGKD_STREAM", "tickets")
    assert main(["stream", "status"]) == 2
    assert "stream tickets: not found" in capsys.readouterr().err


def test_a_prometheus_url_with_a_password_is_refused_without_showing_it():
    text = refused({"PGKD_PROMETHEUS_URL": f"http://admin:{PASSWORD}@127.0.0.1:9090"}, ServiceSettings)
    assert text.startswith("PGKD_PROMETHEUS_URL: a user or password") and PASSWORD not in text
