"""common/flags.py: a config dataclass's fields declare its flags; the parser and --config FILE follow from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from common.flags import add_config_flag, add_flags, flag, from_args, parse_with_config


@dataclass(frozen=True)
class Example:
    name: str = flag("required: no default", group="a")
    count_s: int = flag("an int under another flag name", 3, group="b", name="count")
    ratio: float | None = flag("optional", None, group="a", metavar="R")
    verbose: bool = flag("a switch", False, group="b")
    keep: bool = flag("on unless --no_keep", True, group="a", name="no_keep", negated=True)
    mode: str = flag("one of two", "fast", group="b", choices=("fast", "slow"))
    where: str = flag("absent on the command line: None, so the caller can tell", "here", cli_default=None)
    derived: int = 0  # not a flag

    def __post_init__(self) -> None:
        if self.count_s < 0:
            raise ValueError(f"--count must be >= 0, got {self.count_s}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="example")
    add_config_flag(p)
    add_flags(p, {"a": p.add_argument_group("A"), "b": p.add_argument_group("B")}, Example)
    return p


def test_the_parser_follows_the_declarations():
    p = parser()
    options = [a.option_strings[0] for a in p._actions if a.option_strings and a.dest != "help"]
    # --config, then group a's flags, then group b's, each in declaration order; `derived` is not a flag.
    assert options == ["--config", "--where", "--name", "--ratio", "--no_keep", "--count", "--verbose", "--mode"]
    actions = {a.dest: a for a in p._actions}
    assert actions["name"].required and actions["count"].default == 3 and actions["ratio"].metavar == "R"
    assert actions["where"].default is None and actions["mode"].choices == ("fast", "slow")
    assert actions["count"].help == "an int under another flag name"


def test_from_args_builds_the_config():
    args = parse_with_config(parser(), ["--name", "x", "--count", "5", "--no_keep", "--verbose"])
    config = from_args(Example, args, where=args.where or "here", derived=7)
    assert config == Example(name="x", count_s=5, ratio=None, verbose=True, keep=False, mode="fast", where="here",
                             derived=7)
    with pytest.raises(SystemExit):
        parse_with_config(parser(), ["--name", "x", "--mode", "medium"])


def test_a_bool_flag_must_flip_its_fields_default():
    @dataclass(frozen=True)
    class Wrong:
        on: bool = flag("a switch that could never be turned off", True)

    with pytest.raises(TypeError, match="Wrong.on: a bool flag's field defaults to False"):
        add_flags(argparse.ArgumentParser(), {}, Wrong)


def test_config_file_values_are_defaults_the_command_line_overrides(tmp_path):
    config_file = tmp_path / "example.yml"
    config_file.write_text("name: from-file\ncount: 4\nratio: 0.5\nno_keep: true\nmode: slow\n")
    args = parse_with_config(parser(), ["--config", str(config_file), "--count", "9"])
    config = from_args(Example, args)
    assert (config.name, config.count_s, config.ratio, config.keep, config.mode) == ("from-file", 9, 0.5, False,
                                                                                     "slow")


def test_config_file_errors_name_the_file_and_key(tmp_path, capsys):
    config_file = tmp_path / "example.json"
    config_file.write_text('{"name": "x", "count": "many"}')
    with pytest.raises(SystemExit) as exit_info:
        parse_with_config(parser(), ["--config", str(config_file)])
    assert exit_info.value.code == 2
    assert f"--config {config_file}: count: expected an int, got 'many'" in capsys.readouterr().err
    config_file.write_text('{"name": null}')
    with pytest.raises(SystemExit):
        parse_with_config(parser(), ["--config", str(config_file)])
    assert f"--config {config_file}: name: expected a value, got null" in capsys.readouterr().err


def test_a_switch_in_the_file_stores_what_the_flag_stores(tmp_path):
    """`no_keep: true` stores the flag's constant (keep off); `verbose: false` is as if the switch were absent;
    a store_const switch sharing its dest with another (as --no_lower_case shares do_lower_case) stores its own."""
    p = parser()
    p.add_argument("--plain", dest="casing", action="store_const", const=True, default=None, help="on")
    p.add_argument("--cased", dest="casing", action="store_const", const=False, default=None, help="off")
    config_file = tmp_path / "example.yaml"
    config_file.write_text("name: x\nno_keep: true\nverbose: false\ncased: true\n")
    args = parse_with_config(p, ["--config", str(config_file)])
    assert (args.no_keep, args.verbose, args.casing) == (True, False, False)
    assert from_args(Example, args).keep is False
    args = parse_with_config(p, ["--config", str(config_file), "--verbose", "--plain"])
    assert (args.verbose, args.casing) == (True, True)  # the command line wins
