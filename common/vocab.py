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
# The PyTorch weights, in from_pretrained's order of preference: safetensors first, whole or sharded.
_WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json"]
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ModelNotFoundError(FileNotFoundError):
    """`--bert_model` is neither a local model directory nor a name the hub cache can resolve."""


def resolve_model_dir(bert_model: str, with_weights: bool = False) -> Path:
    """A local directory as given, else the hub snapshot of that name (from the local cache when offline).

    The producer needs only the tokenizer files (and config.json); the trainer asks `with_weights`, and then
    gets the directory `from_pretrained(NAME)` would load: the same snapshot with the weights beside them.
    """
    path = Path(bert_model).expanduser()
    if path.is_dir():
        if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"--bert_model {bert_model}: directory has neither vocab.txt nor tokenizer.json")
        return path
    if path.exists() or bert_model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"--bert_model {bert_model}: not a model directory")
    snapshot = _HubSnapshot(bert_model)
    try:
        found = [name for name in _TOKENIZER_FILES if snapshot.fetch(name)]
        if "vocab.txt" not in found and "tokenizer.json" not in found:
            raise FileNotFoundError(f"neither vocab.txt nor tokenizer.json {snapshot.where_missing()}")
    except Exception as exc:  # offline, unknown name, no network: all end the same way for the user
        raise ModelNotFoundError(
            f"--bert_model {bert_model}: not a local directory and not resolvable on the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Pass a directory holding vocab.txt or tokenizer.json "
            "(for example from save_pretrained), or run once with network access to fill the hub cache."
        ) from exc
    if with_weights:
        try:
            snapshot.fetch_weights()
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"--bert_model {bert_model}: {exc}") from exc
    return snapshot.folder


class _HubSnapshot:
    """Files of one hub model, each from the cache or downloaded into it, all from the same commit."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.revision: str | None = None  # pinned to the first file's commit, so every file is of one snapshot
        self.folder: Path | None = None
        self.missing_locally: list[str] = []  # files neither cached nor downloadable (offline or unreachable)

    def fetch(self, filename: str) -> Path | None:
        """The file's path in the snapshot; None when the hub has no such file or it cannot be had now."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

        try:
            found = Path(hf_hub_download(self.repo_id, filename, revision=self.revision))
        except RemoteEntryNotFoundError:  # the hub answered: this repository has no such file
            return None
        except LocalEntryNotFoundError:  # not in the cache, and the hub is off (HF_HUB_OFFLINE) or unreachable
            self.missing_locally.append(filename)
            return None
        if self.folder is None:  # .../snapshots/<commit>/<filename>
            self.folder = found.parents[len(Path(filename).parts) - 1]
            self.revision = self.folder.name
        return found

    def fetch_weights(self) -> None:
        """The first of _WEIGHT_FILES the repository has (every shard of a sharded one), or a clear error."""
        for filename in _WEIGHT_FILES:
            found = self.fetch(filename)
            if found is None:
                continue
            if filename.endswith(".index.json"):
                shards = sorted(set(_read_json(found).get("weight_map", {}).values()))
                absent = [shard for shard in shards if self.fetch(shard) is None]
                if absent:
                    raise ModelNotFoundError(f"{filename} lists weight shards that cannot be had: "
                                             f"{', '.join(absent)} {self.where_missing()}{self._how_to_get()}")
            return
        raise ModelNotFoundError(f"the weights are missing: no model.safetensors or pytorch_model.bin "
                                 f"{self.where_missing()}{self._how_to_get()}")

    def where_missing(self) -> str:
        """Where a file was looked for: the hub repository, or the cache when the hub could not be asked."""
        from huggingface_hub import constants

        if not self.missing_locally:
            return "in the hub repository"
        held = f" (snapshot {self.folder})" if self.folder is not None else ""
        why = ("downloads are off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)" if constants.is_offline_mode()
               else "the hub cannot be reached")
        return f"in the hub cache {constants.HF_HUB_CACHE}{held}, and {why}"

    def _how_to_get(self) -> str:
        if not self.missing_locally:
            return ": the trainer needs PyTorch weights; pass a directory holding them (from save_pretrained)"
        return (f". A cache filled by a producer holds the tokenizer only. Download the whole model once with "
                f"network access (run the trainer online, or `hf download {self.repo_id}`), or pass a local "
                f"directory saved with save_pretrained")


@dataclass(frozen=True)
class LowerCasing:
    """Whether text is lower-cased, and what decided it (for the log line both sides print)."""

    do_lower_case: bool
    reason: str

    def describe(self) -> str:
        return f"lower-casing {'on' if self.do_lower_case else 'off'} ({self.reason})"


def decide_lower_case(model_dir: Path, flag: bool | None) -> LowerCasing:
    """The flag when given (--do_lower_case / --no_lower_case), else the tokenizer's own setting, as AutoTokenizer
    reads it: tokenizer_config.json's `do_lower_case`, else the normalizer in tokenizer.json, else BertTokenizer's
    default (on). Both sides decide from the same files, and the fingerprint still checks that they agree."""
    if flag is not None:
        return LowerCasing(flag, "--do_lower_case" if flag else "--no_lower_case")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        value = _read_json(config).get("do_lower_case")
        if isinstance(value, bool):
            return LowerCasing(value, f"{config} says do_lower_case {str(value).lower()}")
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        value = _normalizer_lowercases(_read_json(tokenizer_json).get("normalizer"))
        if value is not None:
            return LowerCasing(value, f"the normalizer in {tokenizer_json} {'lower-cases' if value else 'keeps case'}")
    return LowerCasing(True, f"nothing in {model_dir} says; BertTokenizer's default")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"--bert_model: cannot read {path} ({type(exc).__name__}: {exc})") from exc
    return value if isinstance(value, dict) else {}


def _normalizer_lowercases(normalizer) -> bool | None:
    """Whether a tokenizer.json normalizer (possibly a Sequence) lower-cases; None when there is none."""
    if not isinstance(normalizer, dict):
        return None  # no normalizer at all: no evidence either way, so the default decides
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase", True))
    if kind == "Sequence":
        return any(_normalizer_lowercases(n) for n in normalizer.get("normalizers") or [])
    return kind == "Lowercase"  # NFC, StripAccents, ...: a normalizer that keeps case


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
