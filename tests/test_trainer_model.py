"""The masked-positions MLM head against BertForPreTraining's own forward pass, and the optimizer groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.instances import IGNORE_INDEX, Batch
from trainer.model import load_model, parameter_groups, pretraining_loss, stock_pretraining_loss
from trainer.source import to_tensors
from trainer_support import real_batches


@pytest.fixture(scope="module")
def batch(tiny_model_dir, tmp_path_factory):
    from conftest import write_corpus

    tmp = tmp_path_factory.mktemp("model_batch")
    corpus = write_corpus(tmp / "corpus.txt")
    (b,) = real_batches(tiny_model_dir, corpus, tmp / "cache", batch_size=12, count=1, max_seq_len=64)
    # One instance with no masked position at all (whole-word masking can produce it): it must add nothing.
    labels, positions = b.masked_labels.copy(), b.masked_positions.copy()
    labels[3], positions[3] = IGNORE_INDEX, 0
    return to_tensors(Batch(b.input_ids, b.token_type_ids, b.lengths, positions, labels, b.next_sentence_labels),
                      pin_memory=False)


def grads_after(model, loss_fn, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = loss_fn(model, batch)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_head_gives_the_stock_loss_and_gradients(tiny_model_dir, batch):
    model = load_model(tiny_model_dir)
    model.eval()  # no dropout: both passes must see the same network
    ours, our_grads = grads_after(model, pretraining_loss, batch)
    stock, stock_grads = grads_after(model, stock_pretraining_loss, batch)

    assert batch.masked_labels.ne(IGNORE_INDEX).sum() > 0
    assert batch.attention_mask.eq(0).any()  # padded rows: the attention masks must agree too
    torch.testing.assert_close(ours.loss, stock.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.mlm_loss, stock.mlm_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.nsp_loss, stock.nsp_loss, rtol=1e-5, atol=1e-6)
    assert int(ours.mlm_correct) == int(stock.mlm_correct)
    assert int(ours.mlm_count) == int(stock.mlm_count) == int(batch.masked_labels.ne(IGNORE_INDEX).sum())
    assert set(our_grads) == set(stock_grads)
    for name in stock_grads:
        torch.testing.assert_close(our_grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # The tied decoder really is the word embedding, so its gradient is the sum of both uses.
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_dense_labels_put_each_label_at_its_position(batch):
    dense = batch.dense_mlm_labels()
    assert dense.shape == batch.input_ids.shape
    used = batch.masked_labels != IGNORE_INDEX
    rows = torch.arange(batch.size)[:, None].expand_as(batch.masked_positions)
    assert torch.equal(dense[rows[used], batch.masked_positions[used]], batch.masked_labels[used])
    assert int(dense.ne(IGNORE_INDEX).sum()) == int(used.sum())
    assert bool(dense[3].eq(IGNORE_INDEX).all())  # the instance without masks


def test_masked_head_ignores_padding_slots(tiny_model_dir, batch):
    """Widening the prediction slots with -100 padding changes nothing: the loss is over labelled slots only."""
    model = load_model(tiny_model_dir)
    model.eval()
    pad = 7
    wider = to_tensors(Batch(
        input_ids=batch.input_ids.numpy(), token_type_ids=batch.token_type_ids.numpy(),
        lengths=batch.attention_mask.sum(1).numpy().astype(np.uint16),
        masked_positions=np.pad(batch.masked_positions.numpy(), ((0, 0), (0, pad))),
        masked_labels=np.pad(batch.masked_labels.numpy(), ((0, 0), (0, pad)), constant_values=IGNORE_INDEX),
        next_sentence_labels=batch.next_sentence_labels.numpy()), pin_memory=False)
    with torch.no_grad():
        torch.testing.assert_close(pretraining_loss(model, wider).loss, pretraining_loss(model, batch).loss)


def test_no_weight_decay_on_biases_and_layernorm(tiny_model_dir):
    model = load_model(tiny_model_dir)
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("bias") or "LayerNorm" in n for n in no_decay_names)
    assert "bert.embeddings.LayerNorm.weight" in no_decay_names
    assert "bert.encoder.layer.0.attention.self.query.bias" in no_decay_names
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay_names
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))  # tied weights once


def test_model_uses_sdpa_attention(tiny_model_dir):
    assert load_model(tiny_model_dir).config._attn_implementation == "sdpa"
