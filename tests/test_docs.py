"""The docs say what the code does: the flag tables match the parsers, and every path, link and flag they name exists."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from conftest import REPO

# The newcomer's page, the guide, and the benchmarks' page: every file whose paths and flags are checked.
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]

# A repository path, backticked or not, in text and commands: `trainer/loop.py`, tests/test_x.py::test_y,
# .venv/bin/python benchmarks/run_all.py; and the top-level files by name.
_PATH = re.compile(r"(?<![\w./-])((?:\.ci|common|producer|trainer|tests|scripts|benchmarks|docs)/[\w./-]*\w)")
_TOP_FILE = re.compile(r"`(Dockerfile|docker-compose(?:\.override)?\.yml|constraints\.txt|pyproject\.toml)`")
# benchmarks/README.md names its scripts by bare name (`bench_p1_worker.py`), the seed's scripts too.
_BARE_SCRIPT = re.compile(r"`(\w+\.(?:py|sh))`")
# A test named as file::function, with or without `tests/` (the faults table names dozens): both must exist.
_TEST = re.compile(r"(?:tests/)?(test_\w+\.py)::(\w+)")
_SEED_SCRIPTS = {"pregenerate_training_data.py", "finetune_on_pregenerated.py", "simple_lm_finetuning.py"}
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")
# Lines of bertstream's own commands; other programs' lines (torchrun's, docker's, pip's, pytest's) are left
# alone, except that a torchrun line's flags after `-m trainer` are the trainer's.
_OUR_COMMAND = re.compile(r"(bertstream-(?:trainer|producer)|python -m (?:trainer|producer)|-m trainer)\b(.*)")


def _flags_table_module():
    spec = importlib.util.spec_from_file_location("flags_table", REPO / "scripts" / "flags_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parser_flags() -> set[str]:
    from producer.cli import build_parser as producer_parser
    from trainer.cli import build_parser as trainer_parser

    return {option for parser in (producer_parser(), trainer_parser())
            for action in parser._actions for option in action.option_strings}


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors, in_code = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _command_lines(text: str):
    """Each bertstream command in a fenced block, continuation lines joined, comments dropped."""
    in_code, pending = False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        line = pending + " " + line.split(" #", 1)[0] if pending else line.split(" #", 1)[0]
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        pending = ""
        match = _OUR_COMMAND.search(line)
        if match and not line.lstrip().startswith("#"):
            yield match.group(0)


def test_flag_tables_match_the_parsers():
    flags_table = _flags_table_module()
    flags_md = (REPO / "docs" / "flags.md").read_text(encoding="utf-8")
    assert flags_table.readme_block(flags_md) == flags_table.render(), (
        "docs/flags.md's flag tables are stale: run `python scripts/flags_table.py --write`"
    )


def test_every_flag_has_help():
    from producer.cli import build_parser as producer_parser
    from trainer.cli import build_parser as trainer_parser

    for parser in (producer_parser(), trainer_parser()):
        missing = [a.option_strings[0] for a in parser._actions
                   if not isinstance(a, argparse._HelpAction) and not a.help]
        assert not missing, f"{parser.prog}: flags without help text: {missing}"


def test_every_path_the_docs_name_exists():
    missing, checked = [], 0
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            paths = [REPO / path for path in _PATH.findall(line) + _TOP_FILE.findall(line)]
            if doc.parent.name == "benchmarks":
                paths += [doc.parent / name for name in _BARE_SCRIPT.findall(line) if name not in _SEED_SCRIPTS]
            checked += len(paths)
            missing += [f"{doc.relative_to(REPO)}:{number}: {path.relative_to(REPO)}"
                        for path in paths if not path.exists()]
    assert not missing, "the docs name paths that do not exist:\n" + "\n".join(missing)
    assert checked > 50  # the patterns still find the paths the docs are full of


def test_every_test_the_docs_name_exists():
    missing, checked = [], 0
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for file, function in _TEST.findall(line):
                checked += 1
                source = REPO / "tests" / file
                if not source.is_file() or not re.search(rf"^\s*(?:async )?def {function}\(", source.read_text(), re.M):
                    missing.append(f"{doc.relative_to(REPO)}:{number}: tests/{file}::{function}")
    assert not missing, "the docs name tests that do not exist:\n" + "\n".join(missing)
    assert checked > 20  # the faults table names its tests


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for target in _LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # http(s):, mailto:: not this repository's
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (doc.parent / file_part).resolve() if file_part else doc
                if not linked.exists():
                    broken.append(f"{doc.relative_to(REPO)}:{number}: ({target}): no such file")
                elif anchor and anchor not in _anchors(linked):
                    broken.append(f"{doc.relative_to(REPO)}:{number}: ({target}): no heading #{anchor} there")
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)


def test_every_flag_in_a_bertstream_command_exists():
    known, unknown = _parser_flags(), []
    for doc in DOCS:
        for command in _command_lines(doc.read_text(encoding="utf-8")):
            unknown += [f"{doc.relative_to(REPO)}: {flag} in `{command.strip()[:80]}`"
                        for flag in _FLAG.findall(command) if flag not in known]
    assert not unknown, "the docs' commands use flags no parser has:\n" + "\n".join(unknown)


def test_every_flag_in_the_docs_prose_exists():
    """A backticked `--flag` in running text names one of ours, unless it belongs to another program."""
    other_programs = {
        "--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id", "--node_rank",
        "--master_addr", "--master_port", "--standalone", "--max_restarts", "--local_addr",
        "--shutdown_timeout",  # torchrun's
        "--exit-code-from", "--scale",  # docker compose's
        "--cases",  # benchmarks/bench_splitters.py's, named in docs/producer.md
    }
    known, unknown = _parser_flags() | other_programs, []
    for doc in DOCS:
        if doc.parent.name == "benchmarks":  # names the benchmark scripts' flags, not ours
            continue
        in_code = False
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                in_code = not in_code
            if in_code:
                continue
            for span in re.findall(r"`([^`]*)`", line):
                if span.startswith("--"):
                    flag = _FLAG.match(span)
                    if flag and flag.group(0) not in known:
                        unknown.append(f"{doc.relative_to(REPO)}:{number}: {flag.group(0)}")
    assert not unknown, "the docs name flags no parser has:\n" + "\n".join(unknown)


def test_readme_names_the_test_command_and_ci_runs_it():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for script in re.findall(r"^(scripts/\S+\.(?:sh|py))", readme, re.M):
        assert (REPO / script).is_file(), f"README names {script}, which does not exist"
    assert "scripts/test.sh" in readme
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for page in (REPO / "docs").glob("*.md"):  # the newcomer's page leads to every page of the guide
        assert f"(docs/{page.name})" in readme, f"README.md's Read more list does not link docs/{page.name}"
