"""The artifact store: atomic writes, references checked by sha256, folders as one artifact."""
import pytest
from pgkd.artifacts import ArtifactError, ArtifactRef, ArtifactStore, StoreUnwritable


def test_bytes_round_trip_by_reference_and_key(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/a")
    ref = store.put_bytes("runs/r/x.bin", b"hello")
    assert ref.uri == "runs/r/x.bin" and ref.size == 5                 # relative to the store: it can move
    assert store.location(ref) == store.uri(ref.uri) == f"file://{tmp_path}/a/runs/r/x.bin"
    assert store.get_bytes(ref) == store.get_bytes("runs/r/x.bin") == b"hello"
    assert store.list("runs/r") == ["runs/r/x.bin"] and store.list("runs/none") == []
    assert not list((tmp_path / "a" / "runs" / "r").glob(".*"))     # no temporary file left


def test_a_changed_or_missing_artifact_is_an_error_not_silently_other_bytes(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}")
    ref = store.put_bytes("x.bin", b"original")
    (tmp_path / "x.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        store.get_bytes(ref)
    with pytest.raises(ArtifactError, match="missing"):
        store.get_bytes(ArtifactRef(uri=store.uri("gone.bin"), sha256="0" * 64, size=0))
    with pytest.raises(ArtifactError, match="not in this artifact store"):
        store.get_bytes(ArtifactRef(uri="file:///elsewhere/x.bin", sha256="0" * 64, size=0))


def test_a_failed_write_leaves_the_previous_artifact_whole(tmp_path, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}")
    store.put_bytes("report.json", b"complete")

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(StoreUnwritable, match="cannot write report.json .disk full"):
        store.put_bytes("report.json", b"half")
    assert (tmp_path / "report.json").read_bytes() == b"complete"


def test_a_folder_is_one_reproducible_artifact(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store")
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 100)
    first = store.put_folder("ckpt.tar", folder)
    (folder / "config.json").touch()                 # a new mtime does not change the artifact
    assert store.put_folder("ckpt.tar", folder).sha256 == first.sha256
    unpacked = store.get_folder(first, tmp_path / "cache")
    assert (unpacked / "sub" / "weights.bin").read_bytes() == b"\x00" * 100
    assert store.get_folder(first, tmp_path / "cache") == unpacked


def test_default_store_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PGKD_ARTIFACTS", f"file://{tmp_path}/env")
    assert ArtifactStore().url == f"file://{tmp_path}/env"


def test_a_folder_reference_to_something_not_a_manifest_is_an_artifact_error(tmp_path):
    """A checkpoint is a manifest of its files; anything else (a tar of an older pgkd, a damaged object) is refused."""
    store = ArtifactStore(f"file://{tmp_path}/store")
    for key, data in (("old.tar", b"ustar\x00 not a manifest"), ("other.json", b'{"format": "something"}')):
        ref = store.put_bytes(key, data)
        with pytest.raises(ArtifactError, match=r"not a folder manifest \((not JSON|'something')\)"):
            store.get_folder(ref, tmp_path / "cache")
