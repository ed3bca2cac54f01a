"""docker-compose.yml without a Docker engine: its services' command lines, run as local processes.

The compose file is parsed and its `${VAR:-default}` variables substituted as compose does; container paths
are mapped to temporary folders through the services' own volume entries, and the image's embedded sample
(/opt/bertstream/sample) to one built here by the Dockerfile's own RUN line; the `trainer` host name maps
to loopback. What runs is exactly the command line and environment a container would run, in the
environment scripts/test.sh built from the same pins as the image (tests/test_pins.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_tcp_endpoint

SAMPLE = "/opt/bertstream/sample"  # where the Dockerfile bakes the embedded default
RUN_TIMEOUT_S = 300
# Only what keeps CI short on two CPU cores; everything else is the compose defaults, nothing configured.
SHORT = {"PRECISION": "--no_cuda", "MAX_STEPS": "6", "TRAIN_BATCH_SIZE": "8", "MAX_SEQ_LEN": "64",
         "LOGGING_STEPS": "2", "PRODUCER_WORKERS": "1", "PRODUCER_BATCH_SIZE": "8",
         "TRAINER_ARGS": "--eval_instances 32"}
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


def load_compose(env: dict[str, str], name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load(interpolate((REPO / name).read_text(), env))


@pytest.fixture(scope="session")
def image_sample(tmp_path_factory) -> Path:
    """The embedded default, built by the Dockerfile's RUN line that bakes it, with its path moved here."""
    dockerfile = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    run = next(line for line in dockerfile.splitlines() if line.startswith("RUN ") and SAMPLE in line)
    sample = tmp_path_factory.mktemp("image") / "sample"
    command = run[len("RUN "):].replace(SAMPLE, str(sample))
    bin_dir = Path(sys.executable).parent
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert (sample / "model" / "config.json").is_file() and (sample / "corpus" / "heldout.txt").is_file()
    return sample


class Project:
    """The compose project on this machine: one folder per volume, the sample, a free port for the stream."""

    def __init__(self, tmp_path: Path, sample: Path, env: dict[str, str]):
        self.tmp_path = tmp_path
        self.compose = load_compose(env)
        self.port = int(free_tcp_endpoint().rsplit(":", 1)[1])
        self.paths = {SAMPLE: sample}
        for volume in self.compose["x-bertstream"]["volumes"]:
            target = volume.split(":")[1]
            self.paths[target] = tmp_path / target.strip("/")
            self.paths[target].mkdir(exist_ok=True)
        self.logs: dict[str, Path] = {}

    def local(self, text: str) -> str:
        for target, host in self.paths.items():
            if text == target or text.startswith(target + "/"):
                return str(host) + text[len(target):]
        text = text.replace("tcp://trainer:5555", f"tcp://127.0.0.1:{self.port}")
        return text.replace("tcp://0.0.0.0:5555", f"tcp://127.0.0.1:{self.port}")

    def command(self, service: str) -> list[str]:
        return [self.local(arg) for arg in shlex.split(self.compose["services"][service]["command"])]

    def start(self, service: str, name: str | None = None) -> subprocess.Popen:
        """The service's command in its environment (compose's `environment:` entries, paths mapped)."""
        name = name or service
        bin_dir = Path(sys.executable).parent  # `python`, the console scripts and torchrun of this environment
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(variable, None)
        env.update({k: self.local(str(v)) for k, v in self.compose["services"][service]["environment"].items()})
        env["HF_HUB_OFFLINE"] = "1"  # no machine here reaches the Hub; the sample model needs none
        self.logs[name] = self.tmp_path / f"{name}.log"
        with open(self.logs[name], "w") as log:
            return subprocess.Popen(self.command(service), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return self.logs[name].read_text()


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def children(pid: int) -> list[int]:
    """The process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} never happened (exit {process.poll()})")


def metrics(output: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line]
    except (OSError, ValueError):
        return []


def test_nothing_configured_trains_the_embedded_default_and_prints_the_heldout_table(tmp_path, image_sample):
    project = Project(tmp_path, image_sample, SHORT)
    trainer, producer = project.start("trainer"), project.start("producer")
    try:
        trainer_status = trainer.wait(timeout=RUN_TIMEOUT_S)
        producer_status = producer.wait(timeout=60)  # the trainer's end ends the producer too
    finally:
        stop(trainer, producer)
    log = project.log("trainer")
    print(log[-1500:])  # the held-out table, for the record
    assert trainer_status == 0, log[-4000:]
    assert producer_status == 0, project.log("producer")[-3000:]
    assert "the image's sample: set CORPUS_DIR for your own corpus" in log
    table = re.search(r"held-out evaluation +before \(step 0\) +after \(step 6\)\n"
                      r"eval_mlm_accuracy +([\d.]+) +([\d.]+)\neval_mlm_loss +([\d.]+) +([\d.]+)", log)
    assert table, log[-3000:]
    assert float(table[4]) < float(table[3])  # it trained: the held-out MLM loss fell
    output = project.paths["/output"]
    assert metrics(output)[-1]["step"] == 6
    from transformers import AutoTokenizer, BertForPreTraining

    BertForPreTraining.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)


def test_a_missing_corpus_is_one_line_and_one_exit_for_both_services(tmp_path, image_sample):
    """CORPUS_DIR names a folder without corpus.txt: each service says so once; nothing restarts or loops.

    The producer starts only once the trainer is done, the worst order: compose starts the trainer first,
    and a slow producer container may find its run already over (it must still end, not wait forever)."""
    project = Project(tmp_path, image_sample, {**SHORT, "CORPUS_DIR": "/srv/texts"})
    trainer = project.start("trainer")
    producer = None
    try:
        trainer_status = trainer.wait(timeout=60)
        producer = project.start("producer")
        producer_status = producer.wait(timeout=60)  # it waits for the trainer's end, then exits too
    finally:
        stop(trainer, *([producer] if producer else []))
    missing = project.paths["/data"] / "corpus.txt"
    expected = (f"bertstream-compose: corpus {missing} does not exist (CORPUS_DIR=/srv/texts is mounted at "
                f"{project.paths['/data']}): put corpus.txt there or set CORPUS to the file's path under /data")
    for name, status in (("trainer", trainer_status), ("producer", producer_status)):
        lines = project.log(name).splitlines()
        assert status == 1, lines
        assert lines.count(expected) == 1, lines
        assert not any("restarting" in line or "Traceback" in line for line in lines), lines


def test_a_crashed_trainer_restarts_and_resumes_while_the_producer_waits(tmp_path, image_sample):
    project = Project(tmp_path, image_sample, {**SHORT, "MAX_STEPS": "10", "SAVE_STEPS": "2",
                                               "TRAINER_ARGS": "--eval_instances 16 --eval_steps 0"})
    trainer, producer = project.start("trainer"), project.start("producer")
    output = project.paths["/output"]
    try:
        wait_for(lambda: (output / "checkpoints" / "step_00000002").is_dir(), trainer, "a checkpoint at step 2")
        (child,) = children(trainer.pid)
        os.kill(child, signal.SIGKILL)  # as the OOM killer would: no checkpoint, no goodbye
        trainer_status = trainer.wait(timeout=RUN_TIMEOUT_S)
        producer_status = producer.wait(timeout=60)
    finally:
        stop(trainer, producer)
    log = project.log("trainer")
    assert trainer_status == 0, log[-4000:]
    assert producer_status == 0, project.log("producer")[-3000:]
    assert "the trainer exited 137; restarting it in 5 s (1 of 3): it resumes from its newest checkpoint" in log
    assert re.search(r"resuming from \S+step_0000000[2468]", log), log[-3000:]
    assert metrics(output)[-1]["step"] == 10
    assert project.log("producer").count("bertstream-compose: the producer exited") == 0  # it just waited


def test_a_stop_under_torchrun_ends_with_the_ranks_status_75(tmp_path, image_sample):
    """Two ranks (CPU, gloo) under torchrun, which exits 1 when its ranks exit 75: the entry point's status
    is still the ranks' 75, and the producer ends with the run."""
    project = Project(tmp_path, image_sample, {**SHORT, "TRAINER_GPUS": "2", "MAX_STEPS": "1000",
                                               "TRAINER_ARGS": "--eval_instances 16 --eval_steps 0"})
    with __import__("socket").socket() as probe:  # rank 1 binds the next port: take a pair that is free
        for _ in range(50):
            try:
                probe.bind(("127.0.0.1", project.port + 1))
                break
            except OSError:
                project.port = int(free_tcp_endpoint().rsplit(":", 1)[1])
    trainer, producer = project.start("trainer"), project.start("producer")
    output = project.paths["/output"]
    try:
        wait_for(lambda: len([r for r in metrics(output) if "loss" in r]) >= 1, trainer, "a first training record")
        trainer.send_signal(signal.SIGTERM)  # as `docker compose stop` does to the container's first process
        trainer_status = trainer.wait(timeout=RUN_TIMEOUT_S)
        producer_status = producer.wait(timeout=60)
    finally:
        stop(trainer, producer)
    log = project.log("trainer")
    assert trainer_status == 75, log[-4000:]
    assert producer_status == 0, project.log("producer")[-3000:]
    assert re.search(r"rank0 .*stopped at step \d+; checkpoint in", log), log[-3000:]
    assert "bertstream-compose: trainer finished with status 75" in log


def test_images_entry_points_are_the_console_scripts():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bertstream-producer"] == "producer.__main__:main"
    assert scripts["bertstream-trainer"] == "trainer.__main__:main"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install .*\"?\.\[", dockerfile, re.M), "the image does not install this package"
    for script in ("bertstream-producer", "bertstream-trainer"):
        assert f"{script} --help" in dockerfile  # the build fails if an entry point does not start
    assert re.search(r"^COPY scripts/compose ", dockerfile, re.M)  # the services' entry point is in the image
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests", "!scripts/compose", "!scripts/stdlib_corpus.py"} <= set(ignored)
    compose = load_compose({})
    for service in ("trainer", "producer"):
        command = shlex.split(compose["services"][service]["command"])
        assert command[:4] == ["python", "scripts/compose/entrypoint.py", service, "--corpus_dir"]


def test_compose_defaults_and_policies():
    compose = load_compose({})
    trainer, producer = compose["services"]["trainer"], compose["services"]["producer"]
    trainer_args = shlex.split(trainer["command"])
    assert trainer_args[trainer_args.index("--bert_model") + 1] == f"{SAMPLE}/model"
    assert trainer_args[trainer_args.index("--corpus_dir") + 1] == ""  # no CORPUS_DIR: the sample corpus
    assert trainer_args[trainer_args.index("--max_steps") + 1] == "300"  # the demo's length
    assert "--fp16" in trainer_args and trainer_args[trainer_args.index("--gpus") + 1] == "1"
    producer_args = shlex.split(producer["command"])
    assert producer_args[producer_args.index("--max_seq_len") + 1] == "128"
    # No --seed: every producer process (a scaled replica, a restart) draws a fresh one and never repeats another.
    assert "--seed" not in producer_args
    # No lower-casing flag: both sides follow the tokenizer's own setting (DO_LOWER_CASE forces one).
    assert "--do_lower_case" not in producer_args and "--do_lower_case" not in trainer_args
    assert producer_args[producer_args.index("--trainer_gone_timeout_s") + 1] == "0"  # the trainer's end ends it
    assert "tcp://0.0.0.0:5555" in trainer_args and "tcp://trainer:5555" in producer_args
    # The entry point restarts; a container restart would end the project under --exit-code-from.
    assert trainer["restart"] == producer["restart"] == "no"
    assert "ports" not in trainer  # the stream port stays inside the compose network
    assert trainer["shm_size"] and int(trainer["environment"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 120
    assert trainer["stop_grace_period"] == "2m"
    override = load_compose({}, "docker-compose.override.yml")
    devices = override["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    readme = (REPO / "README.md").read_text()
    assert "PRECISION=--no_cuda docker compose -f docker-compose.yml up --exit-code-from trainer" in readme


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="Debian's docker-compose is not installed (scripts/test.sh installs it as root with apt)")
def test_docker_compose_config_accepts_both_file_sets():
    for files in (["-f", "docker-compose.yml"], []):  # the CPU one-liner's set, and the GPU default
        result = subprocess.run(["docker-compose", *files, "config"], cwd=REPO, capture_output=True, text=True,
                                env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")})
        assert result.returncode == 0, result.stderr
        config = yaml.safe_load(result.stdout)
        assert "scripts/compose/entrypoint.py producer" in config["services"]["producer"]["command"]
        assert ("deploy" in config["services"]["trainer"]) == (files == [])
