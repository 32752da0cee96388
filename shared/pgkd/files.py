"""Writing a file atomically: a reader sees the old file or the new one, never half of either.

The content goes to a temporary file in the same folder (os.replace is atomic only within one file
system), named `.NAME.RANDOM.tmp` so that writers in several processes never share one, is flushed
and fsynced, then replaces the target with os.replace. On any failure the temporary file is removed
and the target is as it was."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def temporary_name(path: str | Path) -> Path:
    """Where the content for `path` is written before it replaces `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def is_temporary_of(name: str, path: str | Path) -> bool:
    """Whether `name` (a file name in `path`'s folder) is one of `temporary_name(path)`'s: another
    process may be half way through writing `path`."""
    prefix, suffix = f".{Path(path).name}.", ".tmp"
    middle = name[len(prefix):-len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
    return len(middle) == 32 and all(c in "0123456789abcdef" for c in middle)


def write_atomic_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Atomically replace `path` by what `write(f)` writes to the binary file `f` (for writers such as
    numpy.savez that want a file rather than bytes). The folder must exist."""
    tmp = temporary_name(path)
    try:
        # O_EXCL: a fresh file, with the permissions a plain open() gives (mkstemp's are 0600).
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Atomically replace `path` by `data`; the sha256 (hex) of what was written."""
    write_atomic_with(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> str:
    """Atomically replace `path` by `text` in UTF-8; the sha256 (hex) of its bytes."""
    return write_bytes_atomic(path, text.encode("utf-8"))


WRITTEN_BY = "pgkd"      # the mark of a file pgkd wrote to say a folder is its own (pgkd.ownership)


def write_json_atomic(path: str | Path, data) -> str:
    """Atomically replace `path` by `data` as indented JSON (UTF-8, a final newline); its sha256."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets one to read it, which a thread making a
    file at that moment would get): from /proc/self/status on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def control_character(text: str) -> str | None:
    """The first control character (C0, DEL, C1, a line or paragraph separator) in `text`, None when there is
    none: in a name or path, one prints as other text or breaks the line it is said in."""
    return next((c for c in text if ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"), None)


def output_path_problem(path: str | Path) -> str | None:
    """What makes `path` no place for pgkd to write a result (a folder or a file it creates), None when
    nothing does: a control character in it (a name that would print as other text, or break a line), or
    the path itself a link (pgkd writes into what it makes, not through a link to somewhere else)."""
    bad = control_character(str(path))
    if bad is not None:
        return f"holds a control character (U+{ord(bad):04X}); name a path without one"
    try:
        if Path(path).is_symlink():
            return "is a link; pgkd writes into a folder or file of its own, not through a link"
    except OSError as e:     # a name too long for the file system: it cannot be made either
        return f"cannot write there ({e.strerror or e})"
    return None


def require_writable(folder: str | Path, option: str = "--out") -> None:
    """A folder pgkd will write into can be written: a scratch folder is made (and removed at once) in
    it, or in its nearest existing parent; UserError naming `option` otherwise, before any work (/proc/x,
    /sys/x, a read-only mount). Nothing is left behind."""
    import tempfile
    from pgkd.errors import UserError
    given, folder = folder, Path(folder).absolute()
    above = next(p for p in (folder, *folder.parents) if p.exists())     # at worst /
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pgkd-probe-", dir=above))
    except OSError as e:
        raise UserError(f"{option} {given}: cannot write there ({e.strerror or e})") from None
