"""LLaMA decoder over input embeddings, with a preallocated static KV cache.

Same math as transformers' LlamaForCausalLM (RMSNorm, rotate-half RoPE, SwiGLU, no biases) and the
same key names (`model.layers.N.self_attn.q_proj`, ...), so official weights load 1:1. The forward
takes embeddings, explicit RoPE positions (left-padded rows start later) and the cache slot `start`
where the new positions are written; nothing grows by concatenation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import LlamaConfig
from .layers import RMSNorm


class KVCache:
    """Keys/values of every layer for `batch` rows and up to `max_len` positions, allocated once."""

    def __init__(self, c: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (c.n_layers, batch, c.kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @staticmethod
    def nbytes(c: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * c.n_layers * batch * c.kv_heads * max_len * c.head_dim * torch.finfo(dtype).bits // 8

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, h, S, d) at slots start..start+S; return views of slots 0..start+S."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache: position {end} exceeds the cache length {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    d = c.head_dim
    return 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) positions -> cos, sin of shape (B, 1, S, head_dim), computed in float32 then cast."""
    freqs = positions[..., None].float() * inv_freq  # (B, S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_mask(start: int, length: int, key_valid: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, S, start+S) for S new queries at slots start.., or None when plain causal
    attention from slot 0 applies. `key_valid` (B, start+S) marks real (non-padding) slots."""
    end = start + length
    if key_valid is None and (start == 0 or length == 1):
        return None  # start==0: is_causal; length==1: the new query sees every cached slot
    q = torch.arange(start, end, device=key_valid.device if key_valid is not None else None)
    mask = torch.arange(end, device=q.device)[None, :] <= q[:, None]  # (S, end) causal
    if key_valid is None:
        return mask[None, None]
    mask = mask[None] & key_valid[:, None, :end]
    # A padding query would see nothing and give NaN; let it see itself (its output is never used).
    mask |= _diag(length, end, q.device)
    return mask[:, None]


def packed_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) sample index per slot (-1 = padding) -> (B, 1, T, T) causal mask that never crosses
    sample boundaries, so a packed row computes exactly what its samples compute alone."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same | torch.eye(T, dtype=torch.bool, device=doc_ids.device))[:, None]


def _diag(length: int, end: int, device: torch.device) -> torch.Tensor:
    d = torch.zeros(length, end, dtype=torch.bool, device=device)
    d[torch.arange(length), torch.arange(end - length, end)] = True
    return d[None]


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        causal = mask is None and S > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.dim, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: KVCache | None, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)
        self.gradient_checkpointing = False  # set from outside (training); recompute each layer in backward

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, S, dim) input embeddings; positions: (B, S) RoPE positions; writes cache slots
        start..start+S; key_valid: (B, start+S) bool, False on padding (None = no padding).
        Returns the final-normed hidden states (B, S, dim)."""
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a KV cache holding the earlier positions")
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        mask = attention_mask(start, h.shape[1], key_valid)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, i, cache, start, mask)
        return self.norm(h)

    def forward_packed(self, h: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                       capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training forward over packed rows (no cache): h (B, T, dim), positions restarting at 0 per
        sample, doc_ids (B, T) with -1 on padding. Returns the final-normed hidden states and, when
        `capture_layer` = k, the residual stream after layer k (1-based; for feature alignment)."""
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        mask = packed_mask(doc_ids)
        captured = None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, i, None, 0, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, i, None, 0, mask)
            if capture_layer == i + 1:
                captured = h
        return self.norm(h), captured


class LlamaForCausalLM(nn.Module):
    """Decoder body (`model`) plus the untied text head (`lm_head`), as in the checkpoints."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
