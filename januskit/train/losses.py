"""Losses of a packed TrainBatch: text CE through the LM head and, for Janus, image-token CE through the
gen head, each only at its labelled slots, with no per-task weights (both papers); for JanusFlow the
rectified-flow and REPA terms of train/flow.py at the latent-grid slots instead of the image CE.

The heads run only on the slots that carry a label: the LM head has 102400 outputs and running it on
every slot of a 4096-token row would cost gigabytes of logits for nothing; and even there januskit's heads
compute the loss in chunks (head_ce), never holding all the logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import TextHead, VisionHead
from .data.batch import IGNORE, TrainBatch
from .data.packing import flow_starts, without_padding
from .data.records import IMAGE_KINDS, KIND_CODE, KINDS, SHORT
from .flow import FlowSettings, build_repa_head, flow_inputs, flow_loss_sums

N_KINDS = len(KINDS)  # kind buckets: records.KIND_CODE
REPA = N_KINDS  # by_kind's extra entry: the REPA sum (JanusFlow), counted over the image kinds' grid positions
TEXT, GEN = KIND_CODE["text"], KIND_CODE["generation"]  # the buckets of text- and image-head slots without kinds
IMAGE_CODES = [KIND_CODE[k] for k in IMAGE_KINDS]  # buckets whose loss is on a generated image


@dataclass
class LossSums:
    total: torch.Tensor  # () differentiable sum of every token loss (text CE, image CE or RF, REPA)
    by_kind: torch.Tensor  # (N_KINDS + 1,) detached sums per kind bucket (und, text, gen, edit) and REPA
    count: torch.Tensor  # (N_KINDS,) loss tokens per kind bucket

    @property
    def n(self) -> torch.Tensor:
        return self.count.sum()

    def mean(self) -> torch.Tensor:
        """The loss: sum of token CEs / number of loss tokens (0 when there are none)."""
        return self.total / self.n.clamp(min=1)


def label_counts(batch: TrainBatch) -> torch.Tensor:
    """(N_KINDS,) loss tokens per kind bucket, computed from the labels alone (host side, before forward)."""
    sels = [(batch.text_labels != IGNORE, TEXT), (batch.image_labels != IGNORE, GEN)]
    if batch.flow_mask is not None:  # JanusFlow: one loss token per latent-grid position
        sels.append((_grid(batch.flow_mask), GEN))
    return sum(torch.bincount(_kinds(batch, sel, default).cpu(), minlength=N_KINDS)[:N_KINDS] for sel, default in sels)


def image_tokens(count: torch.Tensor) -> torch.Tensor:
    """Loss tokens on generated images (generation and edit buckets) of a (N_KINDS,) count."""
    return count[IMAGE_CODES].sum()


def _grid(flow_mask: torch.Tensor) -> torch.Tensor:
    """The latent-grid slots of flow runs (their first slot is the timestep token)."""
    return flow_mask & ~flow_starts(flow_mask)


def _kinds(batch: TrainBatch, sel: torch.Tensor, default: int) -> torch.Tensor:
    """Kind bucket of each selected slot: from batch.kinds, else `default` (text-head -> text, image -> gen)."""
    if batch.kinds is None:
        return torch.full((int(sel.sum()),), default, dtype=torch.long, device=sel.device)
    return batch.kinds[sel].clamp(min=0)


def batch_losses(model: torch.nn.Module, batch: TrainBatch, flow: FlowSettings | None = None,
                 repa_head: nn.Module | None = None) -> LossSums:
    """Forward one packed batch and return the loss sums (divide by the token count outside: under
    gradient accumulation and data parallelism the right divisor is the whole step's count). A
    JanusFlow model needs its [flow] settings, and with REPA on h_phi (LossForward holds both)."""
    if model.config.arch == "janusflow":
        if flow is None:
            raise ValueError("JanusFlow losses need the [flow] settings (train.flow.FlowSettings)")
        return _flow_batch_losses(model, batch, flow, repa_head)
    if model.llm.packed_attention == "segments":  # the real slots only, as one row
        batch = without_padding(batch)
    # Input branches this batch does not use run on zero inputs, so every trainable part gets a (zero)
    # gradient on every rank: FSDP's reduce-scatter and DDP's buckets need the same set everywhere. They run
    # where the used branch would, as FSDP gathers its units (parallel.shard_plan) in call order on every rank.
    idle = _idle_und(model, batch)
    h = model.mixed_embeds(batch.input_ids, batch.und_mask, batch.pixel_values, batch.gen_mask, batch.gen_ids)
    hidden, _ = model.llm.forward_packed(h, batch.positions, batch.doc_ids)  # (B, T, dim)
    if not bool(batch.gen_mask.any()):
        idle = idle + model.gen_embeds(batch.gen_ids.new_zeros(0)).sum()
    i_sel = batch.image_labels != IGNORE
    # Heads on the labelled slots only, CE in float32 (bf16 logits lose the tail of the softmax).
    image_ce = head_ce(model.gen_head, _at(hidden, i_sel), batch.image_labels[i_sel])
    s = _text_sums(model, batch, hidden)
    s.by_kind.index_add_(0, _kinds(batch, i_sel, GEN), image_ce.detach())
    s.count.index_add_(0, _kinds(batch, i_sel, GEN), torch.ones_like(image_ce, dtype=torch.long))
    # Empty selections give sum 0 but still run both heads, so both heads are always in the graph too.
    s.total = s.total + image_ce.sum() + idle
    return s


def head_ce(head: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row float32 CE of a head on x (N, dim). januskit's own heads compute it in row chunks inside their
    forward (models.layers.head_cross_entropy: Janus-Pro's 102400-way logits never whole); a head replaced by
    an adapter wrapper or a quantised layer gives its logits as before."""
    if isinstance(head, (TextHead, VisionHead)):
        return head(x, labels=labels)
    return F.cross_entropy(head(x).float(), labels, reduction="none")


def _at(hidden: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """hidden[sel] for a (B, T) mask, as a gather: the same values and gradients, and on CPU a several times
    cheaper backward (an index_add instead of masked_select's masked_scatter)."""
    return hidden.flatten(0, 1).index_select(0, sel.flatten().nonzero().squeeze(1))


def _idle_und(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    """The understanding encoder on zero images when the batch has none (run it before the text embedding,
    where splice runs the real one), else 0."""
    x = batch.input_ids.new_zeros((), dtype=torch.float32)
    if batch.pixel_values is None or batch.pixel_values.shape[0] == 0:
        S = model.config.vision.image_size
        return model.image_embeds(x.new_zeros(0, 3, S, S)).sum()
    return x


def _text_sums(model: torch.nn.Module, batch: TrainBatch, hidden: torch.Tensor) -> LossSums:
    t_sel = batch.text_labels != IGNORE
    text_ce = head_ce(model.language_model.lm_head, _at(hidden, t_sel), batch.text_labels[t_sel])
    by_kind = torch.zeros(N_KINDS + 1, dtype=torch.float32, device=hidden.device)
    by_kind.index_add_(0, _kinds(batch, t_sel, TEXT), text_ce.detach())
    count = torch.zeros(N_KINDS, dtype=torch.long, device=hidden.device)
    count.index_add_(0, _kinds(batch, t_sel, TEXT), torch.ones_like(text_ce, dtype=torch.long))
    # per-kind figures stay plain means per token; the objective takes the answer weights when there are any
    total = text_ce.sum() if batch.text_weights is None else (text_ce * batch.text_weights[t_sel]).sum()
    return LossSums(total=total, by_kind=by_kind, count=count)


def _flow_batch_losses(model: torch.nn.Module, batch: TrainBatch, settings: FlowSettings,
                       head: nn.Module | None) -> LossSums:
    """JanusFlow: text CE, plus L_RF (+ L_REPA) of the flow samples at their grid slots; their prompts'
    understanding slots (an edit's source images) take the understanding features, as in any sample."""
    # Idle branches where the used ones would run (FSDP unit order, see batch_losses): understanding encoder,
    # text embedding, generation encoder, LLM, text head, generation decoder.
    idle = _idle_und(model, batch)
    h = model.splice(batch.input_ids, batch.und_mask, batch.pixel_values)
    c = model.config
    M = batch.n_flow
    if M:
        inputs, skip, t_emb, target = flow_inputs(model, batch.flow_latents, batch.flow_seeds, settings)
        h = h.masked_scatter(batch.flow_mask[..., None], inputs.to(h.dtype).reshape(-1, h.shape[-1]))
    else:
        inputs, skip, t_emb = model.gen_inputs(h.new_zeros(1, *c.latent_shape), h.new_zeros(1))
    layer = settings.repa_layer if head is not None and M else None
    hidden, captured = model.llm.forward_packed(h, batch.positions, batch.doc_ids, capture_layer=layer)
    s = _text_sums(model, batch, hidden)
    if M:
        grid = _grid(batch.flow_mask)
        rf, repa = flow_loss_sums(model, hidden, captured, grid, skip, t_emb, target, batch.repa_pixels, head,
                                  settings.repa_weight)
        kinds = _kinds(batch, flow_starts(batch.flow_mask), GEN)  # (M,): runs in slot order, as the latents
        s.by_kind.index_add_(0, kinds, rf.detach())
        s.by_kind[REPA] += repa.detach().sum()
        s.count.index_add_(0, _kinds(batch, grid, GEN), torch.ones(int(grid.sum()), dtype=torch.long,
                                                                    device=grid.device))
        s.total = s.total + rf.sum() + repa.sum()
    else:  # keep the generation branch in the graph (DDP / FSDP), contributing exactly zero
        v = model.velocity(inputs[:, 1:], skip, t_emb)
        idle = idle + 0 * (v.sum() + inputs.sum())
        if head is not None:
            idle = idle + 0 * head(inputs[:, :1]).sum()
    s.total = s.total + idle
    return s


def batch_loss(model: torch.nn.Module, batch: TrainBatch, flow: FlowSettings | None = None,
               repa_head: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss of one batch and its per-kind means (und, text, gen, edit; for evaluation and tests);
    `repa` is REPA's mean over the generated-image positions, part of the total (`gen` and `edit` are then
    the RF term alone). `flow`, `repa_head`: as for batch_losses."""
    s = batch_losses(model, batch, flow, repa_head)
    per = {SHORT[k]: float(s.by_kind[i] / s.count[i]) for i, k in enumerate(KINDS) if s.count[i] > 0}
    if repa_head is not None and image_tokens(s.count) > 0:
        per["repa"] = float(s.by_kind[REPA] / image_tokens(s.count))
    return s.mean(), per


class LossForward(nn.Module):
    """The training objective: the model with `forward(batch) -> (total, by_kind, count)` (the fields
    of LossSums), plus what only training adds to it. For JanusFlow that is the [flow] settings
    (`flow`, the defaults when not given) and, with REPA on, h_phi (`repa_head`, from `seed`): it
    trains with the model, registered after it (so the optimiser lists its parameters last), and is
    never exported. DDP and FSDP hook into `forward`, so the loss must be a module's forward to get
    gradient sync and parameter gathering; a plain tuple lets DDP find the output tensors."""

    def __init__(self, model: torch.nn.Module, flow: FlowSettings | None = None, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        if model.config.arch == "janusflow":
            self.flow = flow or FlowSettings()
            self.repa_head = build_repa_head(model.config, self.flow, seed)
        elif flow is not None:
            raise ValueError(f"[flow] settings are for JanusFlow models; this one is {model.config.arch}")
        else:
            self.flow, self.repa_head = None, None

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = batch_losses(self.model, batch, self.flow, self.repa_head)
        return s.total, s.by_kind, s.count


def progress_postfix(metrics: dict) -> dict[str, str]:
    """The progress bar's fields of a metrics line: the mean loss, then each kind's own (the mean is over
    tokens, so a step's hundreds of image tokens drown its answers' few: only loss_und shows them), REPA, LR."""
    out = {"loss": f"{metrics['loss']:.4f}"}
    for name in [*SHORT.values(), "repa"]:
        if metrics.get(f"loss_{name}") is not None:  # None: no tokens of that kind this step
            out[name] = f"{metrics[f'loss_{name}']:.3f}"
    out["lr"] = f"{metrics['lr']:.2e}"
    return out
