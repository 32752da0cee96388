"""How pgkd knows a folder is its own: a small JSON file it wrote there, `{"written_by": "pgkd", ...}`.

pgkd writes into, replaces in, or removes from a folder only when the folder is new, empty, or holds
such a file: a result folder (`.pgkd-run.json`, which also lists every file of the result), a model
folder of a Triton repository (`.pgkd-model.json`), an artifact store (`.pgkd-store.json`, which holds
the streams too). What it does not know, it never deletes or overwrites.
"""
from __future__ import annotations

import json
from pathlib import Path

from pgkd.files import WRITTEN_BY, output_path_problem, write_json_atomic


def read_owner(path: Path) -> dict | None:
    """The owner file at `path` if pgkd wrote it (a JSON object with `written_by: pgkd`), else None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == WRITTEN_BY else None


def write_owner(path: Path, **fields) -> None:
    """Write the owner file at `path` atomically (a reader sees the old one or the new one)."""
    write_json_atomic(path, {"written_by": WRITTEN_BY, **fields})


OUTPUT = ".pgkd-output.json"   # in a benchmark's --out: pgkd writes (and replaces) its results there


def claim_folder(folder: str | Path, option: str = "--out") -> Path:
    """A folder pgkd writes results into and replaces them in (a benchmark's --out): new, empty, or
    claimed by pgkd before (its OUTPUT file). Claims it and returns it; UserError, nothing touched,
    for anything else. Call it before any work and before anything in the folder is removed."""
    from pgkd.errors import UserError
    folder = Path(folder)
    if (problem := output_path_problem(folder)) is not None:
        raise UserError(f"{option} {folder}: {problem}")
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{option} {folder}: exists and is not a folder")
        if read_owner(folder / OUTPUT) is None and any(folder.iterdir()):
            raise UserError(f"{option} {folder}: not empty and not written by pgkd (no {OUTPUT}); choose another "
                            f"{option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if read_owner(folder / OUTPUT) is None:
            write_owner(folder / OUTPUT, note="pgkd writes benchmark results here and replaces them")
    except OSError as e:
        raise UserError(f"{option} {folder}: cannot write there ({e.strerror or e})") from None
    return folder
