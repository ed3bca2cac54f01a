"""Batches ↔ bytes: one versioned msgpack message per batch, validated field by field, never unpickled.

A message is a msgpack map: protocol version `v`, a header (producer id, the producer's seed, worker,
epoch, sequence number, the instances of a full epoch) with the fingerprint the trainer must agree with,
and the batch's arrays as `[dtype, shape, raw little-endian bytes]`. The token arrays are only as wide as the
batch's longest row (rounded up to 8), not `max_seq_len`: padding is not worth sending. Decoding trusts
nothing: every type, dtype, shape, size and value range is checked against the message's own fingerprint, and
any failure is a `WireError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import msgpack
import numpy as np

from common.instances import IGNORE_INDEX, Batch
from common.lengths import PAD_MULTIPLE, round_up
from common.vocab import Fingerprint

# 2: the header's `seed` became required. A version 1 trainer would take such messages without reading the
# seed (it ignores keys it does not know), so it could never warn about two producers repeating each other;
# a version 2 trainer would reject every version 1 message for the missing field. The bump makes both
# mismatches one clear "protocol version" line instead.
# 3: the token arrays may be narrower than max_seq_len (down to the longest row). A version 2 trainer would
# reject every such message for its shape, one warning per few seconds; the bump says why in one line.
PROTOCOL_VERSION = 3
MAX_SEED = (1 << 63) - 1  # seeds are non-negative and fit an int64 (what numpy and torch can take whole)
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # a 4096 x 512 batch is ~9 MB; anything far above is not ours
MAX_BATCH = 65536
MAX_SEQ_LEN = 8192
MAX_VOCAB = 1 << 24
MAX_BLEND = 64  # corpora of a blend (the header lists one count per corpus)

# The dtypes each array may arrive in (the smallest that hold it, chosen by the vocabulary size).
_DTYPES = {
    "input_ids": ("<u2", "<i4"),
    "token_type_ids": ("|u1",),
    "lengths": ("<u2",),
    "masked_positions": ("<u2",),
    "masked_labels": ("<i2", "<i4"),
    "next_sentence_labels": ("|u1",),
}


class WireError(ValueError):
    """A message that is not a valid bertstream batch; `field` names the part that is wrong."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Header:
    producer_id: str  # host:pid of the producer, for logs and per-producer error counts
    worker: int
    epoch: int
    sequence: int  # per-worker message counter, from 0
    epoch_instances: int  # instances in a full epoch of this stream (what the trainer's step count is based on)
    fingerprint: Fingerprint
    seed: int  # the producer's --seed (given or drawn): the trainer warns when two producers share one
    # Instances of this message from each corpus of a blend (--corpus_weights), in --train_corpus order; None
    # (absent on the wire) without a blend. Optional, so a producer without blends sends the same bytes as before.
    blend: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Message:
    header: Header
    batch: Batch


def encode(header: Header, batch: Batch) -> bytes:
    """A fresh bytes object each call, so ZeroMQ's zero-copy send never sees a buffer we later change.

    The token arrays are cut to the longest row rounded up to PAD_MULTIPLE (never widened): at seq 512 on short
    documents that leaves out four fifths of the bytes, all of them padding.
    """
    width = min(batch.input_ids.shape[1], round_up(int(batch.lengths.max()), PAD_MULTIPLE))
    arrays = {}
    for name in Batch.FIELDS:
        array = getattr(batch, name)
        if name in ("input_ids", "token_type_ids"):
            array = array[:, :width]
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        arrays[name] = [little.dtype.str, list(little.shape), little.tobytes()]
    return msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "producer": header.producer_id,
            "seed": header.seed,
            "worker": header.worker,
            "epoch": header.epoch,
            "seq": header.sequence,
            "epoch_instances": header.epoch_instances,
            "fingerprint": asdict(header.fingerprint),
            "arrays": arrays,
            **({} if header.blend is None else {"blend": list(header.blend)}),  # only a blend's producer sends it
        },
        use_bin_type=True,
    )


def decode(data: bytes | memoryview, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """The message in `data`, or a WireError; arrays are read-only views of `data`."""
    if len(data) > max_message_bytes:
        raise WireError("message", f"{len(data)} bytes exceeds the limit of {max_message_bytes}")
    try:
        message = msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, max_bin_len=max_message_bytes,
            max_str_len=4096, max_array_len=64, max_map_len=64, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several types for malformed input; all mean the same here
        raise WireError("message", f"not a valid msgpack message ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict):
        raise WireError("message", f"expected a map, got {type(message).__name__}")
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True and 1.0 compare equal to 1
        raise WireError("v", f"protocol version {version!r}; this build speaks {PROTOCOL_VERSION}")
    fingerprint = _fingerprint(_get(message, "fingerprint", dict))
    header = Header(
        producer_id=_get(message, "producer", str),
        worker=_int(message, "worker", 0, 1 << 16),
        epoch=_int(message, "epoch", 0, 1 << 40),
        sequence=_int(message, "seq", 0, 1 << 62),
        epoch_instances=_int(message, "epoch_instances", 0, 1 << 50),
        fingerprint=fingerprint,
        seed=_int(message, "seed", 0, MAX_SEED),
    )
    batch = _batch(_get(message, "arrays", dict), fingerprint)
    if "blend" in message:  # optional: only a blend's producer sends it
        header = replace(header, blend=_blend(message, batch.size))
    return Message(header, batch)


def _blend(message: dict, size: int) -> tuple[int, ...]:
    """Per-corpus instance counts: 2 to MAX_BLEND non-negative ints that add up to the batch size."""
    counts = _get(message, "blend", list)
    if not 2 <= len(counts) <= MAX_BLEND:
        raise WireError("blend", f"{len(counts)} corpora; a blend has 2 to {MAX_BLEND}")
    for i, count in enumerate(counts):
        if type(count) is not int or not 0 <= count <= MAX_BATCH:  # exact: a bool is not a count
            raise WireError(f"blend[{i}]", f"expected an integer in [0, {MAX_BATCH}], got {count!r}")
    if sum(counts) != size:
        raise WireError("blend", f"counts add up to {sum(counts)}, the batch has {size} instances")
    return tuple(counts)


def _get(mapping: dict, key: str, kind: type, where: str = ""):
    value = mapping.get(key)
    if type(value) is not kind:  # exact: bool is an int subclass and must not pass for one
        raise WireError(where + key, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _int(mapping: dict, key: str, low: int, high: int, where: str = "") -> int:
    value = _get(mapping, key, int, where)
    if not low <= value <= high:
        raise WireError(where + key, f"{value} is outside [{low}, {high}]")
    return value


def _fingerprint(raw: dict) -> Fingerprint:
    where = "fingerprint."
    vocab_size = _int(raw, "vocab_size", 1, MAX_VOCAB, where)
    ids = {name: _int(raw, name, 0, vocab_size - 1, where) for name in ("cls_id", "sep_id", "mask_id", "pad_id")}
    return Fingerprint(
        vocab_size=vocab_size,
        vocab_sha256=_get(raw, "vocab_sha256", str, where),
        do_lower_case=_get(raw, "do_lower_case", bool, where),
        max_seq_len=_int(raw, "max_seq_len", 8, MAX_SEQ_LEN, where),
        **ids,
    )


def _array(arrays: dict, name: str) -> np.ndarray:
    entry = arrays.get(name)
    field = f"arrays.{name}"
    if type(entry) is not list or len(entry) != 3:
        raise WireError(field, "expected [dtype, shape, bytes]")
    dtype, shape, data = entry
    if dtype not in _DTYPES[name]:
        raise WireError(field, f"dtype {dtype!r} not allowed (expected one of {_DTYPES[name]})")
    if type(shape) is not list or not 1 <= len(shape) <= 2 or any(type(d) is not int or d < 0 for d in shape):
        raise WireError(field, f"bad shape {shape!r}")
    if type(data) is not bytes:
        raise WireError(field, f"data must be bytes, got {type(data).__name__}")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise WireError(field, f"{len(data)} bytes for shape {shape} of {dtype} (expected {expected})")
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)


def _batch(arrays: dict, fp: Fingerprint) -> Batch:
    unexpected = set(arrays) - set(Batch.FIELDS)
    if unexpected:
        raise WireError("arrays", f"unexpected arrays {sorted(map(str, unexpected))}")
    a = {name: _array(arrays, name) for name in Batch.FIELDS}
    size, seq = len(a["lengths"]) if a["lengths"].ndim == 1 else -1, fp.max_seq_len
    if not 1 <= size <= MAX_BATCH:
        raise WireError("arrays.lengths", f"batch size {size} outside [1, {MAX_BATCH}] or not 1-D")
    width = a["input_ids"].shape[-1]  # as wide as the longest row or wider, up to max_seq_len
    if not 1 <= width <= seq:
        raise WireError("arrays.input_ids", f"{width} positions wide; max_seq_len is {seq}")
    preds = a["masked_positions"].shape[-1]
    shapes = {
        "input_ids": (size, width), "token_type_ids": (size, width), "lengths": (size,),
        "masked_positions": (size, preds), "masked_labels": (size, preds), "next_sentence_labels": (size,),
    }
    for name, shape in shapes.items():
        if a[name].shape != shape:
            raise WireError(f"arrays.{name}", f"shape {list(a[name].shape)}, expected {list(shape)}")
    if not 1 <= preds <= seq:
        raise WireError("arrays.masked_positions", f"{preds} prediction slots for max_seq_len {seq}")

    lengths = a["lengths"].astype(np.int64)
    _check(lengths.min() >= 5 and lengths.max() <= width, "lengths",
           f"values must be in [5, {width}] (the arrays' width; max_seq_len {seq})")
    ids = a["input_ids"]
    _check(int(ids.min()) >= 0 and int(ids.max()) < fp.vocab_size, "input_ids",
           f"ids must be in [0, {fp.vocab_size})")
    _check(int(a["token_type_ids"].max()) <= 1, "token_type_ids", "values must be 0 or 1")
    _check(int(a["next_sentence_labels"].max()) <= 1, "next_sentence_labels", "values must be 0 or 1")
    labels, positions = a["masked_labels"], a["masked_positions"].astype(np.int64)
    used = labels != IGNORE_INDEX
    _check(bool(np.all((labels[used] >= 0) & (labels[used] < fp.vocab_size))), "masked_labels",
           f"labels must be in [0, {fp.vocab_size}) or {IGNORE_INDEX}")
    # An instance may have no masked position: with whole-word masking the seed skips every word longer than
    # the budget, so a short pair of multi-piece words gets none. Used slots come first, as collate fills them.
    _check(not bool(np.any(~used[:, :-1] & used[:, 1:])), "masked_labels", "a used slot follows an unused one")
    in_sequence = (positions >= 1) & (positions < (lengths - 1)[:, None])
    _check(bool(np.all(in_sequence[used])), "masked_positions", "positions must lie inside each sequence")
    return Batch(**a)


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise WireError(f"arrays.{name}", problem)
