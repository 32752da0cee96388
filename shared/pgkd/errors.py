"""The two error types a user sees. `pgkd.cli.main`, the one error boundary, prints either as one line:
a `UserError` (bad input: a path, a file's content, an option) exits 2, an `EnvironmentFailure` (a
server unreachable, a store that cannot be written, a port another process holds; an OSError) exits 1.

A message that names one of the caller's parameters names it as an `Option`, never as a flag: a
Python caller reads `labeled=5`, the command line `--labeled 5`. The engine names the parameter once;
`pgkd.cli.main`, the one error boundary, maps each name to its command's flag (`UserError.for_command`).

    raise UserError(Option("labeled", labeled), " is larger than the train split")
"""
from __future__ import annotations

from pathlib import PurePath
from typing import Callable

_NO_VALUE = object()


class Option:
    """A parameter of the caller's named in a message, with the value given where it helps."""

    def __init__(self, name: str, value=_NO_VALUE, quoted: bool = False):
        self.name, self.value, self.quoted = name, value, quoted    # quoted: the value as repr() on a command too

    def for_python(self) -> str:
        if self.value is _NO_VALUE:
            return self.name
        value = str(self.value) if isinstance(self.value, PurePath) else self.value
        return f"{self.name}={value!r}"

    def for_command(self, flag: str | None) -> str:
        """`--flag value` (`--flag` alone for a switch); a positional argument (flag "") as its value;
        a parameter the command has no flag for (None) as in Python."""
        if flag is None:
            return self.for_python()
        shown = repr(self.value) if self.quoted else str(self.value)
        if flag == "":
            return self.name if self.value is _NO_VALUE else shown
        return flag if self.value is _NO_VALUE or self.value is True else f"{flag} {shown}"

    __str__ = for_python

    def __repr__(self) -> str:
        return f"Option({self.for_python()})"


def _flatten(parts) -> tuple:
    out = []
    for part in parts:
        out.extend(_flatten(part) if isinstance(part, (tuple, list)) else [part])
    return tuple(out)


class UserError(Exception):
    """Bad input from the user (a path, a file's content, an option). The message says what and where.

    `UserError(text, ...)`: the parts of the message, each a str or an Option (or a tuple of them);
    `str(e)` is the message for a Python caller, `e.for_command(flag_of)` the one for a command."""

    def __init__(self, *parts):
        self.parts = _flatten(parts)
        super().__init__("".join(str(p) for p in self.parts))

    def for_command(self, flag_of: Callable[[str], str | None]) -> str:
        """The message with each Option as `flag_of(its name)` says (see Option.for_command)."""
        if not any(isinstance(p, Option) for p in self.parts):
            return str(self)
        return "".join(p.for_command(flag_of(p.name)) if isinstance(p, Option) else str(p) for p in self.parts)


class EnvironmentFailure(Exception):
    """The environment failed, not the input: a server unreachable or failing, a store that cannot be
    written, a port held by another process. The message says what and where; the CLI exits 1."""


def dotted(whole: str = "", prefix: str = "") -> Callable[[tuple, object], str]:
    """A namer for `invalid`: a problem's place as `prefix` and its dotted path (`whole` for the value itself)."""
    return lambda loc, value: prefix + (".".join(map(str, loc)) or whole)


def invalid(error, name: Callable[[tuple, object], object] | None = None, limit: int | None = None) -> UserError:
    """pydantic's ValidationError as one UserError, each problem said once, without pydantic's prefix.

    `name(loc, value)` says how a problem's place is named: by default an Option for a top-level field
    (a Python caller reads `labeled=0: ...`, the command line `--labeled 0: ...`), the dotted path for a
    nested one. A settings reader names the variable (`PGKD_X='y'`), a file reader the file and key.
    A validator that raised a UserError inside pydantic keeps its own parts: it names the parameter.
    `limit`: say only the first problems (a message from a stranger may have many)."""
    if name is None:
        def name(loc, value):
            return Option(str(loc[0]), value) if len(loc) == 1 else ".".join(map(str, loc))
    parts: list = []
    for err in error.errors()[:limit]:
        parts += ["; "] if parts else []
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ValueError) and cause.args and isinstance(cause.args[0], UserError):
            parts += cause.args[0].parts
            continue
        parts += [name(tuple(err["loc"]), err.get("input")), ": ", err["msg"].removeprefix("Value error, ")]
    return UserError(*parts)
