"""Small pieces shared by the Janus and JanusFlow models: RMSNorm, the MLP projector (aligner), and the heads'
chunked cross-entropy."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Logits per chunk of the training heads' cross-entropy: 16M (64 MB in float32). Janus-Pro's text head has
# 102400 outputs and whole logits cost ~14 bytes each at the peak (bf16 out, the float32 copy, log-softmax
# kept for backward, gradients): 5.5 GiB for 4096 tokens (bench/bench_head_ce.py). Smaller losses stay plain.
CE_CHUNK_LOGITS = 2 ** 24
MIN_CE_COLUMNS = 1024  # the text head's chunks keep at least this many outputs (more tokens: larger chunks)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, scale in the input dtype (same rounding as transformers)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MlpProjector(nn.Module):
    """Official `MlpProjector` of type mlp_gelu: Linear, then (depth-1) x [exact GELU, Linear].

    Kept as a Sequential named `layers` so the keys are `layers.0`, `layers.2` as in the checkpoints.
    """

    def __init__(self, input_dim: int, n_embed: int, depth: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Linear(input_dim, n_embed)]
        for _ in range(depth - 1):
            mods += [nn.GELU(), nn.Linear(n_embed, n_embed)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionHead(nn.Module):
    """Official `vision_head`: LLM hidden -> image-token logits (Linear, exact GELU, Linear)."""

    def __init__(self, n_embed: int, image_token_embed: int, image_token_size: int) -> None:
        super().__init__()
        self.output_mlp_projector = nn.Linear(n_embed, image_token_embed)
        self.vision_head = nn.Linear(image_token_embed, image_token_size)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; with `labels`, the per-row float32 cross-entropy instead (head_cross_entropy)."""
        if labels is not None:
            return head_cross_entropy(self._logits, x, labels, self.vision_head.out_features)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.output_mlp_projector(x)))


class TextHead(nn.Linear):
    """The LLM's untied text head (`lm_head`): an nn.Linear whose forward also takes `labels` and then returns
    the per-row float32 cross-entropy without materialising all the logits (_VocabChunkedCE)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        cols = max(MIN_CE_COLUMNS, CE_CHUNK_LOGITS // max(1, x.shape[0]))
        if cols >= self.out_features or self.bias is not None:
            return F.cross_entropy(super().forward(x).float(), labels, reduction="none")
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.weight.dtype
        return _VocabChunkedCE.apply(x, self.weight, labels, cols, dtype)


class _VocabChunkedCE(torch.autograd.Function):
    """CE(x W^T) per row, the vocabulary in chunks of `cols` outputs, with autocast's roundings (x and W in
    `dtype`, logits rounded to it, then float32). Forward runs a streaming log-sum-exp over the chunks and keeps
    x, W and each row's log-sum-exp; backward recomputes one chunk's logits at a time, writes that slice of W's
    gradient (every row in one matmul: no partial sums) and adds its share of x's gradient in float32. Chunking
    the rows instead would sum W's whole gradient once per chunk with a thin matmul: much slower. Under FSDP2
    this runs inside the head's forward, so W is the gathered weight (gathered again before backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cols: int,
                dtype: torch.dtype) -> torch.Tensor:
        xd = x.to(dtype)
        n = x.shape[0]
        m = torch.full((n,), -torch.inf, dtype=torch.float32, device=x.device)  # running max
        s = torch.zeros_like(m)  # running sum of exp(z - m)
        picked = torch.zeros_like(m)  # the label's logit
        for a in range(0, weight.shape[0], cols):
            z = (xd @ weight[a:a + cols].to(dtype).T).float()
            m_new = torch.maximum(m, z.max(-1).values)
            s = s * (m - m_new).exp() + (z - m_new[:, None]).exp().sum(-1)
            m = m_new
            inside = (labels >= a) & (labels < a + z.shape[1])
            picked += torch.where(inside, z.gather(1, (labels - a).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        lse = m + s.log()
        ctx.save_for_backward(x, weight, labels, lse)
        ctx.cols, ctx.dtype = cols, dtype
        return lse - picked

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, labels, lse = ctx.saved_tensors
        cols, dtype = ctx.cols, ctx.dtype
        xd = x.to(dtype)
        gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for a in range(0, weight.shape[0], cols):
            w = weight[a:a + cols].to(dtype)
            p = ((xd @ w.T).float() - lse[:, None]).exp_()  # this chunk's softmax
            inside = ((labels >= a) & (labels < a + w.shape[0])).nonzero().squeeze(1)
            p[inside, labels[inside] - a] -= 1.0  # - one-hot
            pb = p.mul_(g[:, None]).to(dtype)
            if gx is not None:
                gx += (pb @ w).float()
            if gw is not None:
                gw[a:a + cols] = pb.T @ xd
        return None if gx is None else gx.to(x.dtype), gw, None, None, None


def _chunk_rows(n_out: int, chunk_logits: int | None = None) -> int:
    return max(1, (CE_CHUNK_LOGITS if chunk_logits is None else chunk_logits) // max(1, n_out))


def head_cross_entropy(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                       n_out: int, chunk_logits: int | None = None) -> torch.Tensor:
    """F.cross_entropy(logits_fn(x).float(), labels, reduction="none") for x (N, dim), computed on row chunks of
    at most `chunk_logits` logits, each under activation checkpointing (the image head's way; the text head
    chunks its vocabulary instead, _VocabChunkedCE): only the chunk's logits are ever alive and backward keeps
    x alone (it recomputes the chunk's logits: one more head matmul). It runs inside the
    head's own forward, so FSDP2 has the head's weights gathered for the forward and again for the recompute
    in backward (its pre-backward hook fires on this output before any chunk is recomputed).
    `chunk_logits`: CE_CHUNK_LOGITS when None (read at call time, so a test can lower it)."""
    rows = _chunk_rows(n_out, chunk_logits)
    if x.shape[0] <= rows:
        return F.cross_entropy(logits_fn(x).float(), labels, reduction="none")

    def ce(xc: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_fn(xc).float(), lc, reduction="none")

    parts = []
    for a in range(0, x.shape[0], rows):
        xc, lc = x[a:a + rows], labels[a:a + rows]
        parts.append(checkpoint(ce, xc, lc, use_reentrant=False, preserve_rng_state=False)
                     if torch.is_grad_enabled() else ce(xc, lc))
    return torch.cat(parts)
