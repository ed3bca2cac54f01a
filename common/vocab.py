"""The tokenizer and vocabulary of `--bert_model`, loaded without torch, and the fingerprint both sides agree on.

The producer must start fast and stay small, so it never imports `transformers` (which pulls in torch): it
reads the model directory's `tokenizer.json` (or `vocab.txt`) with the Rust `tokenizers` library directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Files a tokenizer needs; enough to resolve a hub name without downloading any weights.
_TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"]
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ModelNotFoundError(FileNotFoundError):
    """`--bert_model` is neither a local model directory nor a name the hub cache can resolve."""


def resolve_model_dir(bert_model: str) -> Path:
    """A local directory as given, else the hub snapshot of that name (from the local cache when offline)."""
    path = Path(bert_model).expanduser()
    if path.is_dir():
        if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"--bert_model {bert_model}: directory has neither vocab.txt nor tokenizer.json")
        return path
    if path.exists() or bert_model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"--bert_model {bert_model}: not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(bert_model, allow_patterns=_TOKENIZER_FILES))
    except Exception as exc:  # offline, unknown name, no network: all end the same way for the user
        raise ModelNotFoundError(
            f"--bert_model {bert_model}: not a local directory and not resolvable on the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Pass a directory holding vocab.txt or tokenizer.json "
            "(for example from save_pretrained), or run once with network access to fill the hub cache."
        ) from exc


def load_tokenizer(model_dir: Path, do_lower_case: bool):
    """The fast WordPiece tokenizer of `model_dir`, producing bare token ids (no specials, padding or truncation)."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.implementations import BertWordPieceTokenizer

    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # Lower-casing is the user's flag, as in the seed (`BertTokenizer(..., do_lower_case=...)`), not the file's.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=do_lower_case
        )
    else:
        tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=do_lower_case)._tokenizer
    # Sentence-transformers ship tokenizer.json with padding and truncation at 128 switched on: that would
    # silently pad every sentence to 128 ids or cut long ones.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.post_processor = None
    return tokenizer


@dataclass(frozen=True)
class Fingerprint:
    """What producer and trainer must agree on before a batch may train the model."""

    vocab_size: int
    vocab_sha256: str
    do_lower_case: bool
    max_seq_len: int
    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int

    def mismatches(self, other: "Fingerprint") -> list[str]:
        """Human-readable `field: ours vs theirs` for every field that differs (max_seq_len excluded)."""
        return [
            f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in self.__dataclass_fields__
            if name != "max_seq_len" and getattr(self, name) != getattr(other, name)
        ]


@dataclass(frozen=True)
class Vocabulary:
    """Id ↔ token tables and the whole-word table, computed once per vocabulary."""

    tokens: tuple[str, ...]  # id -> token string
    is_continuation: np.ndarray  # (vocab_size,) bool: the token is a `##` piece that joins the previous word
    do_lower_case: bool
    sha256: str

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self._ids[token]

    @property
    def _ids(self) -> dict[str, int]:
        cached = self.__dict__.get("_ids_cache")
        if cached is None:
            cached = {token: i for i, token in enumerate(self.tokens)}
            object.__setattr__(self, "_ids_cache", cached)
        return cached

    @property
    def cls_id(self) -> int:
        return self.id_of("[CLS]")

    @property
    def sep_id(self) -> int:
        return self.id_of("[SEP]")

    @property
    def mask_id(self) -> int:
        return self.id_of("[MASK]")

    @property
    def pad_id(self) -> int:
        return self.id_of("[PAD]")

    @property
    def id_dtype(self) -> np.dtype:
        """The smallest dtype that holds every token id."""
        return np.dtype(np.uint16) if self.size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)

    def fingerprint(self, max_seq_len: int) -> Fingerprint:
        return Fingerprint(
            vocab_size=self.size,
            vocab_sha256=self.sha256,
            do_lower_case=self.do_lower_case,
            max_seq_len=max_seq_len,
            cls_id=self.cls_id,
            sep_id=self.sep_id,
            mask_id=self.mask_id,
            pad_id=self.pad_id,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer, do_lower_case: bool) -> "Vocabulary":
        by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("tokenizer vocabulary ids are not contiguous from 0")
        tokens = tuple(token for token, _ in by_id)
        missing = [t for t in SPECIAL_TOKENS if t not in set(tokens)]
        if missing:
            raise ValueError(f"vocabulary lacks the BERT special tokens {missing}")
        digest = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
        is_continuation = np.fromiter((t.startswith("##") for t in tokens), dtype=bool, count=len(tokens))
        return cls(tokens=tokens, is_continuation=is_continuation, do_lower_case=do_lower_case, sha256=digest)


def model_max_positions(model_dir: Path) -> int | None:
    """`max_position_embeddings` from the model's config.json, when there is one."""
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bertstream"
