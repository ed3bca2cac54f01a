"""docker-compose.yml without a Docker engine: its services' commands, run as local processes, train and stop together.

The compose file is parsed, its `${VAR:-default}` variables substituted as compose does, container paths
mapped to temporary folders through the services' own volume entries, and the `trainer` host name mapped
to loopback. What runs is exactly the command line a container would run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_tcp_endpoint, write_corpus

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: ${VAR}, ${VAR:-default} (unset or empty), ${VAR-default} (unset only)."""

    def replace(match: re.Match) -> str:
        name, op, default = match["name"], match["op"], match["default"] or ""
        value = env.get(name)
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        return value or ""

    return _VARIABLE.sub(replace, text)


def load_compose(env: dict[str, str]) -> dict:
    raw = (REPO / "docker-compose.yml").read_text()
    return yaml.safe_load(interpolate(raw, env))


def local_command(service: dict, host_paths: dict[str, Path], port: int) -> list[str]:
    """The service's command with container paths and the compose network mapped onto this machine."""
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if target in host_paths:
            mounts[target] = str(host_paths[target])
    args = []
    for arg in shlex.split(service["command"]):
        for target, host in mounts.items():
            if arg == target or arg.startswith(target + "/"):
                arg = host + arg[len(target):]
        arg = arg.replace("tcp://trainer:5555", f"tcp://127.0.0.1:{port}")
        arg = arg.replace("tcp://0.0.0.0:5555", f"tcp://127.0.0.1:{port}")
        args.append(arg)
    return args


def test_compose_services_train_and_stop_together(tmp_path, tiny_model_dir):
    data, output, cache = tmp_path / "data", tmp_path / "output", tmp_path / "cache"
    data.mkdir()
    write_corpus(data / "corpus.txt", num_documents=30)
    env = {
        "BERT_MODEL": str(tiny_model_dir),
        "PRECISION": "--no_cuda",
        "TRAIN_BATCH_SIZE": "8",
        "PRODUCER_WORKERS": "2",
        "PRODUCER_BATCH_SIZE": "4",
        "MAX_SEQ_LEN": "64",
        "PRODUCER_EXIT_AFTER_S": "2",
        "TRAINER_ARGS": f"--max_steps 6 --logging_steps 2 --save_steps 3 --cache_dir {cache}",
    }
    compose = load_compose(env)
    port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    paths = {"/data": data, "/output": output, "/cache": cache}
    trainer_cmd = local_command(compose["services"]["trainer"], paths, port)
    producer_cmd = local_command(compose["services"]["producer"], paths, port)
    assert producer_cmd[0] == "bertstream-producer"
    assert trainer_cmd[:2] == ["torchrun", "--standalone"]

    bin_dir = Path(sys.executable).parent  # the console scripts and torchrun of this environment
    process_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("trainer", "producer")}
    trainer = subprocess.Popen(trainer_cmd, env=process_env, stdout=logs["trainer"], stderr=subprocess.STDOUT)
    producer = subprocess.Popen(producer_cmd, env=process_env, stdout=logs["producer"], stderr=subprocess.STDOUT)
    try:
        trainer_status = trainer.wait(timeout=180)
        # Training over, the producer notices the trainer is gone and ends by itself (the run ends).
        producer_status = producer.wait(timeout=60)
    finally:
        for process in (trainer, producer):
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs.values():
            log.close()
    trainer_log = (tmp_path / "trainer.log").read_text()
    producer_log = (tmp_path / "producer.log").read_text()
    assert trainer_status == 0, trainer_log[-3000:]
    assert producer_status == 0, producer_log[-3000:]

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6
    from transformers import AutoTokenizer, BertForPreTraining

    BertForPreTraining.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)


def test_images_entry_points_are_the_console_scripts():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bertstream-producer"] == "producer.__main__:main"
    assert scripts["bertstream-trainer"] == "trainer.__main__:main"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM pytorch/pytorch:\S+-cuda\S+", dockerfile, re.M), "base image is not an official CUDA one"
    assert re.search(r"^RUN pip install .*\"?\.\[", dockerfile, re.M), "the image does not install this package"
    for script in ("bertstream-producer", "bertstream-trainer"):
        assert f"{script} --help" in dockerfile  # the build fails if an entry point does not start
    compose = load_compose({})
    assert shlex.split(compose["services"]["producer"]["command"])[0] == "bertstream-producer"
    trainer = shlex.split(compose["services"]["trainer"]["command"])
    assert trainer[trainer.index("-m") + 1] == "trainer"  # torchrun runs the same module as bertstream-trainer


def test_compose_defaults_and_policies():
    compose = load_compose({})
    trainer, producer = compose["services"]["trainer"], compose["services"]["producer"]
    trainer_args = shlex.split(trainer["command"])
    assert trainer_args[trainer_args.index("--bert_model") + 1] == "bert-base-uncased"
    assert "--fp16" in trainer_args
    producer_args = shlex.split(producer["command"])
    assert producer_args[producer_args.index("--max_seq_len") + 1] == "128"
    assert producer_args[producer_args.index("--seed") + 1] == "host"  # scaled replicas must not repeat each other
    assert "tcp://0.0.0.0:5555" in trainer_args and "tcp://trainer:5555" in producer_args
    assert trainer["restart"] == producer["restart"] == "on-failure"  # a normal end (exit 0) is not restarted
    assert "ports" not in trainer  # the stream port stays inside the compose network
    override = yaml.safe_load(interpolate((REPO / "docker-compose.override.yml").read_text(), {}))
    devices = override["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_config_passes():
    for files in (["-f", "docker-compose.yml"], []):
        result = subprocess.run(["docker-compose", *files, "config"], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "bertstream-producer" in result.stdout
