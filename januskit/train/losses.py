"""Next-token cross-entropy of a packed TrainBatch: text CE through the LM head, image CE through the
gen head, each only at its labelled slots, with no per-task weights (both papers).

The heads run only on the slots that carry a label: the LM head has 102400 outputs and running it on
every slot of a 4096-token row would cost gigabytes of logits for nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.janus import JanusModel
from .batch import IGNORE, TrainBatch

KINDS = ("und", "text", "gen")  # metric buckets, indexed like TrainBatch.kinds (0, 1, 2)


@dataclass
class LossSums:
    total: torch.Tensor  # () differentiable sum of every token CE (text and image)
    by_kind: torch.Tensor  # (3,) detached CE sums per kind bucket (und, text, gen)
    count: torch.Tensor  # (3,) loss tokens per kind bucket

    @property
    def n(self) -> torch.Tensor:
        return self.count.sum()

    def mean(self) -> torch.Tensor:
        """The loss: sum of token CEs / number of loss tokens (0 when there are none)."""
        return self.total / self.n.clamp(min=1)


def label_counts(batch: TrainBatch) -> torch.Tensor:
    """(3,) loss tokens per kind bucket, computed from the labels alone (host side, before forward)."""
    out = torch.zeros(3, dtype=torch.long)
    for labels, default in ((batch.text_labels, 1), (batch.image_labels, 2)):
        sel = labels != IGNORE
        kinds = _kinds(batch, sel, default)
        out += torch.bincount(kinds.cpu(), minlength=3)[:3]
    return out


def _kinds(batch: TrainBatch, sel: torch.Tensor, default: int) -> torch.Tensor:
    """Kind bucket of each selected slot: from batch.kinds, else text-head -> text, image-head -> gen."""
    if batch.kinds is None:
        return torch.full((int(sel.sum()),), default, dtype=torch.long, device=sel.device)
    return batch.kinds[sel].clamp(min=0)


def batch_losses(model: JanusModel, batch: TrainBatch) -> LossSums:
    """Forward one packed batch and return the CE sums (divide by the token count outside: under
    gradient accumulation and data parallelism the right divisor is the whole step's count)."""
    h = model.mixed_embeds(batch.input_ids, batch.und_mask, batch.pixel_values, batch.gen_mask, batch.gen_ids)
    hidden, _ = model.llm.forward_packed(h, batch.positions, batch.doc_ids)  # (B, T, dim)
    # Input branches this batch does not use run on zero inputs, so every trainable part gets a (zero)
    # gradient on every rank: FSDP's reduce-scatter and DDP's buckets need the same set everywhere.
    idle = h.new_zeros(())
    if batch.pixel_values is None or batch.pixel_values.shape[0] == 0:
        S = model.config.vision.image_size
        idle = idle + model.image_embeds(h.new_zeros(0, 3, S, S)).sum()
    if not bool(batch.gen_mask.any()):
        idle = idle + model.gen_embeds(batch.gen_ids.new_zeros(0)).sum()
    t_sel = batch.text_labels != IGNORE
    i_sel = batch.image_labels != IGNORE
    # Heads on the labelled slots only, CE in float32 (bf16 logits lose the tail of the softmax).
    text_ce = F.cross_entropy(model.text_logits(hidden[t_sel]).float(), batch.text_labels[t_sel], reduction="none")
    image_ce = F.cross_entropy(model.image_logits(hidden[i_sel]).float(), batch.image_labels[i_sel], reduction="none")
    by_kind = torch.zeros(3, dtype=torch.float32, device=hidden.device)
    by_kind.index_add_(0, _kinds(batch, t_sel, 1), text_ce.detach())
    by_kind.index_add_(0, _kinds(batch, i_sel, 2), image_ce.detach())
    count = torch.zeros(3, dtype=torch.long, device=hidden.device)
    count.index_add_(0, _kinds(batch, t_sel, 1), torch.ones_like(text_ce, dtype=torch.long))
    count.index_add_(0, _kinds(batch, i_sel, 2), torch.ones_like(image_ce, dtype=torch.long))
    # Empty selections give sum 0 but still run both heads, so both heads are always in the graph too.
    return LossSums(total=text_ce.sum() + image_ce.sum() + idle, by_kind=by_kind, count=count)


def batch_loss(model: JanusModel, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss of one batch and its per-kind means (for evaluation and tests)."""
    s = batch_losses(model, batch)
    per = {k: float(s.by_kind[i] / s.count[i]) for i, k in enumerate(KINDS) if s.count[i] > 0}
    return s.mean(), per


class LossForward(nn.Module):
    """The model with `forward(batch) -> (total, by_kind, count)` (the fields of LossSums). DDP and
    FSDP hook into `forward`, so the loss must be a module's forward to get gradient sync and
    parameter gathering; a plain tuple lets DDP find the output tensors."""

    def __init__(self, model: JanusModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = batch_losses(self.model, batch)
        return s.total, s.by_kind, s.count
