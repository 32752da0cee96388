"""Checkpoints in the artifact store: a manifest of content-addressed files, unpacked once per machine.

Any process anywhere loads a checkpoint from the store alone; the process that wrote it, and any
other on its machine, never reads it back; a changed byte in the store is an error, not another
student; and a round that leaves the word embeddings frozen stores only what it changed."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_toy_dataset
from pgkd.distributed.steps import run_through_steps
from pgkd.cli import main
from pgkd.types import Sample, TrainConfig
from pgkd.distributed import steps
from pgkd.artifacts import ArtifactError, ArtifactStore
from pgkd.loop.config import DistillConfig
from pgkd.loop.embedded import run
from pgkd.loop.report import without_times
from pgkd.students import load_student
from pgkd.students.finetuned import FineTunedStudent

LABELS = ["card", "refund", "transfer"]
TEXTS = ["I lost my card yesterday", "where is my refund", "send money to my brother", "card stuck in the ATM"]


def stored_bytes(store: ArtifactStore) -> int:
    return sum(p.stat().st_size for p in Path(store.root).rglob("*") if p.is_file())


@pytest.fixture
def writer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PGKD_CACHE", str(tmp_path / "writer-cache"))
    return tmp_path / "writer-cache"


def test_a_checkpoint_loads_elsewhere_from_the_store_alone_and_predicts_what_the_original_does(
        tmp_path, writer_cache, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}/store")
    student = FineTunedStudent.create("tiny", LABELS, seed=3)
    ref = steps.store_checkpoint(store, "runs/r/checkpoints/cycle-0000.json", student)
    assert ref.uri.endswith("cycle-0000.json") and not list((tmp_path / "store").rglob("*.tar"))
    # The same student stored again is the same artifact, byte for byte.
    assert steps.store_checkpoint(store, "runs/r/checkpoints/again.json", student).sha256 == ref.sha256
    monkeypatch.setenv("PGKD_CACHE", str(tmp_path / "other-machine"))       # nothing of the writer's cache
    loaded = steps.load_checkpoint(store, ref, "cpu")
    assert loaded.labels == LABELS and loaded.spec == "tiny"
    np.testing.assert_array_equal(loaded.predict_proba(TEXTS), student.predict_proba(TEXTS))
    # The unpacked checkpoint is a Hugging Face folder: `load_student` (and any HF tool) reads it.
    folder = store.get_folder(ref, tmp_path / "export")
    np.testing.assert_array_equal(load_student(folder).predict_proba(TEXTS), student.predict_proba(TEXTS))


def test_the_writer_and_a_second_read_never_read_the_store(tmp_path, writer_cache, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}/store")
    student = FineTunedStudent.create("tiny", LABELS, seed=3)
    ref = steps.store_checkpoint(store, "ckpt.json", student)
    reads = []
    real = store.fs.cat_file
    monkeypatch.setattr(store.fs, "cat_file", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    steps.load_checkpoint(store, ref, "cpu")          # the writer's machine: unpacked when it was written
    assert reads == []
    monkeypatch.setenv("PGKD_CACHE", str(tmp_path / "reader-cache"))
    steps.load_checkpoint(store, ref, "cpu")          # another machine: the manifest and each file once
    assert len(reads) == 1 + len(store.get_json(ref)["files"])
    reads.clear()
    steps.load_checkpoint(store, ref, "cpu")          # a second read: from the cache
    assert reads == []


def test_a_changed_byte_in_the_store_is_an_error_not_another_student(tmp_path, writer_cache, monkeypatch):
    store = ArtifactStore(f"file://{tmp_path}/store")
    ref = steps.store_checkpoint(store, "ckpt.json", FineTunedStudent.create("tiny", LABELS, seed=3))
    monkeypatch.setenv("PGKD_CACHE", str(tmp_path / "reader-cache"))
    manifest = store.get_json(ref)
    weights = manifest["files"]["model-00002-of-00002.safetensors"]["sha256"]
    blob = tmp_path / "store" / "blobs" / "sha256" / weights
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        steps.load_checkpoint(store, ref, "cpu")
    assert [p.name for p in (tmp_path / "reader-cache").iterdir()] == ["blobs"]   # no folder, whole or half
    (tmp_path / "store" / "ckpt.json").write_text((tmp_path / "store" / "ckpt.json").read_text().replace(
        weights, "0" * 64))                           # a manifest pointing elsewhere: its own sha256 changed
    with pytest.raises(ArtifactError, match="sha256"):
        steps.load_checkpoint(store, ref, "cpu")


def test_a_round_with_frozen_word_embeddings_stores_only_the_weights_it_changed(tmp_path, writer_cache):
    store = ArtifactStore(f"file://{tmp_path}/store")
    student = FineTunedStudent.create("minilm", LABELS, seed=1)
    samples = [Sample(text=t, label=label) for t, label in zip(TEXTS, ["card", "refund", "transfer", "card"])]
    steps.store_checkpoint(store, "cycle-0.json", student)
    full = stored_bytes(store)
    assert full > 85e6                                # MiniLM whole: 90 MB
    student.train(samples, samples, TrainConfig(epochs=1, batch_size=4, seed=1), progress=False)
    ref = steps.store_checkpoint(store, "cycle-1.json", student)
    added = stored_bytes(store) - full
    assert added < 0.5 * full                         # the encoder's layers and the head, not the embeddings
    shards = store.get_json(ref)["files"]
    assert shards["model-00002-of-00002.safetensors"]["size"] < added
    np.testing.assert_array_equal(steps.load_checkpoint(store, ref, "cpu").predict_proba(TEXTS),
                                  student.predict_proba(TEXTS))


def test_the_steps_in_one_process_compute_the_embedded_run_and_never_read_a_checkpoint_back(
        tmp_path, writer_cache, monkeypatch):
    config = DistillConfig(data=str(make_toy_dataset(tmp_path / "toy")), labeled=40, student="tiny",
                           teacher="pool-random", samples_per_cycle=16, max_cycles=2, patience=5, epochs=4,
                           cycle_epochs=2, learning_rate=1e-2, head_learning_rate=1e-2, batch_size=16, seed=1)
    store = ArtifactStore(f"file://{tmp_path}/store")
    read = []
    real = store.get_bytes
    monkeypatch.setattr(store, "get_bytes", lambda ref: read.append(getattr(ref, "uri", ref)) or real(ref))
    completed = run_through_steps(steps.submit(config, store, run_id="steps"), store)
    assert completed.status == "completed" and completed.best_checkpoint is not None
    assert not [uri for uri in read if "blobs/" in uri or "/checkpoints/" in uri]
    embedded = run(config, None, progress=False).report.model_dump(mode="json")
    assert without_times(store.get_json(completed.report)) == without_times(embedded)


def test_pgkd_export_writes_a_stored_student_as_a_model_folder_or_a_served_version(tmp_path, writer_cache, capsys):
    store = ArtifactStore(f"file://{tmp_path}/store")
    student = FineTunedStudent.create("tiny", LABELS, seed=3)
    ref = steps.store_checkpoint(store, "runs/r/checkpoints/cycle-0002.json", student)
    out = tmp_path / "best"
    assert main(["export", ref.uri, "--out", str(out), "--artifacts", store.url, "--format", "hf"]) == 0
    assert (out / "config.json").is_file() and not (out / ".complete").exists()
    np.testing.assert_array_equal(load_student(out).predict_proba(TEXTS), student.predict_proba(TEXTS))
    assert main(["export", ref.uri, "--out", str(out), "--artifacts", store.url, "--format", "hf"]) == 2  # not empty
    assert main(["export", store.uri("runs/r/none.json"), "--out", str(tmp_path / "x"),
                 "--artifacts", store.url]) == 2
    assert "missing" in capsys.readouterr().err
    # the default: the next version of a Triton model repository, which says where it came from
    assert main(["export", ref.uri, "--out", str(tmp_path / "models"), "--artifacts", store.url]) == 0
    assert main(["export", ref.uri, "--out", str(tmp_path / "models"), "--artifacts", store.url]) == 0
    manifest = json.loads((tmp_path / "models" / "student" / "2" / "pgkd-version.json").read_text())
    assert manifest["source"] == {"checkpoint": ref.uri, "sha256": ref.sha256} and manifest["labels"] == LABELS
