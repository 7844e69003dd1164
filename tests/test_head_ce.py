"""The heads' cross-entropy in row chunks (models.layers.head_cross_entropy): the plain CE's values and
gradients, logits never kept for backward, and the training losses wired through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import januskit.models.layers as L
from januskit.models.layers import TextHead, VisionHead
from januskit.train.losses import head_ce


def _plain(head, x, labels):
    return F.cross_entropy(head(x).float(), labels, reduction="none")


def _grads(fn, head, x, labels, w):
    x = x.clone().requires_grad_(True)
    head.zero_grad()
    ce = fn(head, x, labels)
    (ce * w).sum().backward()
    return ce.detach(), x.grad, [p.grad.clone() for p in head.parameters()]


def _close(got, want, tol: float) -> None:
    """Loss, x's gradient and every parameter's gradient within tol of the largest entry of each."""
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max(), (a, b)


@pytest.mark.parametrize("kind", ["text", "vision"])
@pytest.mark.parametrize("autocast", [False, True])
def test_chunks_give_the_plain_values_and_gradients(kind, autocast, monkeypatch):
    torch.manual_seed(0)
    head = TextHead(32, 300, bias=False) if kind == "text" else VisionHead(32, 48, 300)
    x, labels, w = torch.randn(23, 32), torch.randint(0, 300, (23,)), torch.rand(23)
    monkeypatch.setattr(L, "MIN_CE_COLUMNS", 64)
    monkeypatch.setattr(L, "CE_CHUNK_LOGITS", 5 * 300)  # text: 65 outputs a chunk (4 of 65, one of 40); image: 5 rows
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        want = _grads(_plain, head, x, labels, w)
        got = _grads(lambda h, a, b: h(a, labels=b), head, x, labels, w)
    assert got[0].dtype == torch.float32 and got[0].shape == (23,)
    _close(got, want, 1e-2 if autocast else 1e-5)  # bf16: its rounding (observed <= 0.8%); float32: sum order
    assert want[0].mean() > 1  # random logits: a real loss, not a degenerate zero


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_logits_are_not_kept_for_backward(kind, monkeypatch):
    """What autograd keeps for backward besides the inputs and the weights: the plain CE keeps float32
    log-probabilities of every row (N x V x 4 bytes); the chunked one keeps nothing of the logits (the text
    head: each row's log-sum-exp; the image head: its checkpointed chunks keep only their inputs)."""
    torch.manual_seed(0)
    head = TextHead(16, 4000, bias=False) if kind == "text" else VisionHead(16, 16, 4000)
    x = torch.randn(64, 16, requires_grad=True)
    labels = torch.randint(0, 4000, (64,))
    own = {x.data_ptr()} | {p.data_ptr() for p in head.parameters()}

    def kept(fn) -> int:
        total = [0]

        def pack(t):
            if t.data_ptr() not in own:
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return total[0]

    plain = kept(lambda: _plain(head, x, labels))
    monkeypatch.setattr(L, "CE_CHUNK_LOGITS", 8 * 4000)  # text: 8 chunks of 500 outputs; image: 8 of 8 rows
    chunked = kept(lambda: head(x, labels=labels))
    assert plain >= 64 * 4000 * 4
    assert chunked < 64 * 4000 / 4  # under a sixteenth of the plain path's float32 log-probabilities


def test_bf16_weights_give_the_plain_gradients_in_their_dtype(monkeypatch):
    """FSDP2 with bf16 parameters hands the head a bf16 weight: the gradient comes back in bf16, summed over
    the chunks in float32 first."""
    torch.manual_seed(0)
    head = TextHead(32, 300, bias=False).to(torch.bfloat16)
    x, labels, w = torch.randn(40, 32, dtype=torch.bfloat16), torch.randint(0, 300, (40,)), torch.rand(40)
    want = _grads(_plain, head, x, labels, w)
    monkeypatch.setattr(L, "MIN_CE_COLUMNS", 64)
    monkeypatch.setattr(L, "CE_CHUNK_LOGITS", 3 * 300)  # 64 outputs a chunk
    got = _grads(lambda h, a, b: h(a, labels=b), head, x, labels, w)
    assert got[1].dtype == got[2][0].dtype == torch.bfloat16
    _close(got, want, 1e-2)


def test_small_heads_stay_on_the_plain_path_and_no_grad_needs_no_checkpoint(monkeypatch):
    torch.manual_seed(0)
    head = TextHead(8, 50, bias=False)
    x, labels = torch.randn(10, 8), torch.randint(0, 50, (10,))
    assert torch.equal(head(x, labels=labels), _plain(head, x, labels))  # 500 logits: one plain call
    monkeypatch.setattr(L, "CE_CHUNK_LOGITS", 150)
    with torch.no_grad():
        torch.testing.assert_close(head(x, labels=labels), _plain(head, x, labels), rtol=1e-6, atol=1e-6)
    assert head(x).shape == (10, 50)  # without labels: logits, as nn.Linear


def test_head_ce_asks_januskit_heads_for_their_loss_and_wrapped_heads_for_logits(monkeypatch):
    calls = []
    for cls in (TextHead, VisionHead):
        monkeypatch.setattr(cls, "forward", lambda self, x, labels=None: calls.append(type(self)) or torch.zeros(3))
    x, labels = torch.randn(3, 8), torch.tensor([0, 1, 2])
    head_ce(TextHead(8, 6, bias=False), x, labels)
    head_ce(VisionHead(8, 4, 5), x, labels)
    assert calls == [TextHead, VisionHead]
    plain = torch.nn.Linear(8, 6, bias=False)  # e.g. a quantised or adapter-wrapped head: its logits
    torch.testing.assert_close(head_ce(plain, x, labels), _plain(plain, x, labels))
    assert len(calls) == 2
