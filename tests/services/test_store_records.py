"""Records in the artifact store that are damaged, and a store that cannot be written (issue 26): one
line naming the file or the store, never a traceback, and never a damaged record read as missing
command-line options."""
import os
import subprocess
import sys

import pytest
from conftest import make_toy_dataset

from pgkd.artifacts import ArtifactError, ArtifactRef, ArtifactStore, StoreUnwritable
from pgkd.distributed.messages import RunRequested
from pgkd.errors import UserError
from pgkd.loop.config import DistillConfig
from pgkd.stream import Stream, StreamSettings

NOT_JSON = b'{"name": "default", "base_run'          # a write cut short


def pgkd_command(*args, artifacts: str, timeout=60):
    env = {**os.environ, "PGKD_ARTIFACTS": artifacts, "PGKD_BROKER_URL": "kafka://127.0.0.1:9",
           "PGKD_CONNECT_TIMEOUT": "2"}
    return subprocess.run([sys.executable, "-m", "pgkd.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(f"file://{tmp_path / 'store'}")


def a_request(store, run_id="run1") -> RunRequested:
    request = RunRequested(run_id=run_id, cycle=0, config=DistillConfig(data="toy").model_dump(mode="json"),
                           dataset=ArtifactRef(uri=store.uri("datasets/x.json"), sha256="0" * 64, size=0))
    store.put_json(f"runs/{run_id}/request.json", request.model_dump(mode="json"))
    return request


@pytest.mark.parametrize("data, problem", [(NOT_JSON, "not JSON"), (b'{"runs": 3}', "not a StreamState")])
def test_a_damaged_stream_state_is_one_line_naming_the_file(store, data, problem):
    store.put_bytes("streams/default/state.json", data)
    done = pgkd_command("stream", "status", artifacts=store.url)
    line = one_line(done)
    assert done.returncode == 2 and "streams/default/state.json" in line and problem in line, line
    assert "--name" not in line and "--base-run" not in line


def test_a_damaged_run_request_or_completion_is_one_line_naming_the_file(store):
    store.put_bytes("runs/run1/request.json", NOT_JSON)
    line = one_line(done := pgkd_command("status", "run1", artifacts=store.url))
    assert done.returncode == 2 and "runs/run1/request.json" in line and "not JSON" in line, line
    a_request(store)
    store.put_bytes("runs/run1/completed.json", b"[1, 2]")
    line = one_line(done := pgkd_command("status", "run1", artifacts=store.url))
    assert done.returncode == 2 and "runs/run1/completed.json" in line and "not a RunCompleted" in line, line


def test_ingest_refuses_to_start_on_a_damaged_state_naming_it(store):
    store.put_bytes("streams/default/state.json", NOT_JSON)
    stream = Stream(store, StreamSettings(base_run="run1"))
    with pytest.raises(UserError, match="streams/default/state.json.*not JSON"):
        stream.open()


def test_get_model_names_the_record_and_what_it_should_be(store):
    store.put_json("runs/run1/request.json", {"config": {}})
    with pytest.raises(ArtifactError, match=r"runs/run1/request.json: damaged \(not a RunRequested"):
        store.get_model("runs/run1/request.json", RunRequested)


@pytest.fixture
def unwritable(tmp_path):
    """A store under a plain file: no one can write there, root included (chmod does not stop root)."""
    (tmp_path / "afile").write_text("not a folder\n")
    return f"file://{tmp_path / 'afile' / 'store'}"


def test_writing_to_a_store_that_cannot_be_written_names_the_store(unwritable):
    with pytest.raises(ArtifactError, match="afile/store.*cannot write"):
        ArtifactStore(unwritable).put_json("runs/run1/request.json", {})


def test_submit_to_a_store_that_cannot_be_written_is_one_line_exit_1(tmp_path, unwritable):
    data = make_toy_dataset(tmp_path / "toy")
    done = pgkd_command("submit", "--data", str(data), "--student", "tiny", "--labeled", "40", artifacts=unwritable)
    line = one_line(done)
    assert done.returncode == 1 and "afile/store" in line and "cannot write" in line, line


def test_a_store_that_refuses_writes_names_the_store(store, monkeypatch):
    """A read-only mount or a full disk: the write fails where the bytes go in."""
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("pgkd.files.open", refused, raising=False)
    with pytest.raises(StoreUnwritable, match=f"{store.url}: cannot write runs/run1/request.json "
                                              r"\(Permission denied\)"):
        store.put_json("runs/run1/request.json", {})
