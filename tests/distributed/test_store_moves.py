"""A store that can move (issue "A new user's first hour"): the references inside an artifact store are
relative to it, so a store copied (a backup restored elsewhere) or moved (a volume mounted at another
path) reads back as it was written: `pgkd status`, `pgkd stream status`, ingest's start, the current
student. A store written before (every reference the absolute `file://` URI of where it was) still loads
after a move; a reference to another store is one line; no text given as a reference reads anything
outside the store's root."""
import json
import os
import shutil
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from conftest import make_toy_dataset
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from stream_fixtures import body, new_samples

import pgkd_services as services
from pgkd.distributed.steps import run_through_steps
from pgkd.cli import main
from pgkd.distributed import steps
from pgkd.artifacts import ArtifactError, ArtifactRef, ArtifactStore, sha256_of
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.names import is_relative
from pgkd.stream import Stream, StreamSettings
from pgkd_services.runtime import Settings, make_broker

RUN = dict(labeled=40, student="tiny", teacher="pool-random", samples_per_cycle=16, max_cycles=1, patience=5,
           epochs=1, cycle_epochs=1, seed=1)
STREAM = dict(base_run="base", trigger_count=1000, drift_window=1000)
TEXTS = ["I lost my card yesterday", "where is my refund", "send money to my brother"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A store written by the real code paths at its first place: a run through the steps the services
    call for `pgkd submit`, then a stream started from it (ingest) that has stored four samples."""
    folder = tmp_path_factory.mktemp("first-place")
    patch = pytest.MonkeyPatch()
    patch.setenv("PGKD_CACHE", str(folder / "cache"))
    try:
        store = ArtifactStore(f"file://{folder}/artifacts")
        data = make_toy_dataset(folder / "toy")
        request = steps.submit(DistillConfig(data=str(data), **RUN), store, run_id="base")
        completed = run_through_steps(request, store)
        stream = Stream(store, StreamSettings(**STREAM))
        stream.open()
        stream.finished(completed)
        rows = new_samples(data, 6)
        assert [stream.ingest(body(r)) for r in rows[:4]] == ["accepted"] * 4
    finally:
        patch.undo()
        steps.forget_process_state()
    return folder / "artifacts", rows


def references(value):
    """Every ArtifactRef in a JSON record, as dicts."""
    if isinstance(value, dict):
        if set(value) == {"uri", "sha256", "size"}:
            yield value
        else:
            for v in value.values():
                yield from references(v)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)


def records(root: Path):
    return [p for p in sorted(root.rglob("*.json")) if "blobs" not in p.relative_to(root).parts]


def as_written_before(root: Path) -> None:
    """The store as pgkd wrote it before references were relative: each reference in its records is the
    absolute URI of where the store is now, `file://ROOT/KEY` (what `ArtifactStore.uri(key)` gives). A
    record that is itself referenced (a run's states: their sha256 is checked) is left as it is."""
    referenced = {ref["uri"] for path in records(root) for ref in references(json.loads(path.read_text()))}
    rewritten = set()
    for path in records(root):
        if str(path.relative_to(root)) in referenced:
            continue
        record = json.loads(path.read_text())
        refs = list(references(record))
        for ref in refs:
            ref["uri"] = f"file://{root}/{ref['uri']}"
        if refs:
            path.write_text(json.dumps(record, indent=1) + "\n")
            rewritten.add(str(path.relative_to(root)))
    assert rewritten >= {"runs/base/request.json", "runs/base/completed.json", "streams/default/state.json"}


def read_back(root: Path, cache: Path, monkeypatch, capsys) -> dict:
    """What a user reads from the store at `root` on another machine: `pgkd status`, `pgkd stream
    status`, and the current student's predictions. Reads only."""
    url = f"file://{root}"
    monkeypatch.setenv("PGKD_ARTIFACTS", url)
    monkeypatch.setenv("PGKD_CACHE", str(cache))       # nothing unpacked yet: the checkpoint comes from the store
    steps.forget_process_state()
    seen = {}
    for command in (["status", "base"], ["stream", "status", "default"]):
        code = main(command)
        out, err = capsys.readouterr()
        assert code == 0 and "Traceback" not in err and "error" not in err, err
        seen[command[0]] = out.replace(url, "STORE")
    store = ArtifactStore(url)
    state = Stream(store, StreamSettings(**STREAM))
    state.open()
    student = steps.load_checkpoint(store, state.state.current.checkpoint, "cpu")
    seen["student"] = (student.labels, np.argmax(student.predict_proba(TEXTS), axis=1).tolist())
    return seen


def ingest_starts(root: Path, rows: list[dict]) -> None:
    """`pgkd service ingest` on the store at `root` (its start, without a broker), then samples."""
    url = f"file://{root}"
    ingest = services.build("ingest", settings=Settings(broker_url="kafka://localhost:9092", artifacts=url),
                            broker=make_broker("kafka://localhost:9092"), store=ArtifactStore(url),
                            stream_settings=StreamSettings(**STREAM))
    ingest.prepare()
    stream = ingest.stream
    assert stream.state.current.run_id == "base" and stream.log.count == 4
    assert stream.ingest(body(rows[0])) == "duplicate"        # stored at the first place
    assert stream.ingest(body(rows[4])) == "accepted"
    again = Stream(ArtifactStore(url), StreamSettings(**STREAM))
    again.open()
    assert [s.text for s in again.log.read()] == [r["text"] for r in rows[:5]]


@pytest.mark.parametrize("how", ["copied", "moved"])
def test_a_store_copied_or_moved_elsewhere_reads_back_as_it_was_written(written, tmp_path, monkeypatch, capsys, how):
    original, rows = written
    for path in records(original):      # references written now are relative to the store
        for ref in references(json.loads(path.read_text())):
            assert "://" not in ref["uri"] and is_relative(ref["uri"]), (path, ref)
    here = tmp_path / "here" / "artifacts"
    shutil.copytree(original, here)
    before = read_back(here, tmp_path / "cache-1", monkeypatch, capsys)
    assert "stopped: " in before["status"] and "report: STORE/runs/base/report.json" in before["status"]
    assert "current student: run base" in before["stream"]
    there = tmp_path / "volume" / "mounted" / "artifacts"
    there.parent.mkdir(parents=True)
    if how == "moved":
        shutil.move(here, there)       # nothing is left where it was written
    else:
        shutil.copytree(here, there)
        shutil.rmtree(here)            # a backup restored elsewhere: the original is gone
    assert read_back(there, tmp_path / "cache-2", monkeypatch, capsys) == before
    ingest_starts(there, rows)


def test_a_store_written_before_references_were_relative_still_loads_after_a_move(
        written, tmp_path, monkeypatch, capsys):
    original, rows = written
    # where it was written: a path that holds a store folder's name itself ("runs")
    old = tmp_path / "runs" / "backup" / "artifacts"
    shutil.copytree(original, old)
    as_written_before(old)
    before = read_back(old, tmp_path / "cache-1", monkeypatch, capsys)
    there = tmp_path / "elsewhere" / "artifacts"
    there.parent.mkdir()
    shutil.move(old, there)
    assert not old.exists()
    assert read_back(there, tmp_path / "cache-2", monkeypatch, capsys) == before
    ingest_starts(there, rows)
    store = ArtifactStore(f"file://{there}")
    completed = json.loads((there / "runs/base/completed.json").read_text())
    assert completed["report"]["uri"].startswith(f"file://{old}/")          # as the old store wrote it
    assert store.location(ArtifactRef(**completed["report"])) == f"file://{there}/runs/base/report.json"
    # the sha256 is still checked: an old reference to changed bytes is an error, not other bytes
    (there / "runs/base/report.json").write_text("{}\n")
    with pytest.raises(ArtifactError, match="is not the referenced"):
        store.get_bytes(ArtifactRef(**completed["report"]))


def test_a_reference_to_another_store_is_one_line(written, tmp_path, monkeypatch, capsys):
    original, _ = written
    root = tmp_path / "artifacts"
    shutil.copytree(original, root)
    completed = json.loads((root / "runs/base/completed.json").read_text())
    completed["report"]["uri"] = "s3://another-bucket/pgkd/runs/base/report.json"
    (root / "runs/base/completed.json").write_text(json.dumps(completed))
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{root}")
    assert main(["status", "base"]) == 2
    out, err = capsys.readouterr()
    assert "run base:" in out                                     # the cycles first, as before
    [line] = err.strip().splitlines()
    assert "s3://another-bucket/pgkd/runs/base/report.json: not in this artifact store" in line, err
    store = ArtifactStore(f"file://{root}")
    for uri in ("s3://another-bucket/runs/base/report.json", "file:///elsewhere/report.json",
                "http://example.com/runs/base/report.json"):
        with pytest.raises(ArtifactError, match="not in this artifact store") as caught:
            store.get_bytes(ArtifactRef(uri=uri, sha256="0" * 64, size=0))
        assert len(str(caught.value).splitlines()) == 1 and isinstance(caught.value, UserError)


def test_an_object_store_copied_under_another_prefix_resolves_its_references_and_refuses_others():
    """Object storage (fsspec's in-memory file system stands in for s3://): references are keys too."""
    first = ArtifactStore(f"memory://pgkd-{uuid.uuid4().hex}/store")
    ref = first.put_json("runs/r/report.json", {"accuracy": "high"})
    assert ref.uri == "runs/r/report.json"
    second = ArtifactStore(f"memory://pgkd-{uuid.uuid4().hex}/restored")
    first.fs.copy(first.root, second.root, recursive=True)
    assert second.get_json(ref) == {"accuracy": "high"}
    assert second.location(ref) == f"{second.url}/runs/r/report.json"
    assert second.get_json(ArtifactRef(uri=second.uri(ref.uri), sha256=ref.sha256, size=ref.size))
    for uri in (first.uri(ref.uri), f"file:///var/lib/pgkd/{ref.uri}", f"s3://bucket/{ref.uri}"):
        with pytest.raises(ArtifactError, match="not in this artifact store"):
            second.get_bytes(ArtifactRef(uri=uri, sha256=ref.sha256, size=ref.size))


# -- no reference reads outside the store ---------------------------------------------------------------------
SECRET = b"outside the store"


@pytest.fixture(scope="module")
def fenced(tmp_path_factory):
    """A store with an artifact in it, a file beside it, and a link inside it that leads out."""
    folder = tmp_path_factory.mktemp("fenced")
    store = ArtifactStore(f"file://{folder}/runs/store")
    store.put_bytes("runs/r/x.bin", b"inside")
    (folder / "runs" / "secret.bin").write_bytes(SECRET)
    (folder / "outside").mkdir()
    (folder / "outside" / "secret.bin").write_bytes(SECRET)
    os.symlink(folder / "outside", folder / "runs" / "store" / "runs" / "escape")
    return store


COMPONENT = st.one_of(st.sampled_from(["", ".", "..", "...", "runs", "blobs", "datasets", "streams", "r", "x.bin",
                                      "escape", "secret.bin", "store", "~", "%2e%2e", "\\", "a:b", "\x00"]),
                      st.text(max_size=10))
PREFIXES = ["", "/", "./", "file://", "file:///", "file:", "FILE://", "s3://bucket/", "memory://", "STORE/",
            "STORE/../", "STORE/runs/../../"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(prefix="file:///", rest="anywhere/runs/escape/secret.bin")      # an old reference through the link
@example(prefix="file:///", rest="anywhere/runs/../secret.bin")
@example(prefix="", rest="runs/escape/secret.bin")
@example(prefix="STORE/runs/../../", rest="secret.bin")
@example(prefix="STORE/", rest="")
@given(prefix=st.sampled_from(PREFIXES), rest=st.one_of(st.lists(COMPONENT, max_size=8).map("/".join),
                                                      st.text(max_size=60)))
def test_no_text_given_as_a_reference_resolves_outside_the_store(fenced, prefix, rest):
    store = fenced
    text = prefix.replace("STORE", store.url) + rest
    root = Path(os.path.realpath(store.root))
    try:
        key = store.key_of(text)
    except (ArtifactError, UserError):
        key = None
    if key is not None:
        assert is_relative(key), (text, key)
        try:
            path = store._path(key)
        except UserError:
            path = None
        if path is not None:
            real = Path(os.path.realpath(path))
            assert real == root or root in real.parents, (text, key, real)
    read = []
    real_cat = store.fs.cat_file
    with mock.patch.object(store.fs, "cat_file", lambda path, *a, **k: read.append(path) or real_cat(path, *a, **k)):
        try:
            data = store.get_bytes(ArtifactRef(uri=text, sha256=sha256_of(SECRET), size=len(SECRET)))
        except (ArtifactError, UserError):
            data = None
    assert data is None, (text, data)          # never the bytes outside, though the sha256 is theirs
    for path in read:
        real = Path(os.path.realpath(path))
        assert real == root or root in real.parents, (text, path)
