"""A taxonomy file: the classes, each with a description an LLM can read, and optionally example texts.

An LLM cannot write good samples for `INFO_AMT_DUE` without being told what it means. The file says so,
in one of three forms:

- CSV with columns `label,description` and an optional `examples` column (texts separated by ` | `);
- JSON: a list of objects `{"label": ..., "description": ..., "examples": [...]}` (or `{"classes": [...]}`);
- YAML (.yaml, .yml): the same list.

Every error names the file and the row, before any work. `check_against` compares the file with the
data's labels: a label of the data missing from the file is an error (the teacher would not know it);
a class of the file missing from the data is allowed (the teacher may write samples for it).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from pydantic import BaseModel

from pgkd.errors import UserError

EXAMPLE_SEPARATOR = " | "
MAX_EXAMPLES = 5          # example texts per class, at most (more is one line: the prompt shows few anyway)


class ClassInfo(BaseModel, frozen=True):
    label: str
    description: str
    examples: tuple[str, ...] = ()


class Taxonomy(BaseModel, frozen=True):
    """The classes of a taxonomy file, in the file's order."""
    path: str
    sha256: str
    classes: tuple[ClassInfo, ...]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.classes]

    @property
    def descriptions(self) -> dict[str, str]:
        return {c.label: c.description for c in self.classes}

    def check_against(self, data_labels: list[str], data_path: str = "the data") -> list[str]:
        """The classes of the file the data has no sample of (allowed); raises if the data has a label
        the file does not describe."""
        known = set(self.labels)
        missing = [label for label in data_labels if label not in known]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UserError(f"{self.path}: no row for label(s) {shown} of {data_path} (the teacher must be told "
                            "every class)")
        present = set(data_labels)
        return [label for label in self.labels if label not in present]

    def record(self, data_labels: list[str]) -> dict:
        """What report.json keeps of it."""
        present = set(data_labels)
        return {"file": self.path, "sha256": self.sha256, "classes": len(self.classes),
                "not_in_data": [c.label for c in self.classes if c.label not in present],
                "descriptions": self.descriptions}


def _row(value, where: str, label_seen: set[str]) -> ClassInfo:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected an object with label and description, not {type(value).__name__}")
    label, description, examples = value.get("label"), value.get("description"), value.get("examples", [])
    if label is not None and not isinstance(label, str):
        raise UserError(f"{where}: the label is not text ({type(label).__name__} {label!r}; quote it)")
    if not label or not label.strip():
        raise UserError(f"{where}: missing label")
    if len(label.splitlines()) > 1:
        raise UserError(f"{where}: label {label!r} has a line break")
    if label != label.strip():
        raise UserError(f"{where}: label {label!r} has leading or trailing spaces")
    if label in label_seen:
        raise UserError(f"{where}: duplicate label {label!r}")
    if description is not None and not isinstance(description, str):
        raise UserError(f"{where}: the description of {label!r} is not text ({type(description).__name__}; quote it)")
    if not description or not description.strip():
        raise UserError(f"{where}: label {label!r} has an empty description")
    if isinstance(examples, str):
        examples = examples.split(EXAMPLE_SEPARATOR)
    if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
        raise UserError(f"{where}: examples of {label!r} must be a list of texts")
    texts = tuple(" ".join(e.split()) for e in examples if e.strip())
    if len(texts) > MAX_EXAMPLES:
        raise UserError(f"{where}: {len(texts)} examples of {label!r}; at most {MAX_EXAMPLES} a class")
    label_seen.add(label)
    return ClassInfo(label=label, description=" ".join(description.split()), examples=texts)


def _csv_rows(text: str, path: Path) -> list[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))   # a quoted field may hold a line break
    columns = reader.fieldnames or []
    missing = {"label", "description"} - set(columns)
    if missing:
        raise UserError(f"{path}:1: missing column(s) {', '.join(sorted(missing))} (columns: {', '.join(columns)}; "
                        "expected label,description[,examples])")
    rows = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise UserError(f"{where}: more fields than the header (quote a description that holds a comma)")
        rows.append((where, {k: v for k, v in row.items() if k in ("label", "description", "examples") and v}))
    return rows


def _listed(value, path: Path) -> list:
    if isinstance(value, dict) and isinstance(value.get("classes"), list):
        value = value["classes"]
    if not isinstance(value, list):
        raise UserError(f"{path}: expected a list of classes (objects with label and description)")
    return value


def read_taxonomy(path: str | Path) -> Taxonomy:
    """Read and check a taxonomy file; every problem is one line naming the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("a folder, not a file" if path.is_dir() else "not a regular file"
                                       if path.exists() else "no such file"))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        try:
            rows = _csv_rows(text, path)
        except csv.Error as e:
            raise UserError(f"{path}: unreadable CSV ({e})") from None
    elif suffix == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to be a taxonomy") from None
        rows = [(f"{path}: class {i + 1}", v) for i, v in enumerate(_listed(value, path))]
    elif suffix in (".yaml", ".yml"):
        import yaml
        try:   # BaseLoader: every scalar is text, as written (NO, 010 and 1.5 are labels, not a bool or numbers)
            value = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 -- BaseLoader builds no objects
        except RecursionError:
            raise UserError(f"{path}: nested too deeply to be a taxonomy") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not YAML "
                            f"({getattr(e, 'problem', None) or type(e).__name__})") from None
        rows = [(f"{path}: class {i + 1}", v) for i, v in enumerate(_listed(value, path))]
    else:
        raise UserError(f"{path}: unknown taxonomy format {suffix or '(no extension)'!r}; expected .csv, .json, "
                        ".yaml or .yml")
    seen: set[str] = set()
    classes = tuple(_row(value, where, seen) for where, value in rows)
    if not classes:
        raise UserError(f"{path}: no classes")
    return Taxonomy(path=str(path), sha256=hashlib.sha256(raw).hexdigest(), classes=classes)
