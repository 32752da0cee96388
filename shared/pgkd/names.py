"""The one place where a name from a user or a message becomes a path.

A *name* (a run id, a stream, a model, a segment, a version) is one path component that cannot be
anything else: letters, digits, `_`, `-` and `.`, starting with a letter or a digit (so never `.` or
`..`, never hidden), at most 128 characters. A *relative path* (a manifest entry, an artifact key) is
components joined by `/`: a component may be any file name but `.` and `..` (no separator, no control
character).
Either becomes a path only through `inside(root, ...)`, which resolves it (symlinks included) and
refuses anything that lands outside `root`.

Every refusal is an `UnsafeName` (a `UserError`: one line, exit code 2) that says what and where.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from pgkd.errors import Option, UserError

MAX_NAME = 128
MAX_RELATIVE = 1024
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"   # for pydantic fields; `check_name` says the same
_NAME = re.compile(NAME_PATTERN)
# A component of a relative path (`.pgkd-run.json`, `model.safetensors`, a file of a user's model folder):
# any printable text but a separator, at most 255 characters (a file name's limit); `.` and `..` are refused below.
_COMPONENT = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}$")


class UnsafeName(UserError):
    """A name or relative path that could reach outside its folder, or is not a name at all."""


def is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str | Option) -> str:
    """`value` if it is a name (see the module's docstring); UnsafeName naming `what` otherwise (an
    Option: the caller's parameter, named as the caller spells it)."""
    if is_name(value):
        return value
    shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "..."
    named = Option(what.name, shown, quoted=True) if isinstance(what, Option) else f"{what} {shown!r}"
    raise UnsafeName(named, ": not a name (letters, digits, '_', '-', '.', starting with a letter or "
                     f"a digit, at most {MAX_NAME} characters; no '/', no '..')")


def is_relative(value: object) -> bool:
    """A relative path of safe components: no leading '/', no empty, '.' or '..' component."""
    if not isinstance(value, str) or not value or len(value) > MAX_RELATIVE:
        return False
    return all(_COMPONENT.fullmatch(part) and part not in (".", "..") for part in value.split("/"))


def check_relative(value: object, what: str) -> str:
    if is_relative(value):
        return value
    shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80]) + "..."
    raise UnsafeName(f"{what} {shown}: not a relative path inside its folder")


def inside(root: str | Path, *parts: str, what: str = "path", links: bool = True) -> Path:
    """`root / parts...`, refused (UnsafeName) unless every part is a relative path of safe components
    and the result, with every symlink on the way resolved, stays inside `root` (resolved too). With
    `links=False` a symlink anywhere below `root` on the way is refused too (a folder pgkd owns holds
    none). The path returned is the unresolved join, so what a user sees keeps the folder they named."""
    root = Path(root)
    for part in parts:
        check_relative(part, what)
    joined = "/".join(parts)
    path = root.joinpath(*parts)
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise UnsafeName(f"{what} {joined!r}: leads outside {root} (through a link)")
    if not links:
        step = root
        for component in joined.split("/"):
            step = step / component
            if step.is_symlink():
                raise UnsafeName(f"{what} {joined!r}: {step} is a link, and pgkd writes no links there")
    return path


def key(*parts: str, what: str = "key") -> str:
    """An artifact store key (`runs/RUN/...`) joined from parts, each checked as a relative path."""
    for part in parts:
        check_relative(part, what)
    return "/".join(parts)
