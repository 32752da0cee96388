import random

import pytest
from conftest import write_jsonl
from pgkd.data import count_duplicates, load_dataset, make_splits, normalize_text, read_samples, stratified_split
from pgkd.types import Sample
from pgkd.errors import UserError


def test_reads_jsonl_and_csv_with_configurable_columns(tmp_path):
    j = write_jsonl(tmp_path / "a.jsonl", [{"t": "hello  there", "y": "greet"}, {"t": "bye", "y": "leave"}])
    c = tmp_path / "a.csv"
    c.write_text('t,y\n"hello, there",greet\nbye,leave\n', encoding="utf-8")
    assert read_samples(j, "t", "y") == [Sample(text="hello there", label="greet"), Sample(text="bye", label="leave")]
    assert read_samples(c, "t", "y")[0] == Sample(text="hello, there", label="greet")


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """Excel's "CSV UTF-8" and some editors' JSON Lines start with U+FEFF; it must not rename the
    first column ('\ufefftext') or break the first line's JSON."""
    c = tmp_path / "excel.csv"
    c.write_bytes("text,label\ncafé latte,order\nrefund me,refund\n".encode("utf-8-sig"))
    j = tmp_path / "bom.jsonl"
    j.write_bytes('{"text": "café latte", "label": "order"}\n'.encode("utf-8-sig"))
    assert read_samples(c) == [Sample(text="café latte", label="order"), Sample(text="refund me", label="refund")]
    assert read_samples(j) == [Sample(text="café latte", label="order")]


@pytest.mark.parametrize("line, message", [
    ('{"text": "  ", "label": "a"}', "empty text"),
    ('{"text": "hi"}', "missing label"),
    ('{"text": "hi", "label": ""}', "missing label"),
    ('{"text": "hi", "label": {"x": 0}}', r"the label is not a string or a number \(dict \{'x': 0\}\)"),
    ('{"text": "hi", "label": ["a"]}', r"the label is not a string or a number \(list"),
    ('{"text": "hi", "label": true}', r"the label is not a string or a number \(bool True\)"),
    ('{"text": "hi", "label": "a"', "unreadable row"),
    ('["hi", "a"]', "unreadable row"),
    ('{"text": "broken', r"unreadable row \(not JSON: Invalid control character at column 17\)"),
    ('{"text": "a", "label": ', r"unreadable row \(not JSON: Expecting value at column 24\)"),   # cut: its end
])
def test_bad_jsonl_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:2: {message}"):
        read_samples(path)


def test_bad_csv_names_file_line_and_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nok,a\n,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:3: empty text"):
        read_samples(path)
    path.write_text("sentence,label\nok,a\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing column"):
        read_samples(path)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="/dev/null: not a regular file"):
        load_dataset("/dev/null")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no train file"):
        load_dataset(tmp_path / "d")
    write_jsonl(tmp_path / "d" / "train.jsonl", [])
    write_jsonl(tmp_path / "d" / "test.jsonl", [{"text": "x", "label": "a"}])
    with pytest.raises(UserError, match="train split is empty"):
        load_dataset(tmp_path / "d")
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": "x", "label": "a"}])
    write_jsonl(tmp_path / "d" / "test.jsonl", [{"text": "y", "label": "b"}, {"text": "z", "label": "c"}])
    with pytest.raises(UserError, match="2 label\\(s\\) in test that train never had: b, c"):
        load_dataset(tmp_path / "d")


def test_single_file_holds_out_a_stratified_test(tmp_path):
    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(100)]
    ds = load_dataset(write_jsonl(tmp_path / "all.jsonl", rows), seed=3)
    assert len(ds.test) == 20 and len(ds.train) == 80
    assert sum(s.label == "a" for s in ds.test) == 10
    assert "test is a stratified 20%" in ds.notes[0]


def test_duplicates_are_counted_not_fatal():
    a = [Sample(text="Hello  World", label="x"), Sample(text="hello world", label="y"), Sample(text="z", label="x")]
    b = [Sample(text="Z", label="x")]
    assert count_duplicates({"train": a, "test": b}) == {"within_train": 1, "within_test": 0, "train_and_test": 1}
    assert normalize_text(" A\tb ") == "a b"


def test_paper_setting_on_banking77(banking77):
    ds = load_dataset(banking77)
    splits = make_splits(ds, 1000, seed=1)
    assert (len(splits.train), len(splits.validation)) == (800, 200)
    assert len(splits.pool) == len(ds.train) - 1000 and splits.test == ds.test
    assert len(splits.labels) == 77 and {s.label for s in splits.train} == set(splits.labels)
    def ids(rows):  # the splits share Sample objects with the dataset: disjoint by identity
        return {id(s) for s in rows}
    assert not ids(splits.train) & ids(splits.validation)
    assert not ids(splits.pool) & ids(splits.train + splits.validation)
    again = make_splits(ds, 1000, seed=1)
    assert again.train == splits.train and again.validation == splits.validation
    assert make_splits(ds, 1000, seed=2).train != splits.train


def test_labeled_budget_checks(toy_data):
    ds = load_dataset(toy_data)
    with pytest.raises(UserError, match="smaller than the number of classes \\(4\\)"):
        make_splits(ds, 3, seed=1)
    with pytest.raises(UserError, match="larger than the train split"):
        make_splits(ds, 10_000, seed=1)


def test_stratified_split_keeps_every_class_in_the_rest():
    rows = [Sample(text=f"{i}", label=str(i % 5)) for i in range(12)]
    rest, part = stratified_split(rows, 0.5, random.Random(0))
    assert len(part) == 6 and {s.label for s in rest} == {str(i) for i in range(5)}


def test_a_split_file_that_is_not_a_file_is_said_as_such_not_as_missing(tmp_path):
    """train.jsonl a link to /dev/null, a folder, or a broken link: the file is named and what is wrong with it."""
    write_jsonl(tmp_path / "test.jsonl", [{"text": "a b", "label": "x"}])
    train = tmp_path / "train.jsonl"
    train.symlink_to("/dev/null")
    with pytest.raises(UserError, match=r"train.jsonl: not a regular file"):
        load_dataset(tmp_path)
    train.unlink()
    train.mkdir()
    with pytest.raises(UserError, match=r"train.jsonl: not a regular file"):
        load_dataset(tmp_path)
    train.rmdir()
    train.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(UserError, match=r"train.jsonl: no such file"):
        load_dataset(tmp_path)
