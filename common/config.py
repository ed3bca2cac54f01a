"""Configuration both sides share, as frozen dataclasses validated once where they are built."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text is and how it becomes token ids."""

    train_corpus: tuple[str, ...]  # sources: text (gzip allowed), .jsonl(.gz), .parquet, a saved dataset, hf:NAME
    bert_model: str  # hub name or local model directory; its tokenizer is used
    do_lower_case: bool | None  # None until decided from the tokenizer's files (common.vocab.decide_lower_case)
    cache_dir: str  # where corpus indexes are kept
    text_field: str = "text"  # the record field holding a document's text (JSONL, Parquet, datasets)
    dataset_split: str = "train"  # the split of a Hub dataset or of a saved DatasetDict
    split_sentences: bool = False  # split each line into sentences (common/sentences.py); else a line is one
    corpus_weights: tuple[float, ...] | None = None  # one per source: a weighted blend; None = all one corpus

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("text_field must be a non-empty field name, got ''")
        if self.corpus_weights is not None:
            weights = self.corpus_weights
            if len(weights) != len(self.train_corpus):
                raise ValueError(f"corpus_weights must give one weight per --train_corpus source "
                                 f"({len(self.train_corpus)}), got {len(weights)}")
            if not 2 <= len(weights) <= 64:  # 64: the wire header's per-corpus counts (common/wire.py)
                raise ValueError(f"corpus_weights must blend 2 to 64 corpora, got {len(weights)}")
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"corpus_weights must be positive numbers, got {' '.join(map(str, weights))}")


@dataclass(frozen=True)
class GenerationConfig:
    """The seed's instance-generation parameters (pregenerate_training_data.py's flags)."""

    max_seq_len: int = 128  # tokens per instance, [CLS] and both [SEP] included
    short_seq_prob: float = 0.1  # probability of a shorter random target length
    masked_lm_prob: float = 0.15  # share of tokens to mask
    max_predictions_per_seq: int = 20  # cap on masked positions per instance
    whole_word_mask: bool = False  # mask whole words (a word and its `##` pieces) together

    def __post_init__(self) -> None:
        if not 8 <= self.max_seq_len <= 512:
            raise ValueError(f"max_seq_len must be between 8 and 512, got {self.max_seq_len}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob must be between 0 and 1, got {self.short_seq_prob}")
        if not 0.0 < self.masked_lm_prob <= 1.0:
            raise ValueError(f"masked_lm_prob must be in (0, 1], got {self.masked_lm_prob}")
        if not 1 <= self.max_predictions_per_seq <= self.max_seq_len - 3:
            raise ValueError(
                f"max_predictions_per_seq must be between 1 and max_seq_len - 3 = {self.max_seq_len - 3}, "
                f"got {self.max_predictions_per_seq}"
            )

    @property
    def max_num_tokens(self) -> int:
        """Room for the two segments: max_seq_len less [CLS] and two [SEP]."""
        return self.max_seq_len - 3

    def to_dict(self) -> dict:
        return asdict(self)


def add_lower_case_flags(group, consequence: str) -> None:
    """--do_lower_case / --no_lower_case (dest do_lower_case, None when neither: follow the tokenizer's setting).

    Both command lines call it, so both sides offer the same two flags and the same default.
    """
    either = group.add_mutually_exclusive_group()
    either.add_argument("--do_lower_case", action="store_const", const=True, default=None,
                        help="lower-case the text (uncased models). Neither this nor --no_lower_case: follow the "
                        "tokenizer's own setting (tokenizer_config.json's do_lower_case, else the normalizer in "
                        f"tokenizer.json, else on), as AutoTokenizer does; {consequence}")
    either.add_argument("--no_lower_case", dest="do_lower_case", action="store_const", const=False, default=None,
                        help="keep the text's case (cased models), whatever the tokenizer's files say")
