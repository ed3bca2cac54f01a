"""common/vocab.py: model directories, the torch-free tokenizer (bare ids, the user's lower-casing), and the
vocabulary fingerprint both sides compare."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from common.vocab import (SPECIAL_TOKENS, Fingerprint, ModelNotFoundError, Vocabulary, default_cache_dir,
                          load_tokenizer, model_max_positions, resolve_model_dir)
from conftest import REPO, tiny_vocab

TEXTS = [
    "The river stones were shining quietly.",
    "Alpha BRAVO charlie, Delta-echo; (foxtrot)!",
    "Café naïve Über résumé — «quoted» text.",
    "Mixed 中文字符 and tabs\tand\u00a0spaces, control\x07chars.",
    "supercalifragilisticexpialidocious " * 3,
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_vocab")
    (directory / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    return directory


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# --- model directories ----------------------------------------------------------------------------------


def test_resolve_a_local_directory(vocab_dir):
    assert resolve_model_dir(str(vocab_dir)) == vocab_dir


def test_resolve_errors_name_the_flag_and_the_problem(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"--bert_model .*missing: not a model directory"):
        resolve_model_dir(str(tmp_path / "missing"))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="directory has neither vocab.txt nor tokenizer.json"):
        resolve_model_dir(str(empty))
    a_file = tmp_path / "vocab.txt"
    a_file.write_text("[PAD]\n")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model_dir(str(a_file))
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_hub_name_offline_fails_fast_with_a_helpful_message(tmp_path):
    """No download and no hang: a fresh process with HF_HUB_OFFLINE=1 and an empty hub cache."""
    script = textwrap.dedent("""
        from common.vocab import ModelNotFoundError, resolve_model_dir
        try:
            resolve_model_dir("bertstream-tests/no-such-model")
        except ModelNotFoundError as exc:
            print("ERROR:", exc)
        else:
            print("RESOLVED")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("ERROR: --bert_model bertstream-tests/no-such-model"), out
    assert "Pass a directory holding vocab.txt or tokenizer.json" in out
    assert not (tmp_path / "hf" / "hub" / "models--bertstream-tests--no-such-model" / "snapshots").exists()


def test_model_max_positions(tmp_path, vocab_dir):
    assert model_max_positions(vocab_dir) is None
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    assert model_max_positions(tmp_path) == 256


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "bertstream"


# --- tokenizer ------------------------------------------------------------------------------------------


def test_do_lower_case_is_the_users_flag(vocab_dir):
    lower, cased = load_tokenizer(vocab_dir, True), load_tokenizer(vocab_dir, False)
    text = "River Stone"
    assert ids(lower, text) == ids(lower, "river stone")
    assert ids(cased, text) != ids(lower, text)  # the tiny vocabulary has no capitals: [UNK] when cased
    assert ids(cased, "river stone") == ids(lower, "river stone")


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_tokenizer_matches_the_seeds_bert_tokenizer(real_model_dir, do_lower_case):
    """The seed tokenized with BertTokenizer(vocab, do_lower_case); ours must give the same ids, accents,
    Chinese characters and control characters included, whatever the tokenizer.json says about casing."""
    try:  # transformers 5 keeps the pure-Python tokenizer (the seed's) under this name
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as BertTokenizer
    except ImportError:  # transformers 4: BertTokenizer is the pure-Python one
        from transformers import BertTokenizer

    seed = BertTokenizer(str(real_model_dir / "vocab.txt"), do_lower_case=do_lower_case)
    assert "Tokenizers" not in type(seed).__mro__[1].__name__
    ours = load_tokenizer(real_model_dir, do_lower_case)
    for text in TEXTS:
        assert ids(ours, text) == seed.encode(text, add_special_tokens=False), text


def test_tokenizer_json_with_padding_and_truncation_gives_bare_ids(tmp_path, vocab_dir):
    """A tokenizer.json saved with padding and truncation switched on (as sentence-transformers ship theirs)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    configured = BertWordPieceTokenizer(str(vocab_dir / "vocab.txt"), lowercase=True)
    configured.enable_padding(length=24, pad_id=0, pad_token="[PAD]")
    configured.enable_truncation(max_length=8)
    model = tmp_path / "json_only"
    model.mkdir()
    configured.save(str(model / "tokenizer.json"))
    assert json.loads((model / "tokenizer.json").read_text())["padding"] is not None
    assert len(configured.encode("river").ids) == 24  # the file really pads...
    assert len(configured.encode(TEXTS[0] * 3).ids) == 24  # ...and truncates (then pads to 24)

    from_json, from_vocab = load_tokenizer(model, True), load_tokenizer(vocab_dir, True)
    for text in TEXTS + [TEXTS[0] * 5, "river"]:
        bare = ids(from_json, text)
        assert bare == ids(from_vocab, text), text
        assert 0 not in bare and 2 not in bare and 3 not in bare  # no [PAD], [CLS] or [SEP]
    assert len(ids(from_json, TEXTS[0] * 5)) > 24
    assert len(from_json.encode_batch(["river", TEXTS[0]], add_special_tokens=False)[0].ids) == 1


# --- vocabulary and fingerprint --------------------------------------------------------------------------


def test_vocabulary_tables(vocab_dir):
    vocab = Vocabulary.from_tokenizer(load_tokenizer(vocab_dir, True), True)
    tokens = tiny_vocab()
    assert vocab.tokens == tuple(tokens) and vocab.size == len(tokens)
    assert [vocab.cls_id, vocab.sep_id, vocab.mask_id, vocab.pad_id] == [tokens.index(t) for t in
                                                                         ("[CLS]", "[SEP]", "[MASK]", "[PAD]")]
    assert vocab.is_continuation.dtype == bool
    assert np.flatnonzero(vocab.is_continuation).tolist() == [i for i, t in enumerate(tokens) if t.startswith("##")]
    assert vocab.id_dtype == np.uint16
    assert vocab.id_of("river") == tokens.index("river")


def test_sha_and_fingerprint_are_stable(tmp_path, vocab_dir):
    from tokenizers.implementations import BertWordPieceTokenizer

    first = Vocabulary.from_tokenizer(load_tokenizer(vocab_dir, True), True)
    again = Vocabulary.from_tokenizer(load_tokenizer(vocab_dir, True), True)
    # The same vocabulary as tokenizer.json: the same hash, whichever file it came from.
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    BertWordPieceTokenizer(str(vocab_dir / "vocab.txt"), lowercase=True).save(str(json_dir / "tokenizer.json"))
    from_json = Vocabulary.from_tokenizer(load_tokenizer(json_dir, True), True)
    expected = hashlib.sha256("\n".join(tiny_vocab()).encode("utf-8")).hexdigest()
    assert first.sha256 == again.sha256 == from_json.sha256 == expected
    assert first.fingerprint(128) == again.fingerprint(128) == from_json.fingerprint(128)
    assert first.fingerprint(128).mismatches(first.fingerprint(64)) == []  # max_seq_len may differ


def test_fingerprint_mismatches_name_each_field(vocab_dir, tmp_path):
    ours = Vocabulary.from_tokenizer(load_tokenizer(vocab_dir, True), True).fingerprint(128)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "vocab.txt").write_text("\n".join(tiny_vocab() + ["extra"]) + "\n", encoding="utf-8")
    theirs = Vocabulary.from_tokenizer(load_tokenizer(other_dir, False), False).fingerprint(128)
    problems = ours.mismatches(theirs)
    assert [p.split(":")[0] for p in problems] == ["vocab_size", "vocab_sha256", "do_lower_case"]
    assert problems[2] == "do_lower_case: True vs False"
    assert isinstance(ours, Fingerprint)


def test_vocabulary_refuses_missing_special_tokens(tmp_path):
    from tokenizers.implementations import BertWordPieceTokenizer

    tokens = [t for t in tiny_vocab() if t != "[MASK]"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tokenizer = BertWordPieceTokenizer(str(tmp_path / "vocab.txt"))._tokenizer
    with pytest.raises(ValueError, match=r"lacks the BERT special tokens \['\[MASK\]'\]"):
        Vocabulary.from_tokenizer(tokenizer, True)


def test_large_vocabulary_uses_int32_ids():
    tokens = tuple(SPECIAL_TOKENS) + tuple(f"w{i}" for i in range(65_531))
    assert len(tokens) == 65_536
    fits = Vocabulary(tokens=tokens, is_continuation=np.zeros(len(tokens), bool), do_lower_case=True, sha256="x")
    assert fits.id_dtype == np.uint16
    grown = Vocabulary(tokens=tokens + ("one more",), is_continuation=np.zeros(len(tokens) + 1, bool),
                       do_lower_case=True, sha256="y")
    assert grown.id_dtype == np.int32
