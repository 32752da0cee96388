"""One run at a time writes an output folder: a second run into it is refused before any work, and a run
killed (even by SIGKILL) never blocks the next. Also: an --out whose name is too long is one line, exit 2."""
import json
import os
import sys

import pytest
import pgkd
from pgkd import processes
from pgkd.cli import main
from pgkd.errors import UserError
from pgkd.files import file_sha256
from pgkd.loop import embedded
from pgkd.loop.outputs import LOCK, MANIFEST, STAGING, RunOutput

TINY = ["--student", "tiny", "--labeled", "40", "--epochs", "1", "--max-cycles", "0", "--no-progress"]


def _distill(toy_data, out, seed=0) -> int:
    return main(["distill", *TINY, "--seed", str(seed), "--data", str(toy_data), "--out", str(out)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _assert_whole_result(out, seed):
    """OUT holds one run's result: the files its manifest lists, each as written, and nothing of a run's working."""
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["state"] == "complete"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert files == set(manifest["files"]) and {"report.json", "history.png", "best/config.json"} <= files
    assert all(file_sha256(out / rel) == entry["sha256"] for rel, entry in manifest["files"].items())
    assert json.loads((out / "report.json").read_text())["seed"] == seed
    assert not (out / STAGING).exists() and not (out / LOCK).exists()


def test_a_second_run_into_an_out_being_written_is_refused_and_the_first_finishes_whole(capsys, toy_data, tmp_path,
                                                                                         monkeypatch):
    """The reviewer's case, in order: the second run starts while the first is working (from inside it)."""
    out = tmp_path / "twice"
    real_distill_splits, second = embedded.distill_splits, {}

    def first_run_working(*args, **kwargs):
        capsys.readouterr()
        second["code"] = _distill(toy_data, out, seed=2)
        second["err"] = _one_error_line(capsys)
        second["staging_kept"] = (out / STAGING / MANIFEST).is_file()
        return real_distill_splits(*args, **kwargs)
    monkeypatch.setattr(embedded, "distill_splits", first_run_working)
    assert _distill(toy_data, out, seed=1) == 0
    assert second["code"] == 2
    assert f"--out {out}: another pgkd run is writing there" in second["err"]
    assert second["staging_kept"]                           # the first run's work was not removed
    _assert_whole_result(out, seed=1)


def test_a_second_run_is_refused_before_any_work_and_a_rerun_over_a_result_keeps_it(capsys, toy_data, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "run"
    assert _distill(toy_data, out, seed=1) == 0
    first = RunOutput(out)
    first.open()                                            # a run into OUT, holding its lock
    loaded = []
    monkeypatch.setattr("pgkd.loop.embedded.load_dataset", lambda *a, **k: loaded.append(1))
    capsys.readouterr()
    assert _distill(toy_data, out, seed=2) == 2
    assert "another pgkd run is writing there" in _one_error_line(capsys)
    assert not loaded
    assert main(["distill", "--dry-run", *TINY, "--data", str(toy_data), "--out", str(out)]) == 0
    first.abort()
    _assert_whole_result(out, seed=1)                       # the result before either run, as it was


def test_the_python_api_gets_the_refusal_as_a_user_error(toy_data, tmp_path):
    out = tmp_path / "run"
    first = RunOutput(out)
    first.open()
    try:
        with pytest.raises(UserError, match=r"out=.*another pgkd run is writing there; .*choose another out"):
            pgkd.distill(str(toy_data), teacher="pool-random", student="tiny", max_cycles=0, out=out, labeled=40,
                         epochs=1, progress=False)
        assert (out / STAGING / MANIFEST).is_file()
    finally:
        first.abort()
    assert not out.exists()                                 # the first made OUT, and its abort leaves nothing


def test_a_run_killed_by_sigkill_does_not_block_the_next(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    ready, said = os.pipe()
    with os.fdopen(said, "w") as log:
        holder = processes.spawn([sys.executable, "-c", "import signal, sys; from pgkd.loop.outputs import RunOutput; "
                                  "held = RunOutput(sys.argv[1]); held.open(); print('open', flush=True); "
                                  "signal.pause()", str(out)], log=log)
    try:
        with os.fdopen(ready) as said_by_holder:
            assert said_by_holder.readline() == "open\n"   # it holds the lock now
        assert _distill(toy_data, out) == 2
        assert "another pgkd run is writing there" in _one_error_line(capsys)
    finally:
        processes.kill(holder)          # SIGKILL: no handler of the run runs
    assert (out / STAGING).is_dir() and (out / LOCK).is_file()      # what the killed run left
    assert _distill(toy_data, out, seed=3) == 0
    _assert_whole_result(out, seed=3)


def test_out_only_with_a_lock_file_of_pgkds_is_not_refused_and_a_users_lock_file_is_kept(toy_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("")                             # not marked as pgkd's: left where it is
    assert _distill(toy_data, out) == 0
    assert (out / LOCK).read_text() == ""
    assert _distill(toy_data, out, seed=1) == 0              # a rerun over a result beside the lock file
    assert (out / LOCK).read_text() == ""


@pytest.mark.parametrize("name", ["x" * 300, "a/" + "x" * 300 + "/b", "x/" * 3000 + "x"])
def test_an_out_name_too_long_is_one_line_and_leaves_nothing(capsys, toy_data, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    for dry_run in ([], ["--dry-run"]):
        assert main(["distill", *dry_run, *TINY, "--data", str(toy_data), "--out", name]) == 2
        assert f"--out {name}: cannot write there (File name too long)" in _one_error_line(capsys)
        assert sorted(os.listdir(tmp_path)) == before


def test_a_refused_run_leaves_no_folder_it_made_on_the_way_to_out(capsys, tmp_path):
    """A reviewer's: bad data into --out p1/p2/p3 left p1/p2 behind."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": \n')
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "mine.txt").write_text("mine\n")       # p1 was there: it stays, with its file
    assert main(["distill", "--data", str(bad), "--out", str(tmp_path / "p1" / "p2" / "p3")]) == 2
    assert "unreadable row" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "p1").iterdir()) == ["mine.txt"]
