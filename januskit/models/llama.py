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
from .layers import RMSNorm, TextHead


class KVCache:
    """Keys/values of every layer for `batch` rows and up to `max_len` positions, allocated once: one
    (batch, kv_heads, max_len, head_dim) tensor per layer. Separate tensors, not one stacked buffer: a
    compiled step that writes a slot of a view of a shared buffer makes inductor copy the whole buffer
    every step (3x slower than eager at Janus-Pro-1B widths); a layer's own tensor is written in place."""

    def __init__(self, c: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch, c.kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layers)]
        self.max_len = max_len

    @staticmethod
    def nbytes(c: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * c.n_layers * batch * c.kv_heads * max_len * c.head_dim * torch.finfo(dtype).bits // 8

    def write(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, h, S, d) at slots start..start+S; return views of slots 0..start+S. A tensor
        `start` (a compiled decode step's: one graph for every position) writes one slot in place and
        returns the whole cache."""
        if isinstance(start, torch.Tensor):
            self.k[layer].index_copy_(2, start.reshape(1), k)
            self.v[layer].index_copy_(2, start.reshape(1), v)
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache: position {end} exceeds the cache length {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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


SLOT_STEP = 64


class CacheBias:
    """A one-token decode step's attention over the static cache: (B|1, 1, 1, slots) float32, 0 on the
    slots the new query sees (written, not padding) and -inf elsewhere. Used for bf16/fp16, where SDPA's
    CPU kernels take ~4 ms per layer for one query against 640 keys at 1B widths and two plain matmuls
    ~1 ms. An eager step (int `end`) attends over slots 0..end (rounded up); a compiled one (tensor `end`) over
    the whole cache, so that its shapes never change and it needs no recompiles. Scores are rounded to
    the compute dtype before the float32 softmax, as in transformers' eager attention; float32 keeps
    SDPA (and with it bitwise parity with transformers)."""

    def __init__(self, end: int | torch.Tensor, key_valid: torch.Tensor | None, max_len: int,
                 device: torch.device) -> None:
        # Eager: slots 0..end rounded up to a multiple of SLOT_STEP. oneDNN builds (and keeps, with its
        # scratch memory) a kernel per matmul shape: a shape per step cost 40% more time and 2 GB at 1B.
        self.slots = max_len if isinstance(end, torch.Tensor) else min(max_len, -(-end // SLOT_STEP) * SLOT_STEP)
        seen = torch.arange(self.slots, device=device)[None] < end
        if key_valid is not None:
            n = self.slots
            seen = seen & F.pad(key_valid[:, :n], (0, max(0, n - key_valid.shape[1])), value=False)
        self.bias = torch.zeros(seen.shape, device=device).masked_fill(~seen, float("-inf"))[:, None, None]

    @staticmethod
    def applies(cache: "KVCache | None", h: torch.Tensor, start: int | torch.Tensor) -> bool:
        """One new token on a cache, in bf16/fp16 or at a tensor `start` (compiled steps, any dtype)."""
        return cache is not None and h.shape[1] == 1 and (h.dtype != torch.float32 or isinstance(start, torch.Tensor))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, h, 1, d), the layer's whole cache k / v (B, kv, max_len, d) -> (B, 1, h * d)."""
        n = self.slots
        return cache_attention(q, k[:, :, :n], v[:, :, :n], self.bias)


# An opaque op to torch.compile: inductor would otherwise fuse these two matmuls and the softmax into one
# generated loop, several times slower on CPU than the two library matmuls.
@torch.library.custom_op("januskit::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    B, h, _, d = q.shape
    kv = k.shape[1]
    q = q.reshape(B, kv, h // kv, d)  # a kv head's query heads as rows of one matmul (GQA without copies)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * d ** -0.5 + bias
    y = torch.matmul(torch.softmax(s, -1).to(v.dtype), v)  # (B, kv, h / kv, d)
    return y.reshape(B, 1, h * d)


@cache_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape[0], 1, q.shape[1] * q.shape[3])


def packed_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) sample index per slot (-1 = padding) -> (B, 1, T, T) causal mask that never crosses
    sample boundaries, so a packed row computes exactly what its samples compute alone."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same | torch.eye(T, dtype=torch.bool, device=doc_ids.device))[:, None]


class PackedSegments:
    """Packed rows run without their padding and with per-sample attention instead of a (T, T) mask: the
    decoder sees only the real slots, as one sequence (pack / unpack), and attention gathers the samples,
    in groups of similar length, into (samples, longest, ...) batches and runs plain causal attention on
    them. Same math as packed_mask (padding slots come out as zeros; nothing reads them), a different
    summation order, and on CPU several times less attention work for short samples (a masked kernel
    computes every (T, T) score) and no work at all on padding. `of` returns None when a row is not
    samples back to back followed by padding (e.g. a JanusFlow row with hidden slots), or when there is
    nothing but padding: use packed_mask then."""

    GROUP = 0.8  # a sample joins the current attention group while its length is >= GROUP x the group's longest

    def __init__(self, keep: torch.Tensor, index: torch.Tensor, sizes: list[tuple[int, int]], inverse: torch.Tensor,
                 shape: tuple[int, int]) -> None:
        self.keep = keep  # (N,) flat slot b * T + t of each real slot, in order: the packed sequence
        self.index = index  # (sum n * L,) packed position per gathered position (short samples repeat their last)
        self.sizes = sizes  # per group: (n samples, L = the longest)
        self.inverse = inverse  # (N,) gathered position of each packed position
        self.shape = shape  # (B, T)
        self.padded = keep.numel() != shape[0] * shape[1]

    @classmethod
    def of(cls, doc_ids: torch.Tensor) -> "PackedSegments | None":
        B, T = doc_ids.shape
        d = doc_ids.cpu()
        real = (d >= 0).sum(1)
        slots = torch.arange(T)[None] < real[:, None]
        steps = d[:, 1:] - d[:, :-1]
        if int(real.sum()) == 0 or not bool(((d >= 0) == slots).all()) or bool(((steps < 0) & (d[:, 1:] >= 0)).any()):
            return None  # nothing real, a hidden slot before a real one, or a sample in two pieces
        keep = slots.flatten().nonzero().squeeze(1)
        dk, row = d.flatten()[keep], keep // T
        first = torch.ones(len(keep), dtype=torch.bool)
        first[1:] = (dk[1:] != dk[:-1]) | (row[1:] != row[:-1])
        starts = first.nonzero().squeeze(1)  # samples in packed positions
        lens = torch.diff(starts, append=torch.tensor([len(keep)]))
        groups: list[list[int]] = []
        for i in sorted(range(len(lens)), key=lambda i: -int(lens[i])):  # longest first
            if groups and int(lens[i]) >= cls.GROUP * int(lens[groups[-1][0]]):
                groups[-1].append(i)
            else:
                groups.append([i])
        index, sizes = [], []
        inverse = torch.empty(len(keep), dtype=torch.long)
        gathered = 0
        for g in groups:
            st, ln = starts[g], lens[g]
            n, L = len(g), int(ln[0])
            j = torch.arange(L)
            index.append((st[:, None] + torch.minimum(j[None], ln[:, None] - 1)).reshape(-1))
            valid = j[None] < ln[:, None]
            inverse[(st[:, None] + j[None])[valid]] = (gathered + torch.arange(n)[:, None] * L + j[None])[valid]
            sizes.append((n, L))
            gathered += n * L
        dev = doc_ids.device
        return cls(keep.to(dev), torch.cat(index).to(dev), sizes, inverse.to(dev), (B, T))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, N, ...): the real slots as one sequence."""
        if not self.padded:
            return x.reshape(1, -1, *x.shape[2:])
        return x.flatten(0, 1).index_select(0, self.keep)[None]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) -> (B, T, ...), zeros on padding."""
        B, T = self.shape
        if not self.padded:
            return x.view(B, T, *x.shape[2:])
        return x.new_zeros(B * T, *x.shape[2:]).index_copy(0, self.keep, x[0]).view(B, T, *x.shape[2:])

    @torch.compiler.disable  # per-sample shapes: eager (a compiled layer runs around it)
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Packed q (1, h, N, d), k / v (1, kv, N, d) -> (1, N, h * d) attention output per sample."""
        dev = q.device.type
        if torch.is_autocast_enabled(dev):  # the cast attention would make anyway, before the gathers
            q, k, v = (x.to(torch.get_autocast_dtype(dev)) for x in (q, k, v))
        # One gather per tensor (index_select: its backward is a cheap index_add, not an accumulating index_put).
        qs, ks, vs = (x[0].transpose(0, 1).index_select(0, self.index) for x in (q, k, v))  # (sum n * L, h, d)
        outs, at = [], 0
        for n, L in self.sizes:
            qq, kk, vv = (x[at:at + n * L].view(n, L, *x.shape[1:]).transpose(1, 2) for x in (qs, ks, vs))
            if dev == "cpu":
                y = _eager_causal_attention(qq, kk, vv, gqa)
            else:
                y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=gqa)  # (n, h, L, d)
            outs.append(y.transpose(1, 2).reshape(n * L, -1))
            at += n * L
        if not outs:
            return q.new_zeros(1, 0, q.shape[1] * q.shape[3])
        return torch.cat(outs).index_select(0, self.inverse)[None]


def _eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Causal attention as transformers' eager LLaMA attention computes it: scores and output by matmuls in the
    inputs' dtype (bf16 under autocast, like every autocast matmul), softmax in float32. On CPU, for samples of
    ~100 slots, about twice as fast as SDPA's math kernel (which runs bf16 in float32) and 3x the flash one;
    the training loss moves from float32's by as much as with the flash kernel (bench/README.md)."""
    if gqa and k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    L = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, -1, dtype=torch.float32).to(q.dtype), v)


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
                cache: KVCache | None, start: int, mask: torch.Tensor | PackedSegments | CacheBias | None) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if isinstance(mask, PackedSegments):
            return self.o_proj(mask.attend(q, k, v, self.n_kv != self.n_heads))
        if isinstance(mask, CacheBias):
            cache.write(layer, start, k, v)
            return self.o_proj(mask.attend(q, cache.k[layer], cache.v[layer]))
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
                cache: KVCache | None, start: int, mask: torch.Tensor | PackedSegments | CacheBias | None) -> torch.Tensor:
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
        self.packed_attention = "mask"  # set from outside: "mask" (packed_mask) or "segments" (PackedSegments)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """h: (B, S, dim) input embeddings; positions: (B, S) RoPE positions; writes cache slots
        start..start+S (a 1-element tensor `start`: one new token, as in a compiled decode step);
        key_valid: (B, start+S) bool, False on padding (None = no padding).
        Returns the final-normed hidden states (B, S, dim)."""
        if cache is None and not (isinstance(start, int) and start == 0):
            raise ValueError("start > 0 needs a KV cache holding the earlier positions")
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        if CacheBias.applies(cache, h, start):
            mask = CacheBias(start + 1, key_valid, cache.max_len, h.device)
        else:
            mask = attention_mask(start, h.shape[1], key_valid)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, i, cache, start, mask)
        return self.norm(h)

    def forward_packed(self, h: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                       capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training forward over packed rows (no cache): h (B, T, dim), positions restarting at 0 per
        sample, doc_ids (B, T) with -1 on padding. Returns the final-normed hidden states and, when
        `capture_layer` = k, the residual stream after layer k (1-based; for feature alignment)."""
        seg = PackedSegments.of(doc_ids) if self.packed_attention == "segments" else None
        if seg is not None:  # the real slots only, as one sequence
            h, positions = seg.pack(h), seg.pack(positions)
        cos, sin = rope_cos_sin(self.inv_freq, positions, h.dtype)
        mask = packed_mask(doc_ids) if seg is None else seg
        captured = None
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, i, None, 0, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, i, None, 0, mask)
            if capture_layer == i + 1:
                captured = h
        h = self.norm(h)
        if seg is not None:
            h, captured = seg.unpack(h), None if captured is None else seg.unpack(captured)
        return h, captured


class LlamaForCausalLM(nn.Module):
    """Decoder body (`model`) plus the untied text head (`lm_head`), as in the checkpoints."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        self.lm_head = TextHead(c.dim, c.vocab_size, bias=False)
