"""Labeled text data: reading files, and the paper's few-label setting.

A dataset is a file (JSON Lines or CSV with a text and a label column) or a folder holding
`train`, optional `validation` and `test` files in either format (the layout of ../shared/data).
`make_splits` draws the paper's setting from it: N labeled samples from train (80% train, 20%
validation, stratified), the rest of train as the pool the student never sees, test as test.
"""
from __future__ import annotations

import csv
import os
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from pgkd.allocation import allocate
from pgkd.errors import Option, UserError
from pgkd.taxonomy import Taxonomy, read_taxonomy
from pgkd.types import Sample

SPLIT_NAMES = ("train", "validation", "test")
FORMATS = (".jsonl", ".json", ".csv")


def normalize_text(text: str) -> str:
    """The key under which two texts count as duplicates: case and whitespace ignored."""
    return " ".join(text.split()).casefold()


def _shown(value) -> str:
    """A value of the wrong type as a message shows it: its type and the start of its repr."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    return f"{type(value).__name__} {shown}"


def _check_row(text, label, where: str) -> Sample:
    if label is None or (isinstance(label, str) and not label.strip()):
        raise UserError(f"{where}: missing label")
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):   # a JSON object, list, true: no name
        raise UserError(f"{where}: the label is not a string or a number ({_shown(label)})")
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: the text is not a string ({_shown(text)})")
    if text is None or not text.strip():
        raise UserError(f"{where}: empty text")
    if len(str(label).strip().splitlines()) > 1:   # a label is one line: prompts and reports list them so
        raise UserError(f"{where}: the label {str(label)!r} has a line break")
    for name, value in (("text", text), ("label", label)):
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError as e:      # a lone surrogate: from Python, or a JSON escape such as "\udce9"
            raise UserError(f"{where}: the {name} is not UTF-8 text (a lone surrogate at character "
                            f"{e.start + 1})") from None
    return Sample(text=" ".join(text.split()), label=str(label).strip())


def read_samples(path: Path, text_column: str = "text", label_column: str = "label") -> list[Sample]:
    """Read one JSON Lines or CSV file; errors name the file and line."""
    if not path.is_file():
        raise UserError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    samples: list[Sample] = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:   # -sig: a byte-order mark (Excel) is not text
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                missing = {text_column, label_column} - set(reader.fieldnames or [])
                if missing:
                    raise UserError(f"{path}:1: missing column(s) {', '.join(sorted(missing))} "
                                    f"(columns: {', '.join(reader.fieldnames or [])})")
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in row:
                        raise UserError(f"{where}: unreadable row (more fields than the header)")
                    samples.append(_check_row(row.get(text_column), row.get(label_column), where))
            else:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{path}:{line_number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:   # where in this line (a row cut short: its end)
                        column = min(e.pos, len(line.rstrip("\r\n"))) + 1
                        raise UserError(f"{where}: unreadable row (not JSON: {e.msg.removesuffix(' at')} at column "
                                        f"{column})") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{where}: unreadable row (expected a JSON object)")
                    if text_column not in row:   # not "empty text": the column is named wrong, or missing
                        raise UserError(f"{where}: no {text_column!r} field (fields: {', '.join(map(str, row)) or 'none'})")
                    samples.append(_check_row(row.get(text_column), row.get(label_column), where))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: unreadable CSV ({e})") from None
    return samples


def _find_split_file(folder: Path, split: str) -> Path | None:
    # Any entry of the name (a link to /dev/null, a folder, a broken link): read_samples says what is wrong with it
    found = [folder / f"{split}{ext}" for ext in FORMATS if os.path.lexists(folder / f"{split}{ext}")]
    if len(found) > 1:
        raise UserError(f"{folder}: more than one {split} file ({', '.join(p.name for p in found)})")
    return found[0] if found else None


@dataclass
class Dataset:
    """The splits as read from disk. `validation` may be empty; `test` is always there."""
    name: str
    path: str
    train: list[Sample]
    validation: list[Sample]
    test: list[Sample]
    notes: list[str] = field(default_factory=list)
    taxonomy: Taxonomy | None = None     # the classes described (--taxonomy); may name classes train lacks

    @property
    def labels(self) -> list[str]:
        """The classes: every label of train and of the taxonomy file, sorted."""
        return sorted({s.label for s in self.train} | set(self.taxonomy.labels if self.taxonomy else ()))


def with_taxonomy(dataset: Dataset, path: str | None) -> Dataset:
    """The dataset with its taxonomy file (pgkd.taxonomy) read and checked against its labels: a label
    of the data the file lacks is an error; a class of the file the data lacks is a note (the teacher
    may write samples for it, and the student has a class for them)."""
    if path is None:
        return dataset
    taxonomy = read_taxonomy(path)
    data_labels = sorted({s.label for s in dataset.train + dataset.test})
    absent = taxonomy.check_against(data_labels, dataset.path)
    notes = list(dataset.notes)
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        notes.append(f"{len(absent)} class(es) of {Path(path).name} have no sample in the data: {shown} (the "
                     "teacher may write samples for them)")
    return replace(dataset, taxonomy=taxonomy, notes=notes)


def load_dataset(path: str | Path, text_column: str = "text", label_column: str = "label",
                 test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Read a dataset folder (train/validation/test files) or a single file.

    A single file holds all labeled data: a stratified `test_fraction` of it is held out as test.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    notes: list[str] = []
    if path.is_dir():
        files = {split: _find_split_file(path, split) for split in SPLIT_NAMES}
        if files["train"] is None:
            raise UserError(f"{path}: no train file (expected train.jsonl or train.csv)")
        if files["test"] is None:
            raise UserError(f"{path}: no test file (expected test.jsonl or test.csv)")
        split_rows = {split: read_samples(f, text_column, label_column) if f else []
                      for split, f in files.items()}
        if split_rows["validation"]:
            notes.append(f"{files['validation'].name} is not used: the labeled validation set is drawn "
                         "from train, as in the paper's setting")
        train, validation, test = split_rows["train"], split_rows["validation"], split_rows["test"]
        name = path.name
    else:
        rows = read_samples(path, text_column, label_column)
        train, test = stratified_split(rows, test_fraction, random.Random(seed))
        validation = []
        notes.append(f"test is a stratified {test_fraction:.0%} of {path.name} (seed {seed})")
        name = path.stem
    return _checked_dataset(name, str(path), train, validation, test, notes)


def dataset_from_samples(rows: list, text_column: str = "text", label_column: str = "label",
                         test_fraction: float = 0.2, seed: int = 0, name: str = "samples") -> Dataset:
    """A dataset from labeled samples in memory (Samples or dicts), as from one file: a stratified
    `test_fraction` is held out as test."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise UserError("data: expected a dataset folder, a file, or a list of labeled samples")
    samples = []
    for i, row in enumerate(rows):
        if isinstance(row, Sample):
            row = row.model_dump()
        if not isinstance(row, dict):
            raise UserError(f"data[{i}]: expected a Sample or a dict with {text_column!r} and {label_column!r}")
        samples.append(_check_row(row.get(text_column), row.get(label_column), f"data[{i}]"))
    train, test = stratified_split(samples, test_fraction, random.Random(seed))
    return _checked_dataset(name, "python:samples", train, [], test,
                            [f"test is a stratified {test_fraction:.0%} of the {len(samples)} samples (seed {seed})"])


def _checked_dataset(name: str, path: str, train: list[Sample], validation: list[Sample], test: list[Sample],
                     notes: list[str]) -> Dataset:
    if not train:
        raise UserError(f"{path}: the train split is empty")
    if not test:
        raise UserError(f"{path}: the test split is empty")
    unknown = sorted({s.label for s in test} - {s.label for s in train})
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"{path}: {len(unknown)} label(s) in test that train never had: {shown}")
    return Dataset(name=name, path=path, train=train, validation=validation, test=test, notes=notes)


def count_duplicates(splits: dict[str, list[Sample]]) -> dict[str, int]:
    """Repeated texts (normalised) within each split and across pairs of splits; reported, not fatal."""
    keys = {name: [normalize_text(s.text) for s in rows] for name, rows in splits.items()}
    out = {f"within_{name}": len(k) - len(set(k)) for name, k in keys.items()}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a}_and_{b}"] = len(set(keys[a]) & set(keys[b]))
    return out


def _by_label(rows: list[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in rows:
        groups[s.label].append(s)
    return dict(sorted(groups.items()))


def _take_per_label(groups: dict[str, list[Sample]], counts: dict[str, int],
                    rng: random.Random) -> tuple[list[Sample], list[Sample]]:
    """(taken, left): a seeded random `counts[label]` rows of each label, and the others."""
    taken, left = [], []
    for label, group in groups.items():
        group = group[:]
        rng.shuffle(group)
        taken.extend(group[:counts[label]])
        left.extend(group[counts[label]:])
    return taken, left


def stratified_split(rows: list[Sample], fraction: float,
                     rng: random.Random) -> tuple[list[Sample], list[Sample]]:
    """Split rows into (rest, part) where part holds `fraction` of them, stratified by label;
    each label keeps at least one row in `rest`."""
    groups = _by_label(rows)
    total = round(len(rows) * fraction)
    capacity = {label: len(g) - 1 for label, g in groups.items()}
    counts = allocate({label: len(g) for label, g in groups.items()}, total, capacity=capacity)
    part, rest = _take_per_label(groups, counts, rng)
    rng.shuffle(rest)
    rng.shuffle(part)
    return rest, part


@dataclass
class Splits:
    """The paper's setting: what the student trains and is validated on, the unseen pool, test."""
    labels: list[str]
    train: list[Sample]
    validation: list[Sample]
    pool: list[Sample]
    test: list[Sample]
    taxonomy: Taxonomy | None = None     # the classes' descriptions, shown to an LLM teacher

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "pool": len(self.pool), "test": len(self.test)}


def make_splits(dataset: Dataset, labeled: int, seed: int, validation_fraction: float = 0.2) -> Splits:
    """Draw `labeled` samples from train (stratified; every class at least twice so that both
    train and validation can hold it), split them into train and validation; the rest is the pool."""
    labels = sorted({s.label for s in dataset.train})     # the classes a sample can be drawn of
    if len(labels) < 2:
        raise UserError(f"{dataset.path}: every train sample is labeled {labels[0]!r}: a classifier needs samples "
                        "of at least two classes")
    if labeled < len(labels):
        raise UserError(Option("labeled", labeled), f" is smaller than the number of classes ({len(labels)}) "
                        f"in {dataset.path}")
    if labeled > len(dataset.train):
        raise UserError(Option("labeled", labeled), f" is larger than the train split ({len(dataset.train)} rows) "
                        f"of {dataset.path}")
    rng = random.Random(seed)
    groups = _by_label(dataset.train)
    minimum = 2 if labeled >= 2 * len(labels) else 1
    counts = allocate({label: len(g) for label, g in groups.items()}, labeled, minimum=minimum,
                      capacity={label: len(g) for label, g in groups.items()})
    chosen, pool = _take_per_label(groups, counts, rng)
    train, validation = stratified_split(chosen, validation_fraction, rng)
    if not validation:   # early stopping and the choice of the best cycle have nothing to go on
        raise UserError(f"{dataset.path}: {labeled} labeled samples leave none to validate on: each of the "
                        f"{len(labels)} classes takes one to train on, and validation takes the second of a class "
                        f"({len(labels) + 1} labeled samples or more, with a class that has 2 train rows)")
    rng.shuffle(pool)
    return Splits(labels=dataset.labels, train=train, validation=validation, pool=pool, test=list(dataset.test),
                  taxonomy=dataset.taxonomy)


def label_counts(rows: list[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(s.label for s in rows).items()))
