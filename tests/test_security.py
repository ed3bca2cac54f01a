"""common/security.py and the stream's security: key files, CURVE between real processes, nothing unpickled.

Loopback-only defaults are checked in test_trainer_cli.py (test_the_seeds_defaults); the decoder's own limits
and its hypothesis tests are in test_wire.py; a frame above ZMQ_MAXMSGSIZE at a real trainer is in
test_faults.py.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import security
from conftest import REPO, free_tcp_endpoint, write_corpus
from trainer import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from trainer.cli import main as trainer_main
from trainer_support import stop, TIMEOUT_S, captured_log, start_trainer, train_records, trainer_flags

KEYS_COMMAND = Path(sys.executable).parent / "bertstream-keys"


def keys_command(*args: str) -> subprocess.CompletedProcess:
    """`bertstream-keys` as installed (the console script), else the module it runs."""
    command = [str(KEYS_COMMAND)] if KEYS_COMMAND.exists() else [sys.executable, "-m", "common.security"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """trainer, producer and intruder key pairs, made by the command."""
    directory = tmp_path_factory.mktemp("keys") / "keys"
    result = keys_command(str(directory), "--name", "trainer", "--name", "producer", "--name", "intruder",
                          "--name", "impostor")
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="module")
def authorized(keys, tmp_path_factory) -> Path:
    """The trainer's folder of admitted producers: the producer's public key only."""
    directory = tmp_path_factory.mktemp("authorized")
    shutil.copy(keys / "producer.key", directory / "producer.key")
    return directory


# --- bertstream-keys -------------------------------------------------------------------------------------


def test_keys_command_writes_owner_only_secrets_and_refuses_to_overwrite(tmp_path):
    directory = tmp_path / "new" / "keys"
    result = keys_command(str(directory))
    assert result.returncode == 0, result.stderr
    assert mode(directory) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == ["producer.key", "producer.key_secret", "trainer.key",
                                                         "trainer.key_secret"]
    for name in ("trainer", "producer"):
        assert mode(directory / f"{name}.key_secret") == 0o600
        assert mode(directory / f"{name}.key") == 0o644
        public, secret = security.load_secret_key(directory / f"{name}.key_secret")
        assert security.load_public_key(directory / f"{name}.key") == public and len(secret) == 40
        assert str(directory / f"{name}.key_secret") in result.stdout
    trainer_secret = (directory / "trainer.key_secret").read_bytes()

    again = keys_command(str(directory), "--name", "other", "--name", "trainer")
    assert again.returncode == 1
    assert f"{directory / 'trainer.key'} already exists" in again.stderr and "--force" in again.stderr
    assert not (directory / "other.key").exists(), "all or nothing: no key is written when one exists"
    assert (directory / "trainer.key_secret").read_bytes() == trainer_secret

    os.chmod(directory / "trainer.key_secret", 0o644)  # an old file's loose mode must not carry over
    forced = keys_command(str(directory), "--name", "trainer", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (directory / "trainer.key_secret").read_bytes() != trainer_secret
    assert mode(directory / "trainer.key_secret") == 0o600

    bad_name = keys_command(str(directory), "--name", "../escape")
    assert bad_name.returncode == 2 and "--name '../escape'" in bad_name.stderr


def test_an_existing_folder_keeps_its_mode(tmp_path):
    os.chmod(tmp_path, 0o755)
    assert keys_command(str(tmp_path), "--name", "a").returncode == 0
    assert mode(tmp_path) == 0o755 and mode(tmp_path / "a.key_secret") == 0o600


# --- flags: both or none, and the files checked before any work ---------------------------------------------


def producer_flags(*extra: str) -> list[str]:
    return ["--train_corpus", "c.txt", "--bert_model", "m", "--connect", "tcp://127.0.0.1:5555", *extra]


def parse_producer(argv: list[str]):
    from producer import cli

    return cli.parse_config(cli.build_parser(), argv)


@pytest.mark.parametrize("case", ["secret only", "authorized only", "public as secret", "readable secret",
                                  "missing", "empty folder", "with pregenerated data"])
def test_trainer_curve_flags_are_checked_before_any_work(case, keys, authorized, tmp_path, capsys):
    secret, folder = str(keys / "trainer.key_secret"), str(authorized)
    loose = tmp_path / "loose.key_secret"
    shutil.copy(keys / "trainer.key_secret", loose)
    os.chmod(loose, 0o640)
    (tmp_path / "empty").mkdir()
    flags, message = {
        "secret only": (["--curve_secret_key", secret], "--curve_secret_key needs --curve_authorized_keys"),
        "authorized only": (["--curve_authorized_keys", folder], "--curve_authorized_keys needs --curve_secret_key"),
        "public as secret": (["--curve_secret_key", str(keys / "trainer.key"), "--curve_authorized_keys", folder],
                             "holds only a public key; give the NAME.key_secret file"),
        "readable secret": (["--curve_secret_key", str(loose), "--curve_authorized_keys", folder],
                            f"--curve_secret_key {loose}: permissions 0640 let other users read the secret key; "
                            f"run `chmod 600 {loose}`"),
        "missing": (["--curve_secret_key", str(tmp_path / "nope"), "--curve_authorized_keys", folder],
                    f"--curve_secret_key {tmp_path / 'nope'}: no such file"),
        "empty folder": (["--curve_secret_key", secret, "--curve_authorized_keys", str(tmp_path / "empty")],
                         "no public key files (*.key) in it"),
        "with pregenerated data": (["--pregenerated_data", str(tmp_path), "--curve_secret_key", secret,
                                    "--curve_authorized_keys", folder], "not --pregenerated_data"),
    }[case]
    out = tmp_path / "out"
    assert trainer_main(["--bert_model", "unused", "--output_dir", str(out), *flags]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("case", ["secret only", "server only", "trainer secret as server key", "readable secret",
                                  "dump mode"])
def test_producer_curve_flags_are_checked_before_any_work(case, keys, tmp_path, capsys):
    loose = tmp_path / "loose.key_secret"
    shutil.copy(keys / "producer.key_secret", loose)
    os.chmod(loose, 0o604)
    secret, server = str(keys / "producer.key_secret"), str(keys / "trainer.key")
    argv, message = {
        "secret only": (producer_flags("--curve_secret_key", secret), "--curve_secret_key needs --curve_server_key"),
        "server only": (producer_flags("--curve_server_key", server), "--curve_server_key needs --curve_secret_key"),
        "trainer secret as server key": (
            producer_flags("--curve_secret_key", secret, "--curve_server_key", str(keys / "trainer.key_secret")),
            "holds a secret key; give the public NAME.key file"),
        "readable secret": (producer_flags("--curve_secret_key", str(loose), "--curve_server_key", server),
                            "permissions 0604 let other users read the secret key"),
        "dump mode": (["--train_corpus", "c.txt", "--bert_model", "m", "--output_dir", "o", "--curve_secret_key",
                       secret, "--curve_server_key", server], "apply to streaming (--connect)"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        parse_producer(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_producer_config_keeps_key_paths_not_keys(keys):
    config = parse_producer(producer_flags("--curve_secret_key", str(keys / "producer.key_secret"),
                                           "--curve_server_key", str(keys / "trainer.key")))
    logged = str(config.to_dict())  # what the start-up log line prints
    _, secret = security.load_secret_key(keys / "producer.key_secret")
    assert str(keys / "producer.key_secret") in logged and secret.decode() not in logged


# --- CURVE between real processes --------------------------------------------------------------------------


def start_producer(model: Path, corpus: Path, endpoint: str, tmp_path: Path, name: str, *flags: str):
    log_path = tmp_path / f"{name}.log"
    command = [sys.executable, "-m", "producer", "--train_corpus", str(corpus), "--bert_model", str(model),
               "--do_lower_case", "--cache_dir", str(tmp_path / "cache"), "--connect", endpoint, "--num_workers", "1",
               "--batch_size", "8", "--max_seq_len", "64", "--hwm_batches", "2", "--progress_interval_s", "0.3",
               "--linger_ms", "0", *flags]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log_path


def wait_for(path: Path, pattern: str, *processes: subprocess.Popen) -> re.Match:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text())
        if match:
            return match
        for process in processes:
            assert process.poll() is None, f"{process.args[:3]} exited; {path.name}:\n{path.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path}:\n{path.read_text()}")


def test_only_an_authorised_producer_gets_batches_into_training(tiny_model_dir, keys, authorized, tmp_path):
    """Three producers that must not get a single batch in, then the authorised one, whose batches train."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    endpoint, out = free_tcp_endpoint(), tmp_path / "out"
    trainer = start_trainer(trainer_flags(
        tiny_model_dir, out, "--bind", endpoint, "--max_steps", "6", "--data_timeout", str(TIMEOUT_S),
        "--curve_secret_key", str(keys / "trainer.key_secret"), "--curve_authorized_keys", str(authorized)),
        tmp_path / "trainer.log")
    trainer_log = tmp_path / "trainer.log"
    producers = []
    started = time.monotonic()
    try:
        wait_for(trainer_log, rf"stream: listening on {re.escape(endpoint)} \(CURVE: 1 authorised", trainer)
        server = str(keys / "trainer.key")
        producers += [
            # a key pair the trainer does not know, with the right server key
            start_producer(tiny_model_dir, corpus, endpoint, tmp_path, "intruder", "--curve_secret_key",
                           str(keys / "intruder.key_secret"), "--curve_server_key", server),
            # no CURVE at all
            start_producer(tiny_model_dir, corpus, endpoint, tmp_path, "plain"),
            # the authorised key pair, but it expects another trainer: it must not talk to this one either
            start_producer(tiny_model_dir, corpus, endpoint, tmp_path, "misdirected", "--curve_secret_key",
                           str(keys / "producer.key_secret"), "--curve_server_key", str(keys / "impostor.key")),
        ]
        for (process, log_path) in producers:  # every one has batches ready and cannot hand them over
            wait_for(log_path, r"blocked on socket 100%", process)
        wait_for(trainer_log, r"CURVE key \S+\.\.\. is not in --curve_authorized_keys", trainer)
        wait_for(trainer_log, r"failed the CURVE handshake", trainer)
        assert "stream: batches from producer" not in trainer_log.read_text()
        assert not train_records(out)

        good, good_log = start_producer(tiny_model_dir, corpus, endpoint, tmp_path, "authorised",
                                        "--curve_secret_key", str(keys / "producer.key_secret"),
                                        "--curve_server_key", server)
        producers.append((good, good_log))
        assert trainer.wait(timeout=4 * TIMEOUT_S) == EXIT_OK, trainer_log.read_text()
        elapsed = time.monotonic() - started
    finally:
        stop(trainer)
        for process, _ in producers:
            stop(process)
    text = trainer_log.read_text()
    fed_by = re.findall(r"stream: batches from producer \S+:(\d+)", text)
    assert fed_by == [str(good.pid)], text  # the only producer whose batches were received at all
    last = train_records(out)[-1]
    assert last["step"] == 6 and last["messages_rejected"] == 0
    # Refusals are logged at a bounded rate (two kinds, each at most once per DENIED_NOTE_S), however often the
    # refused producers reconnect.
    assert len(re.findall(r"stream: refused", text)) <= 2 * (1 + elapsed / security.DENIED_NOTE_S), text


# --- nothing on the wire or in a checkpoint is unpickled ----------------------------------------------------


class _Payload:
    """Pickles into a call of builtins.open that creates `marker`: what a hostile pickle can do on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_checkpoint_with_a_hostile_pickle_is_refused_not_run(tiny_model_dir, tmp_path):
    import torch

    from trainer.checkpoint import STATE_FILE, CheckpointError, Checkpoints

    # The payload is live: an unrestricted torch.load runs it ...
    live = tmp_path / "live"
    live.mkdir()
    torch.save({"step": 1, "x": _Payload(live / "ran")}, live / STATE_FILE)
    torch.load(live / STATE_FILE, weights_only=False)
    assert (live / "ran").exists()

    # ... the trainer's does not: the newest checkpoint of an output folder holds it.
    out = tmp_path / "out"
    checkpoint = out / "checkpoints" / "step_00000001"
    shutil.copytree(tiny_model_dir, checkpoint)
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "x": _Payload(marker)}, checkpoint / STATE_FILE)
    with pytest.raises(CheckpointError, match="weights_only|Unsupported global|not an allowed global"):
        Checkpoints.load_state(checkpoint)
    assert not marker.exists()

    data = tmp_path / "data"
    from trainer_support import write_seed_epochs

    write_seed_epochs(data, tiny_model_dir, write_corpus(tmp_path / "corpus.txt"), epochs=1)
    with captured_log() as lines:
        code = trainer_main(trainer_flags(tiny_model_dir, out, "--pregenerated_data", str(data), "--epochs", "1",
                                          "--max_steps", "3"))
    assert code == EXIT_ERROR
    assert any(f"cannot read {checkpoint / STATE_FILE}" in line for line in lines), lines
    assert not marker.exists()


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            dotted = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                dotted = f"{func.value.id}.{func.attr}"
            if dotted == name:
                yield node


def test_no_shipped_code_can_unpickle_what_it_receives_or_loads():
    """Every torch.load passes weights_only=True; nothing uses pickle, recv_pyobj, msgpack hooks or allow_pickle."""
    sources = sorted(p for package in ("common", "producer", "trainer") for p in (REPO / package).rglob("*.py"))
    assert len(sources) > 20
    torch_loads = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {"pickle", "cPickle", "dill", "cloudpickle", "marshal"} & set(modules), where
        for call in _calls(tree, "torch.load"):
            torch_loads.append(where)
            flags = {k.arg: k.value for k in call.keywords}
            assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                f"{where}:{call.lineno}: torch.load without weights_only=True"
        for forbidden in ("recv_pyobj", "recv_serialized", "ext_hook", "object_hook", "object_pairs_hook",
                          "allow_pickle=True", "pickle.loads"):
            assert forbidden not in text, f"{where}: {forbidden}"
    assert torch_loads, "expected the checkpoint loader's torch.load"


# --- defaults ---------------------------------------------------------------------------------------------


def test_an_unencrypted_bind_beyond_loopback_is_warned_about(tiny_model_dir, tmp_path):
    port = free_tcp_endpoint().rsplit(":", 1)[1]
    with captured_log() as lines:
        code = trainer_main(trainer_flags(tiny_model_dir, tmp_path / "out", "--bind", f"tcp://0.0.0.0:{port}",
                                          "--data_timeout", "0.5"))
    assert code == EXIT_ERROR  # nobody sends: the data timeout ends it
    assert any(f"tcp://0.0.0.0:{port} accepts batches from anyone who can reach it, unencrypted" in line
               and "--curve_secret_key" in line for line in lines), lines
