"""What a hostile new user found on a fresh clone after the safety work (issue 25), each as it was
reproduced: a host that binds every interface under another name, an export into a folder that is not
a repository, tracebacks, a wait without end, a command that SIGTERM did not unwind."""
import signal
import sys
import time

import pytest

import pgkd
from pgkd.cli import main
from pgkd.errors import UserError
from pgkd.net import parse_host
from pgkd.settings import host_from_env
from pgkd.processes import spawn, stop


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("host", ["0", "00", "0.0", "0x0", "0X7f000001", "127.1"])
def test_numeric_shorthands_that_a_resolver_reads_as_addresses_are_not_host_names(host):
    with pytest.raises(UserError, match="not a host"):
        parse_host(host, "--host")
    with pytest.raises(UserError, match="PGKD_HTTP_HOST"):
        host_from_env({"PGKD_HTTP_HOST": host})
    assert parse_host("1e100.net", "--host") == "1e100.net" and parse_host("0.0.0.0", "--host") == "0.0.0.0"


class NotAStudent:
    labels = ["a", "b"]


def test_export_writes_only_into_a_model_repository_not_a_folder_that_holds_one_model(tmp_path, capsys):
    home = tmp_path / "home"
    (home / "proj").mkdir(parents=True)
    (home / "proj" / "config.pbtxt").write_text("x")
    (home / "Documents").mkdir()
    assert main(["export", str(tmp_path / "any-student"), "--out", str(home)]) == 2
    assert "Documents is not a model folder" in one_error_line(capsys)
    with pytest.raises(UserError, match="not a model folder"):
        pgkd.export(NotAStudent(), home)
    assert sorted(p.name for p in home.iterdir()) == ["Documents", "proj"]


def test_a_failed_first_export_leaves_no_repository_it_made(tmp_path):
    with pytest.raises(Exception):
        pgkd.export(NotAStudent(), tmp_path / "new" / "models")
    assert not (tmp_path / "new" / "models").exists()


def test_export_of_a_store_folder_or_into_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    (store / "datasets").mkdir(parents=True)
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{store}")
    assert main(["export", f"file://{store}/datasets", "--out", str(tmp_path / "models")]) == 2
    assert "a folder of the store, not an artifact" in one_error_line(capsys)
    (tmp_path / "afile").write_text("hi")
    assert main(["export", f"file://{store}/runs/x", "--format", "hf", "--out", str(tmp_path / "afile")]) == 2
    assert "afile" in one_error_line(capsys)


@pytest.mark.parametrize("value", ["inf", "1e400", "-1", "nan", "0"])
def test_a_connect_timeout_must_end(value, monkeypatch):
    from pgkd_services.runtime import connect_timeout
    monkeypatch.setenv("PGKD_CONNECT_TIMEOUT", value)
    with pytest.raises(UserError, match="PGKD_CONNECT_TIMEOUT"):
        connect_timeout()


def test_classify_refuses_a_model_name_that_is_a_path():
    with pytest.raises(UserError, match="model=.*not a name"):
        pgkd.classify("http://127.0.0.1:9", ["hello"], model="../x")


def test_sigterm_unwinds_pgkd_distill_and_leaves_no_staging_and_no_out_it_made(toy_data, tmp_path):
    out = tmp_path / "out"
    with (tmp_path / "distill.log").open("w") as log:
        process = spawn([sys.executable, "-m", "pgkd.cli", "distill", "--data", str(toy_data), "--student", "tiny",
                         "--labeled", "40", "--epochs", "30", "--max-cycles", "3", "--no-progress", "--out", str(out)],
                        log=log)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".pgkd-staging").exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "distill.log").read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)               # as `kill` does
        process.wait(60)
    finally:
        stop(process)
    err = (tmp_path / "distill.log").read_text()
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "interrupted; nothing was written" in err
    assert not out.exists()
