"""Hub model names, without a network: a stand-in for the Hub's file endpoint on 127.0.0.1, and the cache that
huggingface_hub itself lays out under HF_HOME.

`hf_hub_download` asks `HEAD {HF_ENDPOINT}/{repo}/resolve/{revision}/{file}` for a file's commit (X-Repo-Commit),
ETag and size, then GETs it; a file the repository lacks is a 404 with `X-Error-Code: EntryNotFound`. The stand-in
answers exactly that from a folder, and records every request, so a test can tell what was downloaded.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, write_corpus
from trainer_support import TIMEOUT_S, state_dict_of, trainer_flags, write_seed_epochs

REPO_ID = "bertstream-tests/tiny-bert"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class StandInHub(http.server.ThreadingHTTPServer):
    """Serves the files of `folder` as revision `main` (and COMMIT) of REPO_ID."""

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.requests: list[tuple[str, str]] = []  # (method, file name)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def downloaded(self) -> set[str]:
        return {name for method, name in self.requests if method == "GET"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def _file(self) -> tuple[str, Path | None]:
        prefix = f"/{REPO_ID}/resolve/"
        if not self.path.startswith(prefix):
            return "", None
        revision, _, name = self.path[len(prefix):].partition("/")
        if revision not in ("main", COMMIT):
            return name, None
        path = self.server.folder / name
        return name, path if path.is_file() else None

    def _answer(self, with_body: bool) -> None:
        name, path = self._file()
        self.server.requests.append((self.command, name))
        if path is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self):  # noqa: N802 (the stdlib's names)
        self._answer(with_body=False)

    def do_GET(self):  # noqa: N802
        self._answer(with_body=True)

    def log_message(self, *args):
        pass


def hub_env(hf_home: Path, hub: StandInHub | None) -> dict:
    """A fresh process's environment: the cache under `hf_home`; online against `hub`, or offline without one."""
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    if hub is None:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens
    else:
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=hub.endpoint)
    return env


def train(out: Path, data: Path, env: dict) -> subprocess.CompletedProcess:
    flags = trainer_flags(Path("unused"), out, "--pregenerated_data", str(data), "--max_steps", "2", "--no_cuda")
    flags[flags.index("--bert_model") + 1] = REPO_ID
    return subprocess.run([sys.executable, "-m", "trainer", *flags], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=4 * TIMEOUT_S)


@pytest.fixture(scope="module")
def data(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hub_data")
    write_seed_epochs(tmp / "data", tiny_model_dir, write_corpus(tmp / "corpus.txt"), epochs=1)
    return tmp / "data"


def test_a_hub_name_trains_from_an_empty_cache_then_offline(tiny_model_dir, data, tmp_path):
    hf_home = tmp_path / "hf"
    with StandInHub(tiny_model_dir) as hub:
        result = train(tmp_path / "online", data, hub_env(hf_home, hub))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model.safetensors" in hub.downloaded() and "vocab.txt" in hub.downloaded()
    assert "pytorch_model.bin" not in {name for _, name in hub.requests}  # safetensors first, and found
    # The hub's weights were trained on, not fresh ones: the final model differs from them only by 2 steps.
    snapshot = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").is_file()
    assert_started_from(state_dict_of(tmp_path / "online"), state_dict_of(tiny_model_dir))

    # The same cache offline, with no hub at all: it has everything.
    result = train(tmp_path / "offline", data, hub_env(hf_home, None))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_tokenizer_only_cache_offline_is_one_clear_error(tiny_model_dir, data, tmp_path):
    hf_home = tmp_path / "hf"
    # The producer resolves the name as it always does: it fetches the tokenizer files and never the weights.
    script = "from common.vocab import resolve_model_dir; print(resolve_model_dir(%r))" % REPO_ID
    with StandInHub(tiny_model_dir) as hub:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=hub_env(hf_home, hub),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip(), "vocab.txt").is_file()
    assert "vocab.txt" in hub.downloaded() and not hub.downloaded() & set(WEIGHTS)
    assert not {name for _, name in hub.requests} & set(WEIGHTS)  # not even asked for

    result = train(tmp_path / "out", data, hub_env(hf_home, None))
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "the weights are missing" in line]
    assert len(errors) == 1, result.stdout + result.stderr
    assert f"--bert_model {REPO_ID}" in errors[0] and "HF_HUB_OFFLINE" in errors[0]
    assert f"hf download {REPO_ID}" in errors[0] and "Traceback" not in result.stderr


def test_a_repository_with_only_pytorch_model_bin_gives_those_weights(tiny_model_dir, tmp_path):
    """No safetensors on the hub: the trainer falls back to pytorch_model.bin, as from_pretrained does."""
    import torch

    folder = tmp_path / "bin_only"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.save(state_dict_of(tiny_model_dir), folder / "pytorch_model.bin")
    script = "from common.vocab import resolve_model_dir; print(resolve_model_dir(%r, with_weights=True))" % REPO_ID
    with StandInHub(folder) as hub:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=hub_env(tmp_path / "hf", hub),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert (Path(result.stdout.strip()) / "pytorch_model.bin").is_file()
    assert "pytorch_model.bin" in hub.downloaded()


def assert_started_from(trained: dict, hub_weights: dict) -> None:
    """Two steps at lr 1e-3 move each weight by at most ~2e-3 (Adam's step is about lr): far less than the
    distance to a freshly initialised model, so the run started from the hub's weights."""
    import torch

    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.max(torch.abs(trained[name] - hub_weights[name])) < 0.01
