"""Distributed paths that used to fail on first use: an untied MLM head under DDP, and a start-up that cannot
reach the other ranks (a wrong interface, a rank that never comes), which must end in bounded time with a
message naming the address it tried. Two CPU ranks (gloo) under torchrun, or one trainer process given
torchrun's environment by hand where the other rank must be missing.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, write_corpus
from test_distributed import environment, finished_lines, start_torchrun
from trainer_support import run_to_end, state_dict_of, stop, train_records, trainer_flags, write_seed_epochs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("paths_corpus") / "corpus.txt", num_documents=60)


def test_an_untied_model_trains_under_ddp(tiny_model_dir, corpus, tmp_path):
    """tie_word_embeddings false: cls.predictions.bias is not the bias the MLM head adds, gets no gradient, and
    DDP used to fail at step 2. It is frozen instead: both ranks take every step, equal, and it is saved as
    loaded."""
    from transformers import BertForPreTraining

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    untied = BertForPreTraining.from_pretrained(str(tiny_model_dir))
    untied.config.tie_word_embeddings = False
    with torch.no_grad():
        untied.cls.predictions.bias.fill_(0.25)  # recognisable, and apart from the decoder's own bias
    untied.save_pretrained(model)  # both biases and both output matrices, as a model trained untied has them
    assert json.loads((model / "config.json").read_text())["tie_word_embeddings"] is False

    write_seed_epochs(tmp_path / "data", model, corpus, epochs=1)
    out, log_path = tmp_path / "out", tmp_path / "torchrun.log"
    trainer = start_torchrun(model, out, None, log_path, "--pregenerated_data", str(tmp_path / "data"),
                             "--max_steps", "4", "--save_steps", "0")
    code, log = run_to_end(trainer, log_path)
    assert code == 0, log[-4000:]
    assert "Expected to have finished reduction" not in log
    assert "cls.predictions.bias, unused, is frozen (kept as loaded)" in log
    # Each rank says which interface its gloo groups chose, and why (one host: the route to MASTER_ADDR).
    assert len(re.findall(r"rank\d INFO rank \d of 2 .* gloo over \S+ \(\S+, the route to MASTER_ADDR \S+\)$", log,
                          re.MULTILINE)) == 2, log[-4000:]
    finished = finished_lines(log)
    assert finished[0] == finished[1] and finished[0][:2] == (4, 4)
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    before, after = state_dict_of(model), state_dict_of(out)
    assert torch.equal(after["cls.predictions.bias"], before["cls.predictions.bias"])
    assert not torch.equal(after["cls.predictions.decoder.bias"], before["cls.predictions.decoder.bias"])
    assert not torch.equal(after["cls.predictions.decoder.weight"], before["cls.predictions.decoder.weight"])


def test_an_interface_this_host_does_not_have_is_refused_at_once(tiny_model_dir, tmp_path):
    """Both ranks of a run, each its own process with torchrun's environment (under torchrun itself, the first
    rank to exit gets the other killed, sometimes before it has written a line: a race in the test, not the
    trainer). Each refuses the flag before any connection is tried: otherwise rank 0 would wait at the rendezvous
    for --dist_connect_timeout (300 s) and run_to_end's guard would end the test."""
    out, port = tmp_path / "out", free_port()
    names = ", ".join(name for _, name in socket.if_nameindex())
    ranks = [(rank, tmp_path / f"rank{rank}.log") for rank in (0, 1)]
    processes = [start_alone(tiny_model_dir, out, rank, port, log_path, "--dist_interface", "nosuch0")
                 for rank, log_path in ranks]
    try:  # each waited for on its own: stopping one must not cut the other short
        results = [run_to_end(process, log_path) for process, (_, log_path) in zip(processes, ranks)]
    finally:
        stop(*processes)
    for code, log in results:
        assert code != 0, log[-4000:]
        assert log.count(f"--dist_interface nosuch0: no such network interface on this host (it has {names})") == 1, \
            log[-4000:]  # this rank says it
    assert not out.exists() or not (out / "metrics.jsonl").exists()


def start_alone(model: Path, out: Path, rank: int, port: int, log_path: Path, *flags: str) -> subprocess.Popen:
    """One trainer process as rank `rank` of 2 (torchrun's environment, set by hand): the other rank is
    whatever the test makes of it."""
    env = {**environment(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env.pop("GLOO_SOCKET_IFNAME", None)
    command = [sys.executable, "-m", "trainer", *trainer_flags(model, out, "--no_cuda", "--max_steps", "2",
                                                               "--bind", f"tcp://127.0.0.1:{free_port()}", *flags)]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_that_cannot_reach_the_rendezvous_stops_naming_it(tiny_model_dir, tmp_path, rank):
    """Rank 0 hosts the rendezvous and rank 1 never joins; or rank 1 looks for a rendezvous nobody hosts. Each
    stops after --dist_connect_timeout with the address it tried (it used to wait 30 days with --data_timeout
    0, the default)."""
    port, log_path = free_port(), tmp_path / "trainer.log"
    trainer = start_alone(tiny_model_dir, tmp_path / "out", rank, port, log_path, "--dist_connect_timeout", "3")
    code, log = run_to_end(trainer, log_path)
    assert code == 1, log[-4000:]
    assert (f"rank {rank}: no rendezvous with the other ranks at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within "
            "--dist_connect_timeout 3 s") in log, log[-4000:]
    assert "Traceback" not in log


@pytest.mark.parametrize("publishes", [True, False])
def test_a_rank_that_joins_the_rendezvous_but_never_connects_is_waited_for_in_bounded_time(tiny_model_dir, tmp_path,
                                                                                           publishes):
    """Rank 1 (a real TCPStore client, on a "node" of its own: LOCAL_WORLD_SIZE 1) reaches the rendezvous but
    never brings up its gloo side, as a rank whose gloo address the others cannot reach. Rank 0, on
    MASTER_ADDR's node, routes its gloo groups toward rank 1's published address; it stops after
    --dist_connect_timeout, naming the interface, the address and how they were chosen, or, when rank 1 never
    published an address, that rank."""
    port, log_path = free_port(), tmp_path / "trainer.log"
    trainer = start_alone(tiny_model_dir, tmp_path / "out", 0, port, log_path, "--dist_connect_timeout", "5")
    joiner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, datetime, torch.distributed as d\n"
         "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), 2, False, timeout=datetime.timedelta(seconds=60))\n"
         "if sys.argv[2] == 'yes': s.set('bertstream/route/0/1', '127.0.0.1')\n"
         "time.sleep(120)", str(port), "yes" if publishes else "no"], cwd=REPO, env=environment())
    code, log = run_to_end(trainer, log_path, joiner)
    assert code == 1, log[-4000:]
    if publishes:
        assert ("rank 0 could not connect to the other ranks within --dist_connect_timeout 5 s over lo (127.0.0.1, "
                "the route to rank 1's address 127.0.0.1)") in log, log[-4000:]
        assert "--dist_interface (or GLOO_SOCKET_IFNAME)" in log
    else:
        assert ("rank 0: rank 1 never published its address in the rendezvous store within --dist_connect_timeout "
                "5 s") in log, log[-4000:]
    assert "Traceback" not in log
