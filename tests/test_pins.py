"""One set of versions: constraints.txt pins them, and the test command and the Dockerfile both install from it.

The Dockerfile and scripts/test.sh are parsed: every pip install in them must go through constraints.txt,
neither may name a version of its own, and the image's base must not bring a torch of its own. This
environment, built by scripts/test.sh, must hold exactly the pinned versions.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

# The packages the issue names, which must all be pinned: the image and the tests agree on each.
MUST_PIN = {"torch", "transformers", "tokenizers", "huggingface-hub", "numpy", "pyzmq", "msgpack"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, Version]:
    found = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", \
            f"constraints.txt line {number}: {line!r} is not one exact pin (NAME==VERSION)"
        found[canonical(requirement.name)] = Version(specifiers[0].version)
    return found


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a Dockerfile's RUN lines or a shell script, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*RUN\s+", "", line.split(" #", 1)[0]) if not line.lstrip().startswith("#") else ""
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            if words:
                commands.append(words)
    return commands


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` (also `.venv/bin/pip install`, `python -m pip install`)."""
    installs = []
    for words in shell_commands(text):
        for i, word in enumerate(words[:-1]):
            if re.fullmatch(r"(.*/)?pip3?", word) and words[i + 1] == "install":
                installs.append(words[i + 2:])
                break
    return installs


def test_constraints_pin_every_shared_dependency():
    pinned = pins()
    assert MUST_PIN <= set(pinned), f"constraints.txt does not pin {sorted(MUST_PIN - set(pinned))}"
    floors = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for floor in map(Requirement, floors):  # the pins satisfy pyproject's floors, so pip can install both
        name = canonical(floor.name)
        assert name in pinned, f"pyproject.toml depends on {floor.name}, which constraints.txt does not pin"
        assert floor.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is below pyproject's {floor}"


def test_this_environment_holds_the_pinned_versions():
    """scripts/test.sh built it: a pin that pip did not honour (or a stale .venv) fails here."""
    for name, version in pins().items():
        installed = Version(metadata.version(name))
        # The CPU wheel of torch is 2.13.0+cpu: the local label is the build, not another release.
        assert Version(installed.public) == version, f"{name} {installed} is installed, constraints.txt pins {version}"


def test_the_test_command_installs_through_the_constraints():
    script = (REPO / "scripts" / "test.sh").read_text()
    installs = pip_installs(script)
    assert installs, "scripts/test.sh installs nothing with pip"
    for args in installs:
        assert "-c" in args and args[args.index("-c") + 1] == "constraints.txt", f"scripts/test.sh: pip install {args}"
    assert not re.search(r"\b(torch|transformers|numpy)\s*[=<>~!]=", script), "scripts/test.sh names a version"
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()  # CI runs this very command


def test_the_dockerfile_installs_the_same_pins_and_its_base_has_no_torch():
    dockerfile = (REPO / "Dockerfile").read_text()
    installs = pip_installs(dockerfile)
    assert installs, "the Dockerfile installs nothing with pip"
    for args in installs:
        constrained = ("-c" in args and args[args.index("-c") + 1] == "constraints.txt") or \
                      ("-r" in args and args[args.index("-r") + 1] == "constraints.txt")
        assert constrained, f"Dockerfile: pip install {' '.join(args)} does not go through constraints.txt"
        for arg in args:
            assert not re.search(r"[=<>~!]=|@", arg), f"Dockerfile: pip install names its own version: {arg}"
    assert re.search(r"^COPY\s+constraints\.txt\s", dockerfile, re.M), "the image does not get constraints.txt"
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M)[1]
    repository, _, tag = base.partition(":")
    torch_pin = pins()["torch"]
    if repository in ("pytorch/pytorch", "nvcr.io/nvidia/pytorch"):
        # A base with torch inside: its torch must be the pinned one (pip would keep it otherwise).
        assert tag.startswith(f"{torch_pin}-"), f"base image {base} carries another torch than {torch_pin}"
    else:
        assert repository in ("python", "docker.io/library/python"), f"unknown base image {base}"
        python = Version(re.match(r"\d+\.\d+", tag)[0])
        requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
        assert Requirement(f"x{requires}").specifier.contains(python), f"{base}: Python {python} outside {requires}"
