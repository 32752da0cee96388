"""The output folder: pgkd replaces only what it wrote (its manifest says what), never a user's file."""
import json
import os
import shutil
import subprocess

import pytest
from pgkd.cli import main
from pgkd.errors import UserError
from pgkd.loop.outputs import MANIFEST, STAGING, RunOutput

TINY = ["--student", "tiny", "--labeled", "40", "--epochs", "1", "--max-cycles", "0", "--no-progress"]


def _distill(toy_data, out) -> int:
    return main(["distill", *TINY, "--data", str(toy_data), "--out", str(out)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_someone_elses_report_json_is_refused_and_untouched(capsys, toy_data, tmp_path):
    """The new user's case: a project folder with a report.json of its own is not a pgkd result."""
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "report.json").write_text('{"quarterly":"numbers"}')
    (project / "thesis.tex").write_text("x")
    (project / "src" / "main.py").write_text("print(1)")
    before = _tree(project)
    assert _distill(toy_data, project) == 2
    assert "was not written by pgkd" in _one_error_line(capsys)
    assert _tree(project) == before and sorted(p.name for p in project.iterdir()) == ["report.json", "src",
                                                                                      "thesis.tex"]


def test_a_rerun_replaces_pgkds_files_and_keeps_the_users(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    assert _distill(toy_data, out) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["written_by"] == "pgkd" and manifest["state"] == "complete"
    assert {"report.json", "history.png", "best/config.json"} <= set(manifest["files"])
    assert set(manifest["files"]) == {p for p in _tree(out) if p != MANIFEST}
    (out / "notes.md").write_text("what I saw")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("import matplotlib")
    first_report = json.loads((out / "report.json").read_text())
    assert main(["distill", *TINY, "--seed", "2", "--data", str(toy_data), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["seed"] == 2 != first_report["seed"]
    assert (out / "notes.md").read_text() == "what I saw"
    assert (out / "analysis" / "plot.py").read_text() == "import matplotlib"
    assert not (out / STAGING).exists()
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {
        p for p in _tree(out) if p not in (MANIFEST, "notes.md", "analysis/plot.py")}


def test_a_users_file_inside_an_entry_pgkd_replaces_is_refused(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    assert _distill(toy_data, out) == 0
    (out / "best" / "my-notes.txt").write_text("mine")
    before = _tree(out)
    capsys.readouterr()
    assert _distill(toy_data, out) == 2
    assert "best/my-notes.txt was not written by pgkd" in _one_error_line(capsys)
    assert _tree(out) == before


def test_an_edited_manifest_that_is_not_pgkds_is_refused(capsys, toy_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MANIFEST).write_text('{"files": {"thesis.tex": {}}}')
    (out / "thesis.tex").write_text("x")
    assert _distill(toy_data, out) == 2
    assert "was not written by pgkd" in _one_error_line(capsys)
    assert (out / "thesis.tex").read_text() == "x"


def test_a_staging_folder_that_is_not_pgkds_is_left_alone(tmp_path):
    out = tmp_path / "run"
    (out / STAGING).mkdir(parents=True)
    (out / STAGING / "keep.txt").write_text("mine")
    (out / MANIFEST).write_text(json.dumps({"written_by": "pgkd", "files": {}}))
    with pytest.raises(UserError, match="was not written by pgkd"):
        RunOutput(out).open()
    assert (out / STAGING / "keep.txt").read_text() == "mine"


def test_a_crash_while_swapping_loses_no_user_file_and_the_next_run_recovers(toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _distill(toy_data, out) == 0
    (out / "notes.md").write_text("mine")
    real_replace, moves = os.replace, []

    def crash_on_the_second_move(src, dst):
        if str(src).startswith(str(out / STAGING)) and not os.path.basename(src).startswith(f".{MANIFEST}."):
            moves.append(src)
            if len(moves) == 2:
                raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_the_second_move)
    assert _distill(toy_data, out) == 130
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "report.json").exists()              # half swapped: it does not look like a result
    assert (out / "notes.md").read_text() == "mine"
    assert _distill(toy_data, out) == 0
    assert (out / "report.json").is_file() and (out / "notes.md").read_text() == "mine"
    assert not (out / STAGING).exists()


def test_out_below_a_file_is_one_line(capsys, toy_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert _distill(toy_data, tmp_path / "afile" / "x") == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in _one_error_line(capsys)
    assert (tmp_path / "afile").read_text() == "x"


def test_an_unwritable_out_is_one_line_before_any_work(capsys, toy_data, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    immutable = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(locked)]).returncode == 0
    if not immutable:
        locked.chmod(0o500)
        if os.access(locked, os.W_OK):
            pytest.skip("neither chattr +i nor permissions can make a folder unwritable here")
    loaded = []
    monkeypatch.setattr("pgkd.loop.embedded.load_dataset", lambda *a, **k: loaded.append(1))
    try:
        assert _distill(toy_data, locked / "out") == 2
        assert f"--out {locked / 'out'}: cannot write there" in _one_error_line(capsys)
        assert not loaded                                   # refused before the data was read
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)])
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []
