"""The README says what the code does: its flag tables match the parsers, and its commands are the real ones."""

from __future__ import annotations

import argparse
import importlib.util
import re

from conftest import REPO


def _flags_table_module():
    spec = importlib.util.spec_from_file_location("flags_table", REPO / "scripts" / "flags_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_tables_match_the_parsers():
    flags_table = _flags_table_module()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert flags_table.readme_block(readme) == flags_table.render(), (
        "README.md's flag tables are stale: run `python scripts/flags_table.py --write`"
    )


def test_every_flag_has_help():
    from producer.cli import build_parser as producer_parser
    from trainer.cli import build_parser as trainer_parser

    for parser in (producer_parser(), trainer_parser()):
        missing = [a.option_strings[0] for a in parser._actions
                   if not isinstance(a, argparse._HelpAction) and not a.help]
        assert not missing, f"{parser.prog}: flags without help text: {missing}"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for script in re.findall(r"^(scripts/\S+\.(?:sh|py))", readme, re.M):
        assert (REPO / script).is_file(), f"README names {script}, which does not exist"
    assert "scripts/test.sh" in readme
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
