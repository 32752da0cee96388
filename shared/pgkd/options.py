"""A pydantic model's fields as command-line options, and parsed options back as the model: how a run's
options (pgkd.loop.config.DistillConfig) are declared once and reach `pgkd distill`, `pgkd submit`,
`pgkd bench bus` and `python -m pgkd_services.local` alike.

    add_options(parser, DistillConfig)          # --labeled, --teacher-timeout, ..., from the fields
    config = from_options(DistillConfig, args)  # exactly the model's fields, validated by the model

Each field is one option: `--kebab-case` of its name, its help the field's description with the
default shown, its type from the annotation (`X | None` as X), `choices` from a Literal, a bool as a
switch (`--name` for a default of False, `--no-name` for True). A field's `json_schema_extra` may give
`flag` (an established spelling, e.g. `--cycle-lr-scale`), `group` (an argparse group's title) and
`metavar`. Constraints (gt, le, ...) and validators are the model's: the parser converts types only,
and the model's ValidationError is what `pgkd.errors.invalid` formats, naming each option by its flag
(`flags`).

Why not pydantic-settings' CliSettingsSource: it builds its own parser around the model, so our
`Parser` (one-line errors, exit 2), the subcommands and the options that are not the model's (`--out`,
`--no-progress`, `--wait`) would have to be fitted around it; an established flag spelling would be a
validation alias, which the Python API (`pgkd.distill(cycle_learning_rate_scale=...)`) would then see
too; and `--no-warm-start` as the only switch of a default-True bool is not its style. Fifty lines
over `model_fields` keep all of that as it was.

This module imports argparse and pydantic only: the engine's commands and the services' both use it.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Callable, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def _extra(field: FieldInfo) -> dict:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def flag(name: str, field: FieldInfo) -> str:
    """The field's option: its `flag` metadata, else --kebab-case (--no-kebab-case for a bool that is on)."""
    if "flag" in _extra(field):
        return _extra(field)["flag"]
    kebab = name.replace("_", "-")
    return f"--no-{kebab}" if field.annotation is bool and field.default is True else f"--{kebab}"


def base_type(field: FieldInfo):
    """The field's annotation, `X | None` as X."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _keywords(name: str, field: FieldInfo) -> dict[str, Any]:
    """add_argument's keywords for one field."""
    help_text = (field.description or "").replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": name}
    annotation = base_type(field)
    if annotation is bool:
        kwargs["action"] = "store_false" if field.default is True else "store_true"
        return {**kwargs, "help": help_text or None}
    if field.default is PydanticUndefined and field.default_factory is None:
        kwargs["required"] = True
    else:
        kwargs["default"] = field.get_default(call_default_factory=True)
        if kwargs["default"] is not None:
            help_text += (" " if help_text else "") + "(default: %(default)s)"
    if typing.get_origin(annotation) is Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
        annotation = type(kwargs["choices"][0])
    if annotation in (int, float):
        kwargs["type"] = annotation
    elif annotation is not str:
        raise TypeError(f"{name}: no command-line form for {field.annotation!r}")
    if "metavar" in _extra(field):
        kwargs["metavar"] = _extra(field)["metavar"]
    return {**kwargs, "help": help_text or None}


def add_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per field of `model`, in the fields' order; a field with `group` metadata goes into
    the argparse group of that title (made once per parser)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, field in model.model_fields.items():
        title = _extra(field).get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        target.add_argument(flag(name, field), **_keywords(name, field))


def from_options(model: type[BaseModel], args: argparse.Namespace):
    """The model from parsed options: exactly its fields (the command's other options are not its).
    Raises pydantic's ValidationError; `pgkd.errors.invalid(e).for_command(flags(parser))` says it."""
    return model(**{name: getattr(args, name) for name in model.model_fields})


def flags(parser: argparse.ArgumentParser) -> Callable[[str], str | None]:
    """dest -> how `parser` spells it: its long option (`--labeled`), "" for a positional argument, None
    where it has no such option."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if action.dest != "help" and action.dest not in found:
            long = [s for s in action.option_strings if s.startswith("--")] or action.option_strings
            found[action.dest] = long[0] if long else ""
    return found.get
