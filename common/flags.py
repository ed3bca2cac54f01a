"""Command-line flags declared once, on the config dataclasses' fields; the parsers and `--config FILE` follow.

A field declared with `flag(help, default)` is a flag: its name (or `name=`), type, default and help come
from the field, so the parser, `--help` and the flag tables in docs/flags.md (scripts/flags_table.py) cannot drift
from the config. Fields without `flag(...)` are not flags (a rank set by torchrun, a constant).
`--config FILE` reads a YAML or JSON mapping of flag names (without the dashes) to values, as users of
transformers' `HfArgumentParser.parse_yaml_file` expect; flags on the command line win over the file, and a
key that is not a flag is refused by name, as `HfArgumentParser` refuses unused keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable

_META = "bertstream.flag"
_UNSET: Any = object()  # Flag.cli_default when the flag's default is the field's


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line."""

    help: str
    group: str = ""  # key of the parser's argument group (see `add_flags`); "" = the parser's own options
    name: str | None = None  # the flag without its dashes, when it differs from the field's name
    aliases: tuple[str, ...] = ()  # further option strings, with their dashes ("--local-rank")
    metavar: str | None = None
    type: Callable[[str], Any] | None = None  # parses the command-line string; default: from the field's type
    choices: tuple | None = None
    cli_default: Any = _UNSET  # what argparse holds when the flag is absent, if not the field's default
    negated: bool = False  # a store_true flag that sets a default-True bool field to False (--no_resume)


def flag(help: str, default: Any = MISSING, **how: Any) -> Any:
    """A dataclass field that is also a command-line flag; no `default` makes the flag required."""
    return dataclasses.field(default=default, metadata={_META: Flag(help, **how)})


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, Flag, type]]:
    """The fields of `cls` that are flags, in declaration order, with their resolved types."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata[_META], hints[f.name]) for f in dataclasses.fields(cls) if _META in f.metadata]


def _dest(field: dataclasses.Field, how: Flag) -> str:
    return how.name or field.name


def _base_type(hint: Any) -> Any:
    """`str | None` -> str; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def add_flags(parser: argparse.ArgumentParser, groups: dict[str, argparse._ArgumentGroup], *classes: type) -> None:
    """One argument per flag field of `classes`, each in its group (`groups[Flag.group]`): group by group in the
    order of `groups`, and within a group in the order of `classes` and their fields, so `--help` and the
    tables in docs/flags.md (which list the parser's arguments in order) read alike."""
    order = {"": -1, **{key: i for i, key in enumerate(groups)}}
    declared = [(cls, *spec) for cls in classes for spec in flag_fields(cls)]
    for cls, field, how, hint in sorted(declared, key=lambda d: order[d[2].group]):  # a stable sort
        target = groups[how.group] if how.group else parser
        kind = _base_type(hint)
        options = [f"--{_dest(field, how)}", *how.aliases]
        default = field.default if how.cli_default is _UNSET else how.cli_default
        if kind is bool:
            if field.default is not how.negated:  # the flag flips the default: off -> on, or on -> off
                raise TypeError(f"{cls.__name__}.{field.name}: a bool flag's field defaults to "
                                f"{how.negated} (negated={how.negated})")
            target.add_argument(*options, dest=_dest(field, how), action="store_true", help=how.help)
        elif default is MISSING:  # no default: the flag is required
            target.add_argument(*options, dest=_dest(field, how), type=how.type or kind, required=True,
                                metavar=how.metavar, choices=how.choices, help=how.help)
        else:
            target.add_argument(*options, dest=_dest(field, how), type=how.type or kind, default=default,
                                metavar=how.metavar, choices=how.choices, help=how.help)


def from_args(cls: type, args: argparse.Namespace, **computed: Any):
    """`cls` built from the parsed flags (negated flags inverted) and `computed`, the fields worked out here."""
    values = {}
    for field, how, _ in flag_fields(cls):
        value = getattr(args, _dest(field, how))
        values[field.name] = (not value) if how.negated else value
    return cls(**{**values, **computed})


# --config FILE ---------------------------------------------------------------------------------------------

CONFIG_HELP = ("a YAML (.yaml, .yml) or JSON (.json) file of flags: keys are flag names without the dashes "
               "(learning_rate: 5.0e-5, fp16: true); flags on the command line win over the file")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default=None, metavar="FILE", help=CONFIG_HELP)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with `--config FILE`'s values as the defaults, so the command line wins."""
    pre = argparse.ArgumentParser(add_help=False)  # only finds --config (abbreviated as the full parser allows)
    pre.add_argument("--config", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        apply_config_file(parser, known.config)
    return parser.parse_args(argv)


def read_config_file(parser: argparse.ArgumentParser, path: str) -> dict:
    """The file's mapping; a missing, unreadable or malformed file ends the process naming it (exit 2)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        parser.error(f"--config {path}: expected a .json, .yaml or .yml file")
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        parser.error(f"--config {path}: {exc.strerror or exc}")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            parser.error(f"--config {path}: not valid JSON: {exc}")
    else:
        try:
            import yaml
        except ImportError:
            parser.error(f"--config {path}: reading YAML needs the pyyaml package (pip install pyyaml); "
                         "or give the flags as a .json file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            parser.error(f"--config {path}: not valid YAML: {exc}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values, got a {type(data).__name__}")
    return data


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """The file's flags become `parser`'s defaults (checked and converted here, as argparse would not)."""
    actions = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            # A dest shared by two flags (a seed's alias such as --num_train_epochs for --epochs) is its first.
            for key in (action.dest, *(option.lstrip("-") for option in action.option_strings)):
                actions.setdefault(key, action)
    defaults = {}
    for key, value in read_config_file(parser, path).items():
        action = actions.get(str(key).lstrip("-"))
        if action is None:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parser.error(f"--config {path}: unknown key {key!r}: not a flag of {parser.prog}{hint}")
        if action.nargs == 0 and value is False:  # a switch set false: as if absent (the command line may set it)
            continue
        defaults[action.dest] = _coerce(parser, path, key, action, value)
        action.required = False  # given by the file
    parser.set_defaults(**defaults)


def _coerce(parser: argparse.ArgumentParser, path: str, key: str, action: argparse.Action, value: Any) -> Any:
    """A file's value as the command line would have given it; anything else ends the process naming the key."""
    where = f"--config {path}: {key}"
    if action.nargs == 0:  # a switch (store_true, or store_const: --no_resume, --no_lower_case): true sets it
        if not isinstance(value, bool):
            parser.error(f"{where}: expected true or false, got {value!r}")
        return action.const
    if value is None:
        if action.default is not None or action.required:
            parser.error(f"{where}: expected a value, got null")
        return None
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [_coerce_one(parser, where, action, v) for v in value]
    if isinstance(value, list) and action.__class__.__name__ == "_AppendAction":
        return [_coerce_one(parser, where, action, v) for v in value]
    return _coerce_one(parser, where, action, value)


def _coerce_one(parser: argparse.ArgumentParser, where: str, action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (bool, dict, list)) or not isinstance(value, (str, int, float)):
        parser.error(f"{where}: expected a single value, got {value!r}")
    try:
        # Through the flag's own parser, from the text a user would type (an int flag refuses 2.5, not rounds it).
        converted = action.type(str(value)) if action.type else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        detail = f" ({exc})" if isinstance(exc, argparse.ArgumentTypeError) else ""
        name = getattr(action.type, "__name__", "value")
        parser.error(f"{where}: expected {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r}{detail}")
    if action.choices is not None and converted not in action.choices:
        parser.error(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted
