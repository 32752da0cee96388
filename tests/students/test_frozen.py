import stat

import numpy as np
import pytest

from pgkd.files import current_umask

from pgkd.data import load_dataset, make_splits
from pgkd.types import Sample, TrainConfig
from pgkd.errors import UserError
from pgkd.encoder import EmbeddingCache
from pgkd.students.frozen import FrozenEncoderStudent
from pgkd.students import create_student, load_student

from conftest import bag_of_words_embed


class CountingEncoder:
    def __init__(self):
        self.encoded = 0

    def encode(self, texts):
        self.encoded += len(texts)
        return np.pad(bag_of_words_embed(texts), ((0, 0), (0, 128)))   # 384 wide, like MiniLM


def test_learns_the_toy_task_and_encodes_each_text_once(toy_data, tmp_path):
    splits = make_splits(load_dataset(toy_data), 80, seed=0)
    encoder = CountingEncoder()
    student = create_student("minilm-frozen", splits.labels, embed=EmbeddingCache(encoder))
    student.train(splits.train, splits.validation, TrainConfig(seed=0), progress=False)
    texts = [s.text for s in splits.test]
    probs = student.predict_proba(texts)
    accuracy = np.mean([splits.labels[i] == s.label for i, s in zip(probs.argmax(1), splits.test, strict=True)])
    assert accuracy >= 0.9
    student.train(splits.train, splits.validation, TrainConfig(seed=0), progress=False)
    student.predict_proba(texts)
    assert encoder.encoded == len({s.text for s in splits.train + splits.validation + splits.test})
    student.save(tmp_path / "m")
    loaded = load_student(tmp_path / "m")
    assert isinstance(loaded, FrozenEncoderStudent) and loaded.labels == splits.labels
    loaded.embed = student.embed
    np.testing.assert_allclose(loaded.predict_proba(texts), probs, atol=1e-6)


def test_binary_head_matches_the_logistic_model():
    samples = [Sample(text=f"{w} {i}", label=w) for w in ("alpha", "beta") for i in range(10)]
    student = FrozenEncoderStudent(["alpha", "beta", "gamma"], embed=EmbeddingCache(CountingEncoder()))
    student.train(samples, samples[:2] + samples[-2:], TrainConfig(), progress=False)
    probs = student.predict_proba(["alpha 3", "beta 7"])
    assert probs.argmax(1).tolist() == [0, 1] and probs[:, 2].max() < 1e-6


def test_embedding_cache_persists(tmp_path):
    cache = EmbeddingCache(CountingEncoder(), path=tmp_path / "cache.npz")
    first = cache(["a b", "c d"])
    cache.save()
    again = EmbeddingCache(CountingEncoder(), path=tmp_path / "cache.npz")
    np.testing.assert_array_equal(again(["c d", "a b"]), first[::-1])
    assert again.encoder.encoded == 0


def test_unreadable_folder_is_a_user_error(tmp_path):
    (tmp_path / "pgkd_frozen_student.json").write_text("{}")
    with pytest.raises(UserError, match="not a readable frozen-encoder student"):
        load_student(tmp_path)


def _saved(tmp_path):
    student = FrozenEncoderStudent(["alpha", "beta", "gamma"], embed=EmbeddingCache(CountingEncoder()))
    samples = [Sample(text=f"{w} {i}", label=w) for w in ("alpha", "beta", "gamma") for i in range(5)]
    student.train(samples, samples[::5], TrainConfig(), progress=False)
    student.save(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("damage, says", [
    (lambda m: (m / "head.npz").write_bytes((m / "head.npz").read_bytes()[:300]), "not a readable"),   # cut short
    (lambda m: (m / "head.npz").write_bytes(b"not a zip"), "not a readable"),
    (lambda m: (m / "pgkd_frozen_student.json").write_text('{"labels": ["alpha", "beta"]}'),
     "head.npz holds 3 classes' weights for the 2 labels"),
    (lambda m: (m / "pgkd_frozen_student.json").write_text('{"labels": ["alpha", "alpha", "beta"]}'),
     "not a list of distinct names"),
    (lambda m: (m / "pgkd_frozen_student.json").write_text('{"labels": "alpha"}'), "not a list of distinct names"),
])
def test_a_damaged_saved_student_is_one_user_error_naming_it(tmp_path, damage, says):
    """A head cut short or a label map that does not fit it: refused at load, never a traceback in predict
    nor an exported model whose labels.txt and outputs differ."""
    folder = _saved(tmp_path)
    (folder / "pgkd-calibration.json").unlink(missing_ok=True)      # the head and the label map alone
    damage(folder)
    with pytest.raises(UserError, match="not a readable frozen-encoder student") as e:
        load_student(folder)
    assert says in str(e.value) and str(folder) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_student_folder_says_so(tmp_path):
    with pytest.raises(UserError, match="nope: no such folder"):
        load_student(tmp_path / "nope")


def test_embedding_cache_writes_only_when_something_new_was_encoded(tmp_path):
    path = tmp_path / "cache.npz"
    cache = EmbeddingCache(CountingEncoder(), path=path)
    cache.save()
    assert not path.exists()                       # nothing encoded, nothing written
    cache(["a b"])
    cache.save()
    stamp = path.stat().st_mtime_ns
    cache(["a b"])                                 # known text: no new vector
    cache.save()
    assert path.stat().st_mtime_ns == stamp


def test_predict_on_a_saved_frozen_student_prints_its_json_lines_and_nothing_else(toy_data, tmp_path, capfd):
    """Loading the real MiniLM encoder shows no "Loading weights" bar of transformers' on stderr (a saved student
    loads in seconds)."""
    import json
    from pgkd.cli import main
    splits = make_splits(load_dataset(toy_data), 80, seed=0)
    student = create_student("minilm-frozen", splits.labels, embed=EmbeddingCache(CountingEncoder()))
    student.train(splits.train, splits.validation, TrainConfig(seed=0), progress=False)
    student.save(tmp_path / "m")
    capfd.readouterr()
    assert main(["predict", "--model", str(tmp_path / "m"), "a text"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and [json.loads(line)["text"] for line in out.splitlines()] == ["a text"]


@pytest.mark.parametrize("kind", ["tiny", "minilm-frozen"])
def test_save_writes_a_new_or_empty_folder_and_never_over_or_through_what_it_did_not_write(kind, tmp_path,
                                                                                           monkeypatch):
    """`student.save(path)` (the Python API's, as docs/python-api.md shows it): a folder of someone else's
    files, a link, a file are one UserError each, with nothing changed; a new or empty folder holds the
    whole student, and no staging folder is left beside it."""
    student = create_student(kind, ["a", "b"], embed=EmbeddingCache(CountingEncoder()))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"mine": true}')
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "file").write_text("a file")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")               # an empty working folder: '.' would have been taken
    for path, says in ((foreign, "not empty"), (tmp_path / "link", "is a link"), (".", "not '.'"), ("./", "not '.'"),
                       ("nothing/..", "not '.' or '..'"), (tmp_path / "file", "not a folder"),
                       (tmp_path / "file" / "under", "cannot write there")):
        with pytest.raises(UserError, match=says):
            student.save(path)
    assert (foreign / "config.json").read_text() == '{"mine": true}' and list(foreign.iterdir()) == [foreign / "config.json"]
    assert list(victim.iterdir()) == [] and (tmp_path / "file").read_text() == "a file"
    with pytest.raises(TypeError, match="save: expected a folder's path"):
        student.save(5)
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "new" / "student", tmp_path / "empty"):
        student.save(path)
        assert load_student(path).labels == ["a", "b"]
        # as mkdir and open() make them, not mkdtemp's 0700 nor safetensors' 0600: another user's server reads it
        umask = current_umask()
        assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in (path, *path.iterdir())} == \
            {oct(0o777 & ~umask), oct(0o666 & ~umask)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "empty", "file", "link", "mine", "new", "victim"]
    assert list((tmp_path / "cwd").iterdir()) == []      # and no 'nothing/' made on the way
