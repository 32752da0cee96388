"""A run's output folder, written so that a failed or killed run never looks like a result.

Everything goes to a hidden sibling staging folder; only a finished run replaces OUT, by rename.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import UserError

MARKER = "report.json"


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class RunOutput:
    def __init__(self, out: str | Path):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MARKER).is_file():
            # Never delete a folder we did not write.
            raise UserError(f"--out {self.out}: folder exists, is not empty and holds no {MARKER}; "
                            "choose another --out")
        self.staging = self.out.parent / f".{self.out.name}.partial"

    def open(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)  # left over by a killed run
        self.staging.mkdir()
        return self.staging

    def commit(self) -> Path:
        old = self.out.parent / f".{self.out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
