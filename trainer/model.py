"""BertForPreTraining, loaded for training, and its MLM + NSP loss computed only where there are labels.

The stock forward pass projects every position of every sequence onto the vocabulary, (batch, seq, vocab),
and then ignores all but the ~15% of positions with a label. Here the hidden states are gathered at the
masked positions first, (batch, max_predictions, hidden), and only those go through the prediction head:
the same loss and gradients (the ignored positions contribute nothing to either), with the largest matrix
product of the model cut by seq / max_predictions (6.4x at 128 / 20). Shapes stay static (padding slots are
labelled -100), so nothing here waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.instances import IGNORE_INDEX
from trainer import TrainerError


@dataclass
class TensorBatch:
    """A micro-batch as tensors, `width` positions wide (its longest row, rounded up: see trainer.source).

    On the host the arrays keep the compact dtypes they travel in (uint16 ids as their int16 bits, uint8
    segment ids and labels, uint16 lengths and positions as int16, int16 or int32 MLM labels), pinned when
    training on CUDA. `to(device)` copies them as they are and widens them there to the int64 that embedding
    lookups, gathers and cross-entropy take: 3 bytes a position cross to the device instead of the 24 of three
    int64 arrays, and the attention mask is not copied at all but built on the device from the lengths.
    int16 stands in for uint16 because torch's unsigned 16-bit type supports few operations on every device.
    """

    input_ids: torch.Tensor  # (batch, width): int16 holding uint16 bits, or int32; int64 once widened
    token_type_ids: torch.Tensor  # (batch, width) uint8
    lengths: torch.Tensor  # (batch,) real tokens of each row (int16 on the host)
    masked_positions: torch.Tensor  # (batch, max_predictions), 0 in unused slots
    masked_labels: torch.Tensor  # (batch, max_predictions), IGNORE_INDEX in unused slots
    next_sentence_labels: torch.Tensor  # (batch,) 0 = B follows A, 1 = B is random
    tokens: int = 0  # real tokens in the batch (the sum of `lengths`), counted on the host: metrics need no sync

    ARRAYS = ("input_ids", "token_type_ids", "lengths", "masked_positions", "masked_labels", "next_sentence_labels")

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        """Positions each row is padded to, the sequence length the model computes on."""
        return self.input_ids.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(batch, width) bool, True on real tokens: made from the lengths where the batch is."""
        return torch.arange(self.width, device=self.lengths.device) < self.lengths.long()[:, None]

    def to(self, device: torch.device, non_blocking: bool = False) -> "TensorBatch":
        """The batch on `device`, every array int64 (a batch already there and widened comes back the same)."""
        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking) for name in self.ARRAYS}
        ids = moved["input_ids"]
        wide = {name: array.long() for name, array in moved.items()}
        if ids.dtype == torch.int16:  # uint16 ids travel as their bits: ids from 32768 up read negative
            wide["input_ids"] &= 0xFFFF
        return TensorBatch(**wide, tokens=self.tokens)

    def dense_mlm_labels(self) -> torch.Tensor:
        """(batch, width) labels with IGNORE_INDEX off the masked positions: the stock forward pass's format."""
        dense = torch.full_like(self.input_ids, IGNORE_INDEX, dtype=torch.long)
        used = self.masked_labels != IGNORE_INDEX
        # Unused slots point at position 0 ([CLS]) with label -100: scattering them writes -100 there, harmlessly.
        return dense.scatter_(1, self.masked_positions.long(),
                              torch.where(used, self.masked_labels.long(), IGNORE_INDEX))


@dataclass
class PretrainingOutput:
    """Losses to train on and counts to report; every field a device tensor (reading one is a sync point)."""

    loss: torch.Tensor  # () mlm_loss + nsp_loss, what backward runs on
    mlm_loss: torch.Tensor  # () mean cross-entropy over the labelled positions
    nsp_loss: torch.Tensor  # () mean cross-entropy over the instances
    mlm_loss_sum: torch.Tensor  # () summed, for exact averages over many batches
    nsp_loss_sum: torch.Tensor
    mlm_correct: torch.Tensor  # () labelled positions predicted right
    mlm_count: torch.Tensor  # () labelled positions
    nsp_correct: torch.Tensor  # () instances whose NSP label was predicted right
    nsp_count: int  # instances (known on the host: the batch size)


def load_model(path: str | Path):
    """BertForPreTraining from a directory (or hub name), with PyTorch's scaled-dot-product attention.

    A checkpoint without pretraining heads (a sentence-transformers BertModel, say) loads with freshly
    initialised heads; transformers reports which weights were missing.

    The weights are float32 whatever dtype the files hold: they are the optimizer's master weights, and
    autocast computes in fp16/bf16 from them. transformers 5 defaults to `dtype="auto"`, which would keep an
    fp16 checkpoint in fp16 (AdamW's updates then round away, and the GradScaler refuses fp16 gradients).
    """
    import transformers
    from transformers import BertForPreTraining

    transformers.utils.logging.disable_progress_bar()
    try:
        return BertForPreTraining.from_pretrained(str(path), attn_implementation="sdpa", dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise TrainerError(f"--bert_model {path}: cannot load BertForPreTraining ({exc})") from exc


def load_tokenizer_for_saving(model_dir: Path, do_lower_case: bool):
    """The transformers tokenizer of `model_dir`, saved beside every checkpoint so the output loads whole."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), do_lower_case=do_lower_case)
    except (OSError, ValueError) as exc:
        raise TrainerError(f"--bert_model {model_dir}: cannot load its tokenizer ({exc})") from exc


def pretraining_loss(model, batch: TensorBatch) -> PretrainingOutput:
    """MLM + NSP loss with the prediction head applied only at the masked positions."""
    # A ready 4-D boolean mask goes to SDPA as it is. Given the 2-D mask, transformers checks `mask.all()` on
    # the host before every forward pass (to drop the mask when nothing is padded): a device sync per step.
    mask = batch.attention_mask[:, None, None, :].bool()  # (batch, 1, 1, seq), True where attended
    encoded = model.bert(input_ids=batch.input_ids, attention_mask=mask, token_type_ids=batch.token_type_ids)
    hidden = encoded.last_hidden_state  # (batch, seq, hidden)
    index = batch.masked_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (batch, preds, hidden)
    mlm_logits = model.cls.predictions(torch.gather(hidden, 1, index))  # (batch, preds, vocab)
    nsp_logits = model.cls.seq_relationship(encoded.pooler_output)  # (batch, 2)
    return _losses(mlm_logits, batch.masked_labels, nsp_logits, batch.next_sentence_labels)


def stock_pretraining_loss(model, batch: TensorBatch) -> PretrainingOutput:
    """The same through BertForPreTraining's own forward pass (dense labels, logits at every position)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                token_type_ids=batch.token_type_ids, labels=batch.dense_mlm_labels(),
                next_sentence_label=batch.next_sentence_labels)
    result = _losses(out.prediction_logits, batch.dense_mlm_labels(), out.seq_relationship_logits,
                     batch.next_sentence_labels)
    result.loss = out.loss  # the model's own number, so comparisons test the model, not _losses
    return result


def _losses(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, nsp_logits: torch.Tensor,
            nsp_labels: torch.Tensor) -> PretrainingOutput:
    vocab = mlm_logits.shape[-1]
    flat_logits, flat_labels = mlm_logits.reshape(-1, vocab), mlm_labels.reshape(-1)
    used = flat_labels != IGNORE_INDEX
    mlm_count = used.sum()
    # Cross-entropy in float32 whatever the autocast dtype, as autocast itself does for this op.
    mlm_sum = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    nsp_sum = F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="sum")
    mlm_loss = mlm_sum / mlm_count.clamp(min=1)  # clamp instead of a branch: no sync
    nsp_loss = nsp_sum / nsp_labels.shape[0]
    with torch.no_grad():
        mlm_correct = ((flat_logits.argmax(-1) == flat_labels) & used).sum()
        nsp_correct = (nsp_logits.argmax(-1) == nsp_labels).sum()
    return PretrainingOutput(
        loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss, mlm_loss_sum=mlm_sum.detach(),
        nsp_loss_sum=nsp_sum.detach(), mlm_correct=mlm_correct, mlm_count=mlm_count, nsp_correct=nsp_correct,
        nsp_count=nsp_labels.shape[0])


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """The seed's AdamW groups: decay everything but biases and LayerNorm weights.

    LayerNorm parameters are found by module type rather than by the name "LayerNorm", so a model that
    names its norms differently is still handled.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(param) in norm_params else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
