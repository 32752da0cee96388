"""Names from users and messages never become paths outside their folder (pgkd.names), and pgkd never
deletes or overwrites a file it did not write: the cases found by the adversarial trial, then generated
input (Hypothesis) against the same edges. Everything happens under a temporary root, and each test
checks that nothing outside the folder it aimed at changed."""
import json
import os
import string
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import pgkd
from pgkd.cli import main
from pgkd.artifacts import ArtifactStore
from pgkd.distributed.messages import RunRequested, StudentPromoted
from pgkd.distributed.runs import RunFiles
from pgkd.errors import UserError
from pgkd.loop.outputs import MANIFEST, RunOutput
from pgkd.names import UnsafeName, check_name, check_relative, inside, is_name, is_relative
from pgkd.serving.repository import OWNER, model_folder, require_own_folder
from pgkd.stream.settings import StreamSettings
from pgkd.stream.state import stream_key

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that looks like paths: separators, dots, links' favourite targets, and any other character.
path_text = st.one_of(
    st.lists(st.sampled_from(list("./\\~-_ aZ09\x00\n%") + ["..", "../", "/..", "%2e%2e"]), max_size=12).map("".join),
    st.text(max_size=40),
    st.sampled_from([".", "..", "../x", "a/../../x", "/etc/passwd", "a/b", "a//b", "./a", "a/.", "~", "\x00", "",
                     "a" * 129, "best/../../victim.txt", " ..", ".. ", "..\\x", "C:\\x", "\u2024\u2024"]))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def run(*argv: str) -> int:
    """`pgkd ARGV` in this process: its exit code, argparse's included (it exits 2 on an option it cannot read)."""
    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- the module itself --------------------------------------------------------------------------------------

@PROPERTY
@given(value=path_text)
def test_a_name_is_one_component_inside_its_root_or_it_is_refused(tmp_path, value):
    root = tmp_path / "root"
    if is_name(value):
        assert "/" not in value and value not in (".", "..") and not value.startswith(".") and len(value) <= 128
        assert inside(root, check_name(value, "name")).parent == root
    else:
        with pytest.raises(UnsafeName) as refused:
            check_name(value, "run")
        assert str(refused.value).startswith("run ") and "\n" not in str(refused.value)


@PROPERTY
@given(value=path_text)
def test_a_relative_path_resolves_inside_its_root_or_it_is_refused(tmp_path, value):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    if is_relative(value):
        resolved = Path(os.path.realpath(inside(root, value)))
        assert resolved == root.resolve() or root.resolve() in resolved.parents
    else:
        with pytest.raises(UnsafeName):
            inside(root, value)
        with pytest.raises(UnsafeName):
            check_relative(value, "entry")


def test_a_link_that_leads_out_is_refused_and_links_are_refused_where_pgkd_writes_none(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "in").symlink_to(root / "real")
    with pytest.raises(UnsafeName, match="leads outside"):
        inside(root, "out/file")
    assert inside(root, "in/file") == root / "in" / "file"          # a link that stays inside is followed
    with pytest.raises(UnsafeName, match="is a link"):
        inside(root, "in/file", links=False)


# -- 1. a run never deletes a file outside --out --------------------------------------------------------------

TINY = ["--student", "tiny", "--labeled", "40", "--epochs", "1", "--max-cycles", "0", "--no-progress"]


def test_a_manifest_naming_a_file_outside_out_is_refused_and_the_file_stays(toy_data, tmp_path, capsys):
    """The trial's case: a result folder copied from elsewhere, whose manifest lists best/../../victim.txt."""
    parent = tmp_path / "work"
    out = parent / "out"
    (out / "best").mkdir(parents=True)
    (out / MANIFEST).write_text(json.dumps({"written_by": "pgkd", "state": "complete",
                                            "files": {"best/../../victim.txt": {}}}))
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    before = snapshot(tmp_path)
    assert main(["distill", *TINY, "--data", str(toy_data), "--out", str(out)]) == 2
    assert "best/../../victim.txt" in one_error_line(capsys)
    assert victim.read_text() == "mine" and snapshot(tmp_path) == before


def test_a_manifest_entry_through_a_link_is_refused(toy_data, tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir(), elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (out / "best").symlink_to(elsewhere)
    (out / MANIFEST).write_text(json.dumps({"written_by": "pgkd", "files": {"best/keep.txt": {}}}))
    assert main(["distill", *TINY, "--data", str(toy_data), "--out", str(out)]) == 2
    assert "link" in one_error_line(capsys)
    assert (elsewhere / "keep.txt").read_text() == "mine"


@PROPERTY
@given(entries=st.lists(path_text, max_size=4), written_by=st.sampled_from(["pgkd", "someone", None]))
def test_whatever_a_manifest_says_a_run_touches_nothing_outside_out(tmp_path, entries, written_by):
    """Generated manifests: the folder is refused before anything is touched, or the run replaces
    only files inside OUT that the manifest lists."""
    case = tmp_path / uuid.uuid4().hex
    out = case / "out"
    (out / "best").mkdir(parents=True)
    (case / "victim.txt").write_text("mine")
    (out / "best" / "a").write_text("pgkd's")
    manifest = {"files": {entry: {} for entry in entries + ["best/a"]}}
    if written_by:
        manifest["written_by"] = written_by
    (out / MANIFEST).write_text(json.dumps(manifest))
    outside = {k: v for k, v in snapshot(case).items() if not k.startswith("out")}
    run = RunOutput(out)
    try:
        staging = run.open()
    except UserError:
        assert snapshot(case)["out/best/a"] == b"pgkd's"     # refused: nothing touched
    else:
        (staging / "report.json").write_text("{}")
        run.commit()
        assert json.loads((out / MANIFEST).read_text())["files"].keys() == {"report.json"}
    assert {k: v for k, v in snapshot(case).items() if not k.startswith("out")} == outside


# -- 2, 3. a model's name, and a model folder pgkd did not write --------------------------------------------

class NotAStudent:
    """Fails where a real export would start converting the model: what ran before it is what is checked."""
    labels = ["a", "b"]


def test_export_refuses_a_model_name_that_is_a_path_and_writes_nothing(tmp_path, capsys):
    repository = tmp_path / "models"
    repository.mkdir()
    (tmp_path / "labels.txt").write_text("the user's\n")
    before = snapshot(tmp_path)
    for name in ("..", "../../x", "a/b", ".hidden", ""):
        assert main(["export", str(tmp_path / "any-student"), "--out", str(repository), "--model-name", name]) == 2
        assert "--model-name" in one_error_line(capsys)
        with pytest.raises(UserError, match="model name"):
            pgkd.export(NotAStudent(), repository, name=name)
    assert snapshot(tmp_path) == before


def test_export_never_takes_over_a_model_folder_it_did_not_write(tmp_path, capsys):
    repository = tmp_path / "models"
    (repository / "student").mkdir(parents=True)
    (repository / "student" / "config.pbtxt").write_text('name: "student"\nbackend: "onnxruntime"\n')
    (repository / "student" / "labels.txt").write_text("theirs\n")
    before = snapshot(tmp_path)
    assert main(["export", str(tmp_path / "any-student"), "--out", str(repository)]) == 2
    assert f"was not written by pgkd (no {OWNER})" in one_error_line(capsys)
    with pytest.raises(UserError, match="was not written by pgkd"):
        pgkd.export(NotAStudent(), repository)                # the Python API checks the same
    assert snapshot(tmp_path) == before


@PROPERTY
@given(name=path_text)
def test_generated_model_names_stay_one_folder_inside_the_repository(tmp_path, name):
    repository = tmp_path / "models"
    repository.mkdir(exist_ok=True)
    before = snapshot(tmp_path)
    try:
        pgkd.export(NotAStudent(), repository, name=name)
    except UserError:
        assert not is_name(name)
    except Exception:   # a name that passed: the export failed on the fake student, after the checks
        assert is_name(name) and model_folder(repository, name).parent == repository
    assert snapshot(tmp_path) == before                      # a first version that failed leaves no folder


def test_a_model_folder_pgkd_wrote_may_take_its_next_version(tmp_path):
    repository = tmp_path / "models"
    folder = repository / "student"
    folder.mkdir(parents=True)
    (folder / OWNER).write_text(json.dumps({"written_by": "pgkd", "model": "student"}))
    (folder / "config.pbtxt").write_text("tuned by hand\n")
    require_own_folder(repository, "--out")                  # no error


# -- 4. run ids and stream names ----------------------------------------------------------------------------

@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """An artifact store under tmp_path/store, with a request.json planted outside it."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "request.json").write_text(json.dumps({"config": {"data": "SECRET"}}))
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path / 'store'}")
    monkeypatch.setenv("PGKD_BROKER_URL", "kafka://127.0.0.1:9")
    return tmp_path


def test_submit_refuses_a_run_id_that_is_a_path_before_reading_anything(store_env, toy_data, capsys):
    for run_id in ("..", "../x", "a/b", "."):
        assert main(["submit", "--data", str(toy_data), "--labeled", "40", "--run-id", run_id]) == 2
        assert "--run-id" in one_error_line(capsys)
    assert snapshot(store_env / "store") == {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_id=path_text)
def test_generated_run_ids_through_submit_never_write_outside_the_store(store_env, toy_data, capsys, monkeypatch,
                                                                      run_id):
    """A name goes on to the broker (none listens: one line, exit 1, and no run recorded); anything else
    is refused first (exit 2). Either way nothing changes outside the store."""
    monkeypatch.setenv("PGKD_CONNECT_TIMEOUT", "0.2")
    outside = {k: v for k, v in snapshot(store_env).items() if not k.startswith("store")}
    code = run("submit", "--data", str(toy_data), "--labeled", "40", "--run-id", run_id)
    err = capsys.readouterr().err
    assert code == (1 if is_name(run_id) else 2) and len(err.strip().splitlines()) == 1, (run_id, err)
    assert "Traceback" not in err, (run_id, err)
    assert ("cannot reach the broker" in err) == is_name(run_id), err
    assert {k: v for k, v in snapshot(store_env).items() if not k.startswith("store")} == outside
    assert not (store_env / "store" / "runs").exists()


@PROPERTY
@given(run_id=path_text)
def test_status_reads_only_runs_inside_the_store(store_env, capsys, run_id):
    code = run("status", run_id)
    out, err = capsys.readouterr()
    assert code == 2 and "SECRET" not in out + err and len(err.strip().splitlines()) == 1, (run_id, out, err)
    assert ("not a name" in err or "error: " in err and run_id.startswith("-")) != is_name(run_id)          # a name is looked up (and not found), a path refused


@PROPERTY
@given(name=path_text, command=st.sampled_from(["status", "repair"]))
def test_stream_commands_refuse_names_that_are_paths(store_env, capsys, name, command):
    (store_env / "outside" / "state.json").write_text("{}")
    code = run("stream", command, name)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert snapshot(store_env / "store") == {}


@PROPERTY
@given(value=path_text)
def test_messages_and_settings_take_only_names(value):
    ref = {"uri": "file:///x", "sha256": "0" * 64, "size": 1}
    makers = [lambda: RunRequested(run_id=value, cycle=0, config={}, dataset=ref),
              lambda: StudentPromoted(run_id="r", cycle=0, checkpoint=ref, model=value, scores={}, decision="d",
                                      source="run"),
              lambda: StreamSettings(stream=value[:40], serving_model=value)]
    for make in makers:
        if is_name(value):
            make()
        else:
            with pytest.raises(ValidationError):
                make()
    if is_name(value):
        assert RunFiles(value).base == f"runs/{value}" and stream_key(value) == f"streams/{value}"
    else:
        with pytest.raises(UnsafeName):
            RunFiles(value)
        with pytest.raises(UnsafeName):
            stream_key(value)


def test_a_reference_whose_sha256_is_a_path_is_refused():
    with pytest.raises(ValidationError):
        RunRequested(run_id="r", cycle=0, config={}, dataset={"uri": "file:///x", "sha256": "../../x", "size": 1})


@PROPERTY
@given(key=path_text)
def test_the_artifact_store_writes_only_inside_its_root(tmp_path, key):
    root = tmp_path / "store" / uuid.uuid4().hex
    store = ArtifactStore(f"file://{root}")
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("store")}
    try:
        ref = store.put_bytes(key, b"x")
    except UserError:
        assert not is_relative(key)
    else:
        assert is_relative(key) and store.get_bytes(ref) == b"x"
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("store")} == before


def test_the_alphabet_of_a_name_is_what_the_docs_say():
    assert is_name("banking77-20261203-101010-abc123") and is_name("v1.2_final")
    assert not any(is_name(c) for c in set(string.punctuation) - set("_-."))


def test_an_artifact_store_is_a_folder_of_pgkds_own(store_env, toy_data, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("mine")
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{home}")
    assert run("submit", "--data", str(toy_data), "--labeled", "40") == 2
    assert "thesis.tex was not written by pgkd" in one_error_line(capsys)
    assert snapshot(home) == {"thesis.tex": b"mine"}
    with pytest.raises(UserError, match="not written by pgkd"):
        ArtifactStore(f"file://{home}").put_json("runs/r/request.json", {})
    older = tmp_path / "older"                               # a store written before the marker: still pgkd's
    (older / "runs" / "r").mkdir(parents=True)
    ArtifactStore(f"file://{older}").put_json("runs/r/completed.json", {})
    assert (older / ".pgkd-store.json").is_file()


def test_services_claiming_a_new_store_at_once_do_not_refuse_each_other(tmp_path):
    """The second finds the first half way through writing the store's owner file (CI found the race:
    replicas started together, one refused the store)."""
    from pgkd.files import temporary_name
    root = tmp_path / "store"
    root.mkdir()
    half_written = temporary_name(root / ".pgkd-store.json")
    half_written.write_text("{")
    ArtifactStore(f"file://{root}").put_json("runs/r/request.json", {})
    assert (root / ".pgkd-store.json").is_file()
    for i, name in enumerate([".pgkd-store.json.tmp", ".pgkd-store.json.xyz.tmp", ".thesis.tex." + "a" * 32 + ".tmp"]):
        other = tmp_path / f"other{i}"
        other.mkdir()
        (other / name).write_text("mine")
        with pytest.raises(UserError, match="not written by pgkd"):
            ArtifactStore(f"file://{other}").put_json("runs/r/request.json", {})


def test_a_version_manifest_naming_a_file_outside_its_folder_fails_to_load(tmp_path):
    """model.py runs inside Triton without pgkd: it checks the manifest's file names itself."""
    from pgkd.serving.triton_model import MANIFEST as VERSION_MANIFEST, check_version_folder
    version = tmp_path / "student" / "1"
    version.mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    for name in ("../../secret", "/etc/hostname", "..", "a/b"):
        (version / VERSION_MANIFEST).write_text(json.dumps({"files": {name: "0" * 64}}))
        with pytest.raises(RuntimeError, match="is not a file of the version folder"):
            check_version_folder(version)


def test_bench_dataset_names_and_promoted_models_stay_inside_their_folders(tmp_path, capsys):
    from pgkd.distributed.steps import latest_promotion_key
    for name in ("..", "../x"):
        assert run("bench", "peers", "--quick", "--datasets", name, "--data-dir", str(tmp_path),
                   "--out", str(tmp_path / "out")) == 2
        assert "dataset" in one_error_line(capsys)
        with pytest.raises(UnsafeName):
            latest_promotion_key(name)
    assert run("bench", "quality", "--datasets", "..", "--data-dir", str(tmp_path / "d"),
               "--out", str(tmp_path / "out")) == 2
    assert "dataset" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_rerun_refuses_a_result_file_changed_since_pgkd_wrote_it(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--data", str(toy_data), "--out", str(out)]) == 0
    (out / "report.json").write_text("MY OWN ANALYSIS")
    before = snapshot(out)
    capsys.readouterr()
    assert main(["distill", *TINY, "--data", str(toy_data), "--out", str(out)]) == 2
    assert "report.json was changed since pgkd wrote it" in one_error_line(capsys)
    assert snapshot(out) == before


@pytest.mark.parametrize("bench", [
    ["stream", "--data", "/nonexistent/dataset", "--no-progress"],
    ["stream", "--samples", "10", "--no-progress"],
    ["bus", "--data", "DATA", "--student", "tiny", "--labeled", "40", "--epochs", "1", "--max-cycles", "0",
     "--no-progress"],
    ["quality", "--data-dir", "DIR", "--datasets", "toy", "--arms", "baseline", "--seeds", "1", "--student", "tiny",
     "--labeled", "40", "--max-cycles", "0", "--epochs", "1", "--no-progress"],
    ["peers", "--quick", "--data-dir", "DIR", "--datasets", "toy", "--no-progress"],
    ["speed", "--quick", "--data", "DATA", "--student", "tiny"],
])
def test_a_benchmark_never_writes_into_a_folder_it_did_not_write(toy_data, tmp_path, capsys, bench):
    """The trial's cases: bench stream deleted a user's artifacts/ and stream.md, bench stream --samples
    overwrote data/train.jsonl, bench bus removed work/, bench quality overwrote quality.md."""
    out = tmp_path / "mine"
    for name in ("artifacts/sub/keep.txt", "stream.md", "data/train.jsonl", "work/thesis.tex", "quality.md",
                 "cluster/notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = snapshot(out)
    argv = [a.replace("DATA", str(toy_data)).replace("DIR", str(toy_data.parent)) for a in bench]
    assert run("bench", *argv, "--out", str(out)) == 2
    assert "not written by pgkd" in one_error_line(capsys)
    assert snapshot(out) == before


# -- where pgkd writes: no link, no control character (pgkd.files.output_path_problem) ----------------------

@pytest.mark.parametrize("where", ["distill", "export", "export-hf", "bench", "prompt", "save"])
@pytest.mark.parametrize("kind", ["link", "newline", "escape"])
def test_a_place_to_write_that_is_a_link_or_holds_a_control_character_is_refused_and_nothing_is_made(
        where, kind, toy_data, tmp_path, capsys, saved_student):
    """The trial's cases: `--out` a link to another folder wrote the result there; `--out 'o\\nx'` and
    `--out $'o\\x1b[31m'` made such folders and printed them raw (a split line, a terminal's escape)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = {"link": tmp_path / "out", "newline": tmp_path / "o\nx", "escape": tmp_path / "o\x1b[31mred"}[kind]
    if kind == "link":
        target.symlink_to(elsewhere)
    before = snapshot(tmp_path)
    if where == "save":
        with pytest.raises(UserError, match="is a link" if kind == "link" else "control character"):
            pgkd.load_student(saved_student).save(target)
        assert snapshot(tmp_path) == before
        return
    argv = {"distill": ["distill", *TINY, "--data", str(toy_data), "--out", str(target)],
            "export": ["export", str(saved_student), "--out", str(target)],
            "export-hf": ["export", "file:///nowhere/x", "--format", "hf", "--out", str(target)],
            "bench": ["bench", "speed", "--quick", "--data", str(toy_data), "--student", "tiny", "--out", str(target)],
            "prompt": ["distill", "--data", str(toy_data), "--labeled", "40", "--dry-run", "--prompt-file",
                       str(target)]}[where]
    assert main(argv) == 2
    err = one_error_line(capsys)
    said = "holds a control character" if kind != "link" else "exists already" if where == "prompt" else "is a link"
    assert said in err, err
    assert "\x1b" not in err and snapshot(tmp_path) == before and list(elsewhere.iterdir()) == []


def test_a_repository_pgkd_only_reads_may_be_a_link_one_it_writes_may_not(tmp_path, saved_student):
    """`pgkd serve --model current` with `current -> repo-v2`, a common deployment layout: it only reads it."""
    pgkd.export(saved_student, tmp_path / "repo-v2")
    (tmp_path / "current").symlink_to(tmp_path / "repo-v2")
    require_own_folder(tmp_path / "current", "--model", writes=False)
    with pytest.raises(UserError, match="--out .*current: is a link"):
        require_own_folder(tmp_path / "current", "--out")


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:23005/v2@x", "--url http://127.0.0.1:23005/v2@x: expected http://HOST:PORT"),  # no password
    ("http://me:pw@127.0.0.1:23005", "--url http://127.0.0.1:23005 (a user and password before it, not shown)"),
])
def test_an_at_sign_is_a_password_only_before_the_host(url, says, capsys):
    assert run("classify", "--url", url, "hi") == 2
    err = one_error_line(capsys)
    assert says in err and "pw" not in err.replace("/v2", ""), err


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory) -> Path:
    from pgkd.students import create_student
    folder = tmp_path_factory.mktemp("student") / "best"
    create_student("tiny", ["a", "b"]).save(folder)
    return folder


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_the_error_boundary_shows_every_control_character_and_line_break_instead_of_obeying_it(text):
    from pgkd.cli import one_line
    shown = one_line(f"pgkd: error: {text}")
    assert len(shown.splitlines()) == 1
    assert not any(ord(c) < 32 and c != "\t" or 127 <= ord(c) < 160 for c in shown), repr(shown)
