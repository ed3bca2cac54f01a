"""common/wire.py: every field survives a round trip in both id widths, and every malformed message is a
WireError that names the field; hypothesis feeds decode() arbitrary and mutated bytes."""

from __future__ import annotations

import copy
import dataclasses
import os

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import GenerationConfig
from common.index import CorpusIndex
from common.instances import IGNORE_INDEX, Batch, collate, iter_instances
from common.vocab import SPECIAL_TOKENS, Vocabulary
from common.wire import (DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Header, Message, WireError, decode,
                         encode)

CONFIG = GenerationConfig(max_seq_len=32, max_predictions_per_seq=6, whole_word_mask=True)


def make_vocab(size: int) -> Vocabulary:
    tokens = tuple(SPECIAL_TOKENS) + tuple(f"##p{i}" if i % 4 == 0 else f"w{i}" for i in range(size - 5))
    return Vocabulary(tokens=tokens, is_continuation=np.array([t.startswith("##") for t in tokens]),
                      do_lower_case=True, sha256=f"sha-of-{size}")


SMALL_VOCAB = make_vocab(300)  # uint16 ids, int16 labels
LARGE_VOCAB = make_vocab(70_000)  # int32 ids and labels


def make_batch(vocab: Vocabulary, seed: int = 0) -> Batch:
    """A real batch from the generator; the corpus uses the top ids so that int32 really is needed."""
    rng = np.random.default_rng(seed)
    top = np.arange(vocab.size - 200, vocab.size)
    documents = [[rng.choice(top, int(rng.integers(3, 12))).tolist() for _ in range(int(rng.integers(2, 6)))]
                 for _ in range(8)]
    index = CorpusIndex.from_arrays(documents, dtype=vocab.id_dtype)
    instances = list(iter_instances(index, range(8), CONFIG, vocab, rng))
    return collate(instances, CONFIG, vocab)


def make_header(vocab: Vocabulary) -> Header:
    return Header(producer_id="host-a:4242", worker=3, epoch=7, sequence=123456, epoch_instances=9_876_543,
                  fingerprint=vocab.fingerprint(CONFIG.max_seq_len), seed=(1 << 63) - 1)


VALID = encode(make_header(SMALL_VOCAB), make_batch(SMALL_VOCAB))


@pytest.mark.parametrize("vocab", [SMALL_VOCAB, LARGE_VOCAB], ids=["uint16", "int32"])
def test_round_trip_keeps_every_field(vocab):
    header, batch = make_header(vocab), make_batch(vocab)
    assert batch.input_ids.dtype == vocab.id_dtype
    assert batch.masked_labels.dtype == (np.int16 if vocab.size <= 32768 else np.int32)
    if vocab is LARGE_VOCAB:
        assert int(batch.input_ids.max()) > 65535  # the ids really need the wide type
    data = encode(header, batch)
    message = decode(data)
    assert message.header == header
    width = message.batch.input_ids.shape[1]  # the longest row rounded up to 8, never wider than sent
    assert width == min(CONFIG.max_seq_len, -(-int(batch.lengths.max()) // 8) * 8)
    for name in Batch.FIELDS:
        sent, received = getattr(batch, name), getattr(message.batch, name)
        assert received.dtype == sent.dtype, name
        if name in ("input_ids", "token_type_ids"):
            assert (sent[:, width:] == (SMALL_VOCAB.pad_id if name == "input_ids" else 0)).all()  # padding only
            sent = sent[:, :width]
        np.testing.assert_array_equal(received, sent, err_msg=name)
    assert decode(memoryview(data)).header == header  # zmq frames arrive as buffers
    # encode returns a fresh object each call: zero-copy sends may hold on to an earlier one.
    again = encode(header, batch)
    assert again == data and again is not data


def test_round_trip_of_big_endian_and_non_contiguous_arrays():
    batch = make_batch(SMALL_VOCAB)
    odd = Batch(input_ids=batch.input_ids.astype(">u2"), token_type_ids=np.asfortranarray(batch.token_type_ids),
                lengths=batch.lengths.astype(">u2"), masked_positions=batch.masked_positions,
                masked_labels=batch.masked_labels.astype(">i2"), next_sentence_labels=batch.next_sentence_labels)
    received = decode(encode(make_header(SMALL_VOCAB), odd)).batch
    for name in Batch.FIELDS:
        np.testing.assert_array_equal(getattr(received, name), getattr(batch, name), err_msg=name)


def test_an_instance_without_masked_positions_is_valid():
    """With whole-word masking the seed can skip every word (budget 1, only two-piece words): still a batch."""
    batch = make_batch(SMALL_VOCAB)
    positions, labels = batch.masked_positions.copy(), batch.masked_labels.copy()
    positions[0], labels[0] = 0, IGNORE_INDEX
    empty_row = Batch(batch.input_ids, batch.token_type_ids, batch.lengths, positions, labels,
                      batch.next_sentence_labels)
    received = decode(encode(make_header(SMALL_VOCAB), empty_row)).batch
    assert (received.masked_labels[0] == IGNORE_INDEX).all()


def test_generated_batch_with_unmasked_instances_decodes():
    """End to end: two-piece words only and a budget of 1 leave some instances with nothing masked."""
    vocab = Vocabulary(tokens=tuple(SPECIAL_TOKENS) + ("w", "##x"), is_continuation=np.array([False] * 6 + [True]),
                       do_lower_case=True, sha256="toy")
    w, x = vocab.id_of("w"), vocab.id_of("##x")
    index = CorpusIndex.from_arrays([[[w, x]] * 3 for _ in range(4)])
    config = GenerationConfig(max_seq_len=8, max_predictions_per_seq=1, whole_word_mask=True)
    instances = list(iter_instances(index, range(4), config, vocab, np.random.default_rng(0)))
    assert any(len(inst.masked_positions) == 0 for inst in instances)
    batch = collate(instances, config, vocab)
    received = decode(encode(dataclasses.replace(make_header(vocab), fingerprint=vocab.fingerprint(8)), batch)).batch
    np.testing.assert_array_equal(received.masked_labels, batch.masked_labels)


# --- malformed messages ---------------------------------------------------------------------------------


def fields() -> dict:
    return msgpack.unpackb(VALID, raw=False)


def packed(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def set_array(message: dict, name: str, array: np.ndarray, dtype: str | None = None) -> dict:
    array = np.ascontiguousarray(array)
    message["arrays"][name] = [dtype or array.dtype.str, list(array.shape), array.tobytes()]
    return message


def array_of(message: dict, name: str) -> np.ndarray:
    dtype, shape, data = message["arrays"][name]
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def changed_array(name: str, change) -> callable:
    def mutate(message):
        array = array_of(message, name)
        change(array)
        return set_array(message, name, array)
    return mutate


def narrowed(width: int) -> callable:
    """The token arrays cut to `width` columns, the lengths left as they are."""
    def mutate(message):
        for name in ("input_ids", "token_type_ids"):
            set_array(message, name, array_of(message, name)[:, :width])
        return message
    return mutate


def with_item(path: tuple, value) -> callable:
    def mutate(message):
        target = message
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return message
    return mutate


def without(path: tuple) -> callable:
    def mutate(message):
        target = message
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return message
    return mutate


batch_size = make_batch(SMALL_VOCAB).size
L = CONFIG.max_seq_len

MALFORMED = {
    # protocol and header
    "version 1 (no seed)": (with_item(("v",), 1), "v"),
    "version from the future": (with_item(("v",), PROTOCOL_VERSION + 1), "v"),
    "version true": (with_item(("v",), True), "v"),
    "version 1.0": (with_item(("v",), 1.0), "v"),
    "version missing": (without(("v",)), "v"),
    "worker missing": (without(("worker",)), "worker"),
    "worker bool": (with_item(("worker",), True), "worker"),
    "worker negative": (with_item(("worker",), -1), "worker"),
    "epoch bool": (with_item(("epoch",), False), "epoch"),
    "epoch float": (with_item(("epoch",), 1.0), "epoch"),
    "seq string": (with_item(("seq",), "12"), "seq"),
    "epoch_instances missing": (without(("epoch_instances",)), "epoch_instances"),
    "producer bytes": (with_item(("producer",), b"host"), "producer"),
    "seed missing": (without(("seed",)), "seed"),
    "seed negative": (with_item(("seed",), -1), "seed"),
    "seed above int64": (with_item(("seed",), 1 << 63), "seed"),
    "seed bool": (with_item(("seed",), True), "seed"),
    "seed string": (with_item(("seed",), "42"), "seed"),
    "fingerprint missing": (without(("fingerprint",)), "fingerprint"),
    "fingerprint list": (with_item(("fingerprint",), [1, 2]), "fingerprint"),
    "vocab_size bool": (with_item(("fingerprint", "vocab_size"), True), "fingerprint.vocab_size"),
    "vocab_size zero": (with_item(("fingerprint", "vocab_size"), 0), "fingerprint.vocab_size"),
    "cls_id beyond vocab": (with_item(("fingerprint", "cls_id"), 300), "fingerprint.cls_id"),
    "mask_id missing": (without(("fingerprint", "mask_id")), "fingerprint.mask_id"),
    "do_lower_case int": (with_item(("fingerprint", "do_lower_case"), 1), "fingerprint.do_lower_case"),
    "vocab_sha256 missing": (without(("fingerprint", "vocab_sha256")), "fingerprint.vocab_sha256"),
    "max_seq_len tiny": (with_item(("fingerprint", "max_seq_len"), 4), "fingerprint.max_seq_len"),
    "max_seq_len below the width": (with_item(("fingerprint", "max_seq_len"), 8), "arrays.input_ids"),
    # arrays: presence and encoding
    "arrays missing": (without(("arrays",)), "arrays"),
    "array missing": (without(("arrays", "lengths")), "arrays.lengths"),
    "extra array": (with_item(("arrays", "attention_mask"), ["|u1", [1], b"\x01"]), "arrays"),
    "array not a triple": (with_item(("arrays", "input_ids"), ["<u2", [1, 32]]), "arrays.input_ids"),
    "dtype float": (with_item(("arrays", "input_ids", 0), "<f4"), "arrays.input_ids"),
    "dtype big-endian": (with_item(("arrays", "lengths", 0), ">u2"), "arrays.lengths"),
    "dtype object": (with_item(("arrays", "masked_labels", 0), "|O"), "arrays.masked_labels"),
    "dtype not a string": (with_item(("arrays", "token_type_ids", 0), 7), "arrays.token_type_ids"),
    "shape 3-D": (lambda m: set_array(m, "input_ids", array_of(m, "input_ids").reshape(batch_size, 2, L // 2)),
                  "arrays.input_ids"),
    "shape negative": (with_item(("arrays", "lengths", 1), [-batch_size]), "arrays.lengths"),
    "shape float": (with_item(("arrays", "lengths", 1), [float(batch_size)]), "arrays.lengths"),
    "shape bool": (with_item(("arrays", "next_sentence_labels", 1), [True]), "arrays.next_sentence_labels"),
    "shape vs bytes": (with_item(("arrays", "lengths", 1), [batch_size + 1]), "arrays.lengths"),
    "data not bytes": (with_item(("arrays", "lengths", 2), "abc"), "arrays.lengths"),
    "wider sequence": (lambda m: set_array(m, "input_ids", np.zeros((batch_size, L + 1), "<u2")), "arrays.input_ids"),
    "one row short": (lambda m: set_array(m, "token_type_ids", array_of(m, "token_type_ids")[:-1]),
                      "arrays.token_type_ids"),
    "labels wider than positions": (lambda m: set_array(m, "masked_labels",
                                                        np.full((batch_size, 7), IGNORE_INDEX, "<i2")),
                                    "arrays.masked_labels"),
    "empty batch": (lambda m: set_array(m, "lengths", np.zeros(0, "<u2")), "arrays.lengths"),
    # arrays: values
    "id at vocab size": (changed_array("input_ids", lambda a: a.__setitem__((0, 1), 300)), "arrays.input_ids"),
    "id far beyond": (changed_array("input_ids", lambda a: a.__setitem__((2, 0), 65535)), "arrays.input_ids"),
    "label at vocab size": (changed_array("masked_labels", lambda a: a.__setitem__((1, 0), 300)),
                            "arrays.masked_labels"),
    "label negative": (changed_array("masked_labels", lambda a: a.__setitem__((1, 0), -1)), "arrays.masked_labels"),
    "used slot after an unused one": (changed_array("masked_labels", lambda a: a.__setitem__((0, slice(None)), [
        IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX])), "arrays.masked_labels"),
    "length too short": (changed_array("lengths", lambda a: a.__setitem__(0, 4)), "arrays.lengths"),
    "length beyond max_seq_len": (changed_array("lengths", lambda a: a.__setitem__(0, L + 1)), "arrays.lengths"),
    "rows longer than the arrays' width": (narrowed(8), "arrays.lengths"),
    "token arrays of different widths": (lambda m: set_array(m, "token_type_ids", array_of(m, "token_type_ids")[:, :8]),
                                         "arrays.token_type_ids"),
    "position on [CLS]": (changed_array("masked_positions", lambda a: a.__setitem__((0, 0), 0)),
                          "arrays.masked_positions"),
    "position past the sequence": (changed_array("masked_positions", lambda a: a.__setitem__((0, 0), L)),
                                   "arrays.masked_positions"),
    "token type 2": (changed_array("token_type_ids", lambda a: a.__setitem__((0, 3), 2)), "arrays.token_type_ids"),
    "nsp label 2": (changed_array("next_sentence_labels", lambda a: a.__setitem__(0, 2)),
                    "arrays.next_sentence_labels"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_message_names_the_field(case):
    mutate, field = MALFORMED[case]
    data = packed(mutate(copy.deepcopy(fields())))
    with pytest.raises(WireError) as caught:
        decode(data)
    assert caught.value.field == field, str(caught.value)
    assert str(caught.value).startswith(f"{field}: ")


@pytest.mark.parametrize("data,field", [
    (VALID[: len(VALID) // 2], "message"),
    (VALID[:-1], "message"),
    (VALID + b"\x00", "message"),
    (b"", "message"),
    (packed([1, 2, 3]), "message"),
    (packed(None), "message"),
    (packed({1: 2}), "message"),
    (msgpack.packb({"v": msgpack.ExtType(5, b"x")}), "message"),
])
def test_bytes_that_are_not_a_message(data, field):
    with pytest.raises(WireError) as caught:
        decode(data)
    assert caught.value.field == field


def test_random_bytes_are_refused():
    rng = np.random.default_rng(0)
    for size in (1, 7, 100, 10_000):
        for _ in range(50):
            with pytest.raises(WireError):
                decode(rng.bytes(size))
    with pytest.raises(WireError):
        decode(os.urandom(len(VALID)))


def test_oversized_message_is_refused_before_parsing():
    with pytest.raises(WireError, match=r"exceeds the limit of") as caught:
        decode(VALID, max_message_bytes=len(VALID) - 1)
    assert caught.value.field == "message"
    assert decode(VALID, max_message_bytes=len(VALID)).header.sequence == 123456
    assert DEFAULT_MAX_MESSAGE_BYTES >= 16 << 20


def test_protocol_version_is_in_every_message():
    assert fields()["v"] == PROTOCOL_VERSION


# --- property: decode only ever returns a valid Message or raises WireError ----------------------------------


def assert_valid(message: Message) -> None:
    """What the trainer relies on after decode(): consistent shapes and every value in range."""
    fp, batch = message.header.fingerprint, message.batch
    size, seq, width = batch.size, fp.max_seq_len, batch.input_ids.shape[1]
    assert 1 <= size and batch.input_ids.shape == batch.token_type_ids.shape == (size, width) and width <= seq
    assert batch.masked_positions.shape == batch.masked_labels.shape and batch.masked_positions.shape[0] == size
    assert batch.lengths.shape == batch.next_sentence_labels.shape == (size,)
    assert (batch.lengths >= 5).all() and (batch.lengths <= width).all()
    assert int(batch.input_ids.max()) < fp.vocab_size
    used = batch.masked_labels != IGNORE_INDEX
    assert ((batch.masked_labels[used] >= 0) & (batch.masked_labels[used] < fp.vocab_size)).all()
    positions, last = batch.masked_positions.astype(int), np.broadcast_to(batch.lengths[:, None] - 1, used.shape)
    assert ((positions[used] >= 1) & (positions[used] < last[used])).all()
    assert type(message.header.worker) is int and type(message.header.producer_id) is str
    assert decode(encode(message.header, batch)).header == message.header


def decode_or_wire_error(data: bytes) -> None:
    try:
        message = decode(data)
    except WireError:
        return
    assert_valid(message)


PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.binary(max_size=2048))
def test_decode_of_arbitrary_bytes(data):
    decode_or_wire_error(data)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_decode_of_flipped_and_truncated_messages(flips, keep):
    data = bytearray(VALID)
    for at, xor in flips:
        data[at] ^= xor
    decode_or_wire_error(bytes(data))
    decode_or_wire_error(bytes(data[:keep]))
    decode_or_wire_error(VALID[:keep])


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def paths_of(value, prefix=()):
    """Every key path into the nested message, so a mutation can hit any field at any depth."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from paths_of(child, prefix + (i,))


ALL_PATHS = [p for p in paths_of(fields()) if p]
# Small integers near the boundaries are the interesting replacements for ids, lengths and shapes.
boundary_ints = st.sampled_from([-101, -100, -1, 0, 1, 4, 5, 31, 32, 33, 299, 300, 65535, 65536, 1 << 62])


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), msgpack_values | boundary_ints, st.booleans()),
                min_size=1, max_size=3))
def test_decode_of_field_level_mutations(mutations):
    message = fields()
    for path, value, delete in mutations:
        parent = message
        try:
            for key in path[:-1]:
                parent = parent[key]
            if delete and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    decode_or_wire_error(packed(message))


@PROPERTY_SETTINGS
@given(st.data())
def test_decode_of_array_value_mutations(data):
    """Valid structure, arbitrary array contents: every value check must hold or name its array."""
    message = fields()
    name = data.draw(st.sampled_from(Batch.FIELDS))
    array = array_of(message, name)
    flat = array.reshape(-1)
    info = np.iinfo(array.dtype)
    for _ in range(data.draw(st.integers(1, 4))):
        flat[data.draw(st.integers(0, len(flat) - 1))] = data.draw(st.integers(int(info.min), int(info.max)))
    decode_or_wire_error(packed(set_array(message, name, array)))
