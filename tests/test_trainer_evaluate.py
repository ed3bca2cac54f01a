"""The held-out evaluation: a fixed set, scored exactly, without touching the training state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.instances import Batch
from conftest import write_corpus
from trainer.evaluate import Evaluator, eval_batches, load_eval_index
from trainer.model import load_model, stock_pretraining_loss
from trainer.source import to_tensors
from trainer_support import vocabulary


@pytest.fixture(scope="module")
def index_and_vocab(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    corpus = write_corpus(tmp / "eval.txt", num_documents=30)
    vocab = vocabulary(tiny_model_dir)
    return load_eval_index(str(corpus), str(tiny_model_dir), True, str(tmp / "cache"), vocab), vocab


def test_the_eval_set_is_fixed(index_and_vocab):
    index, vocab = index_and_vocab
    first, second = (eval_batches(index, vocab, 40, 64, 16) for _ in range(2))
    assert [b.size for b in first] == [16, 16, 8]
    for a, b in zip(first, second):
        for name in Batch.FIELDS:
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    documents = {tuple(b.input_ids[i, 1:3]) for b in first for i in range(b.size)}
    assert len(documents) > 10  # spread over the corpus, not its first few documents


def test_scores_equal_the_stock_losses_over_the_whole_set(index_and_vocab, tiny_model_dir):
    index, vocab = index_and_vocab
    batches = eval_batches(index, vocab, 40, 64, 16)
    model = load_model(tiny_model_dir)
    model.train()
    rng_before = torch.get_rng_state()
    result = Evaluator(batches, torch.device("cpu"), None)(model)
    assert model.training  # back in training mode
    assert torch.equal(torch.get_rng_state(), rng_before)  # no dropout drew from the generator

    model.eval()
    mlm_sum = mlm_count = nsp_sum = 0.0
    with torch.no_grad():
        for b in batches:
            out = stock_pretraining_loss(model, to_tensors(b, pin_memory=False).to(torch.device("cpu")))
            mlm_sum += float(out.mlm_loss) * int(out.mlm_count)
            mlm_count += int(out.mlm_count)
            nsp_sum += float(out.nsp_loss) * b.size
    assert result.instances == 40
    assert result.mlm_loss == pytest.approx(mlm_sum / mlm_count, rel=1e-5)
    assert result.nsp_loss == pytest.approx(nsp_sum / 40, rel=1e-5)
    assert 0.0 <= result.mlm_accuracy <= 1.0 and 0.0 <= result.nsp_accuracy <= 1.0
    record = result.to_record()
    assert record["eval_loss"] == pytest.approx(result.mlm_loss + result.nsp_loss)


def test_the_eval_index_is_built_before_cuda_and_the_process_group(tiny_model_dir, tmp_path, monkeypatch):
    """Its build forks tokenizer processes: that must happen before resolve_runtime (which initialises CUDA on a
    GPU machine) and distributed.start (the process group and its threads). The real functions run; each call is
    only noted, in order."""
    import trainer.loop as loop
    from trainer import EXIT_OK
    from trainer.cli import main
    from trainer_support import trainer_flags, write_seed_epochs

    calls: list[str] = []

    def noting(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(loop, "load_eval_index", noting("eval index", loop.load_eval_index))
    monkeypatch.setattr(loop, "resolve_runtime", noting("runtime", loop.resolve_runtime))
    monkeypatch.setattr(loop.distributed, "start", noting("process group", loop.distributed.start))
    corpus = write_corpus(tmp_path / "corpus.txt")
    write_seed_epochs(tmp_path / "data", tiny_model_dir, corpus, epochs=1)
    assert main(trainer_flags(tiny_model_dir, tmp_path / "out", "--pregenerated_data", str(tmp_path / "data"),
                              "--max_steps", "1", "--eval_corpus", str(corpus), "--eval_instances", "8",
                              "--cache_dir", str(tmp_path / "cache"))) == EXIT_OK
    assert calls == ["eval index", "runtime", "process group"]
