"""The masked-positions MLM head against BertForPreTraining's own forward pass, and the optimizer groups."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from common.instances import IGNORE_INDEX, Batch
from common.lengths import Widths, fit_width, multiple_widths, trim
from trainer.model import load_model, parameter_groups, pretraining_loss, stock_pretraining_loss
from trainer.source import to_tensors
from trainer_support import real_batches


@pytest.fixture(scope="module")
def raw_batch(tiny_model_dir, tmp_path_factory) -> Batch:
    """12 real instances at max_seq_len 64, padded to it."""
    from conftest import write_corpus

    tmp = tmp_path_factory.mktemp("model_batch")
    corpus = write_corpus(tmp / "corpus.txt")
    (b,) = real_batches(tiny_model_dir, corpus, tmp / "cache", batch_size=12, count=1, max_seq_len=64)
    # One instance with no masked position at all (whole-word masking can produce it): it must add nothing.
    labels, positions = b.masked_labels.copy(), b.masked_positions.copy()
    labels[3], positions[3] = IGNORE_INDEX, 0
    return Batch(b.input_ids, b.token_type_ids, b.lengths, positions, labels, b.next_sentence_labels)


@pytest.fixture(scope="module")
def batch(raw_batch):
    """The batch as the model gets it on the device (int64)."""
    return to_tensors(raw_batch, pin_memory=False).to(torch.device("cpu"))


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


def test_masked_head_ignores_padding_slots(tiny_model_dir, raw_batch, batch):
    """Widening the prediction slots with -100 padding changes nothing: the loss is over labelled slots only."""
    model = load_model(tiny_model_dir)
    model.eval()
    pad = 7
    wider = to_tensors(replace(
        raw_batch, masked_positions=np.pad(raw_batch.masked_positions, ((0, 0), (0, pad))),
        masked_labels=np.pad(raw_batch.masked_labels, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)),
        pin_memory=False).to(torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(pretraining_loss(model, wider).loss, pretraining_loss(model, batch).loss)


@pytest.mark.parametrize("loss_fn", [pretraining_loss, stock_pretraining_loss], ids=["masked_head", "stock"])
def test_a_batch_padded_to_its_longest_row_trains_as_one_padded_to_max_seq_len(tiny_model_dir, raw_batch, loss_fn):
    """The same loss and every gradient whether the padding columns past the longest row are there or not: a
    padded position is never attended to as a key and carries no label, so it adds nothing to either."""
    model = load_model(tiny_model_dir)
    model.eval()  # no dropout: both passes must see the same network
    keep = np.flatnonzero(raw_batch.lengths < 56)  # rows of 30 to 53 tokens, the one without masks among them
    short = Batch(**{name: getattr(raw_batch, name)[keep] for name in Batch.FIELDS})
    assert len(keep) >= 4 and 3 in keep
    longest = int(short.lengths.max())
    widths = Widths(multiple_widths(64))
    assert widths.of(longest) < 64  # padding columns to cut
    full = to_tensors(short, pin_memory=False).to(torch.device("cpu"))
    cut = to_tensors(trim(short, widths, pad_id=0), pin_memory=False).to(torch.device("cpu"))
    exact = to_tensors(fit_width(short, longest, pad_id=0), pin_memory=False).to(torch.device("cpu"))
    assert cut.width == widths.of(longest) and exact.width == longest and full.width == 64
    full_out, full_grads = grads_after(model, loss_fn, full)
    for narrow in (cut, exact):
        out, grads = grads_after(model, loss_fn, narrow)
        torch.testing.assert_close(out.loss, full_out.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.mlm_loss, full_out.mlm_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.nsp_loss, full_out.nsp_loss, rtol=1e-5, atol=1e-6)
        assert int(out.mlm_correct) == int(full_out.mlm_correct) and int(out.nsp_correct) == int(full_out.nsp_correct)
        assert set(grads) == set(full_grads)
        for name in full_grads:
            torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


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
