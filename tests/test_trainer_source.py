"""Re-slicing producers' batches into the trainer's micro-batches, and the in-memory source's resumable position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.instances import IGNORE_INDEX, Batch
from trainer.source import MemorySource, Reslicer, concat_batches, to_tensors


def numbered_batch(first: int, size: int, preds: int = 3, seq: int = 8) -> Batch:
    """Rows recognisable by their first token id (first, first + 1, ...)."""
    ids = np.zeros((size, seq), dtype=np.uint16)
    ids[:, 0] = np.arange(first, first + size)
    labels = np.full((size, preds), IGNORE_INDEX, dtype=np.int16)
    labels[:, 0] = ids[:, 0]
    return Batch(input_ids=ids, token_type_ids=np.zeros((size, seq), np.uint8),
                 lengths=np.full(size, seq, np.uint16), masked_positions=np.ones((size, preds), np.uint16),
                 masked_labels=labels, next_sentence_labels=(ids[:, 0] % 2).astype(np.uint8))


@pytest.mark.parametrize("incoming", [[5, 5, 5, 5], [1] * 13, [13], [3, 7, 2, 9, 1], [16, 4]])
def test_reslicer_makes_exact_micro_batches_in_order(incoming):
    reslicer, out, first = Reslicer(4), [], 0
    for size in incoming:
        out += reslicer.push(numbered_batch(first, size))
        first += size
    total = sum(incoming)
    assert [b.size for b in out] == [4] * (total // 4)
    rows = np.concatenate([b.input_ids[:, 0] for b in out]) if out else np.zeros(0)
    assert rows.tolist() == list(range(total // 4 * 4))  # every instance once, in arrival order
    for b in out:  # the arrays stay row-aligned through slicing and joining
        assert np.array_equal(b.masked_labels[:, 0], b.input_ids[:, 0])
        assert np.array_equal(b.next_sentence_labels, b.input_ids[:, 0] % 2)


def test_concat_pads_prediction_slots_to_the_widest():
    joined = concat_batches([numbered_batch(0, 2, preds=3), numbered_batch(2, 3, preds=5)])
    assert joined.masked_positions.shape == joined.masked_labels.shape == (5, 5)
    assert (joined.masked_labels[:2, 3:] == IGNORE_INDEX).all() and (joined.masked_positions[:2, 3:] == 0).all()
    assert joined.masked_labels[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_to_tensors_keeps_the_compact_dtypes_and_the_device_gets_int64():
    batch = numbered_batch(0, 3)
    batch.lengths[:] = [8, 6, 5]
    batch.input_ids[0, :2] = [40000, 65535]  # uint16 ids above int16's range survive the int16 transfer
    tensors = to_tensors(batch, pin_memory=False)
    assert tensors.input_ids.dtype == torch.int16 and tensors.token_type_ids.dtype == torch.uint8
    assert tensors.input_ids.element_size() * tensors.input_ids.numel() == batch.input_ids.nbytes
    assert tensors.tokens == 19
    wide = tensors.to(torch.device("cpu"))
    assert all(getattr(wide, f).dtype == torch.int64 for f in wide.ARRAYS)
    assert wide.input_ids.numpy().tolist() == batch.input_ids.astype(np.int64).tolist()
    assert wide.masked_labels.numpy().tolist() == batch.masked_labels.astype(np.int64).tolist()  # -100 kept
    assert wide.attention_mask.sum(1).tolist() == [8, 6, 5] and wide.tokens == 19


def test_memory_source_resumes_at_its_position():
    batches = [numbered_batch(0, 5), numbered_batch(5, 3), numbered_batch(8, 6)]
    straight = MemorySource(batches, micro_batch_size=4)
    expected = [straight.next_batch().input_ids[:, 0].tolist() for _ in range(9)]
    assert expected[0] == [0, 1, 2, 3] and expected[3] == [12, 13, 0, 1]  # cycles through the list

    first = MemorySource(batches, micro_batch_size=4)
    for _ in range(4):
        first.next_batch()
    resumed = MemorySource(batches, micro_batch_size=4)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.next_batch().input_ids[:, 0].tolist() for _ in range(5)] == expected[4:]
