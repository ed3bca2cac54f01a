"""Held-out evaluation: a fixed set of instances from `--eval_corpus`, scored for MLM loss/accuracy and NSP accuracy.

The set is generated once, with a fixed seed and the stream's max_seq_len, so every evaluation of a run (and
of runs with the same flags) scores the same pairs and the same masks; the numbers then move only because
the model does. That is how a user sees domain adaptation working: MLM loss on held-out in-domain text
going down. Whole-word masking is off and the masking rates are the seed's defaults, whatever the producer
uses, so runs with different generation flags stay comparable.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from common.config import CorpusConfig, GenerationConfig
from common.index import CorpusIndex, build_or_load_index
from common.instances import collate, iter_instances
from common.lengths import stream_widths, trim
from common.progress import log
from common.vocab import Vocabulary
from trainer.model import TensorBatch, pretraining_loss
from trainer.source import to_tensors

EVAL_SEED = 12345
DEFAULT_MAX_SEQ_LEN = 128  # when the stream's is not known


@dataclass(frozen=True)
class EvalResult:
    mlm_loss: float  # mean cross-entropy over every masked position of the set
    nsp_loss: float  # mean over instances
    mlm_accuracy: float
    nsp_accuracy: float
    instances: int

    @property
    def loss(self) -> float:
        return self.mlm_loss + self.nsp_loss

    def to_record(self) -> dict:
        return {"eval_loss": self.loss, "eval_mlm_loss": self.mlm_loss, "eval_nsp_loss": self.nsp_loss,
                "eval_mlm_accuracy": self.mlm_accuracy, "eval_nsp_accuracy": self.nsp_accuracy,
                "eval_instances": self.instances}


def load_eval_index(eval_corpus: str, bert_model: str, do_lower_case: bool, cache_dir: str,
                    vocab: Vocabulary, text_field: str = "text", dataset_split: str = "train",
                    split_sentences: bool = False) -> CorpusIndex:
    """The evaluation corpus's token index (cached like a training corpus's).

    Built before the model and the stream start: the index build forks tokenizer workers, which is only
    safe while this process has no other threads.
    """
    corpus = CorpusConfig(train_corpus=(eval_corpus,), bert_model=bert_model, do_lower_case=do_lower_case,
                          cache_dir=cache_dir, text_field=text_field, dataset_split=dataset_split,
                          split_sentences=split_sentences)
    return build_or_load_index(corpus, vocab, num_procs=max(1, min(4, (os.cpu_count() or 1) // 2)))


def eval_batches(index: CorpusIndex, vocab: Vocabulary, num_instances: int, max_seq_len: int,
                 batch_size: int) -> list:
    """The fixed evaluation set, collated into batches of `batch_size` (the last may be smaller)."""
    config = GenerationConfig(max_seq_len=max_seq_len, max_predictions_per_seq=min(20, max_seq_len - 3),
                              whole_word_mask=False)
    rng = np.random.default_rng(EVAL_SEED)
    documents = rng.permutation(index.num_documents)  # spread the set over the corpus, not its first documents
    instances = list(itertools.islice(iter_instances(index, documents, config, vocab, rng), num_instances))
    if len(instances) < num_instances:
        log.warning("eval: the corpus gives %d instances, fewer than --eval_instances %d; evaluating on those",
                    len(instances), num_instances)
    log.info("eval: %d held-out instances at max_seq_len %d", len(instances), max_seq_len)
    return [collate(instances[i : i + batch_size], config, vocab) for i in range(0, len(instances), batch_size)]


class Evaluator:
    """Scores the model on the evaluation set, in eval mode (no dropout) and without gradients."""

    def __init__(self, batches: list, device: torch.device, autocast_dtype: torch.dtype | None):
        # Each batch as wide as its longest row (rounded up to 8): the same scores as at max_seq_len, for less.
        self._batches: list[TensorBatch] = [
            to_tensors(trim(b, stream_widths(b.input_ids.shape[1])), pin_memory=False).to(device) for b in batches]
        self._device = device
        self._autocast_dtype = autocast_dtype

    @torch.no_grad()
    def __call__(self, model) -> EvalResult:
        was_training = model.training
        model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self._device)
        instances = 0
        try:
            for batch in self._batches:
                autocast = (torch.autocast(self._device.type, dtype=self._autocast_dtype)
                            if self._autocast_dtype else contextlib.nullcontext())
                with autocast:
                    out = pretraining_loss(model, batch)
                sums += torch.stack([out.mlm_loss_sum, out.mlm_count, out.mlm_correct, out.nsp_loss_sum,
                                     out.nsp_correct]).double()
                instances += batch.size
        finally:
            model.train(was_training)
        mlm_sum, mlm_count, mlm_correct, nsp_sum, nsp_correct = sums.tolist()  # a sync point (eval steps only)
        mlm_count = max(mlm_count, 1.0)
        return EvalResult(mlm_loss=mlm_sum / mlm_count, nsp_loss=nsp_sum / max(instances, 1),
                          mlm_accuracy=mlm_correct / mlm_count, nsp_accuracy=nsp_correct / max(instances, 1),
                          instances=instances)
