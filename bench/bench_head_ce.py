"""Peak host memory (and time) of a training head's cross-entropy, whole logits against row chunks.

The text head of Janus-Pro-7B maps 4096 -> 102400: the plain loss on N labelled tokens makes N x 102400
logits (bf16 out of the matmul, a float32 copy, float32 log-probabilities kept for backward, their
gradients), about 10-14 bytes each at the peak. januskit's heads compute it in row chunks of
`models.layers.CE_CHUNK_LOGITS` logits under activation checkpointing (`head_cross_entropy`). Each mode
runs in a fresh process: build the head and its gradient buffer, then one forward and backward under bf16
autocast; the peak RSS above that baseline is the loss's own memory (ru_maxrss, Linux).

    .venv/bin/python bench/bench_head_ce.py                       # 7B text head, 1024 tokens
    .venv/bin/python bench/bench_head_ce.py --tokens 4096 --json out.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(mode: str, dim: int, vocab: int, tokens: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from januskit.models.layers import TextHead

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    head = TextHead(dim, vocab, bias=False)
    head.weight.grad = torch.zeros_like(head.weight)  # the same gradient buffer in both modes, before the baseline
    x = torch.randn(tokens, dim, requires_grad=True)
    x.grad = torch.zeros_like(x)
    labels = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    t0 = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16):
        ce = F.cross_entropy(head(x).float(), labels, reduction="none") if mode == "plain" else head(x, labels=labels)
    ce.mean().backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return {"mode": mode, "loss": ce.mean().item(), "baseline_gib": round(base, 3), "peak_gib": round(peak, 3),
            "loss_memory_gib": round(peak - base, 3), "seconds": round(dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--child", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.dim, a.vocab, a.tokens, a.threads)))
        return
    rows = []
    for mode in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dim", str(a.dim), "--vocab", str(a.vocab),
                              "--tokens", str(a.tokens), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    from januskit.models.layers import CE_CHUNK_LOGITS

    logits = a.tokens * a.vocab
    res = {"dim": a.dim, "vocab": a.vocab, "tokens": a.tokens, "chunk_logits": CE_CHUNK_LOGITS, "runs": rows,
           "bytes_per_logit": {r["mode"]: round(r["loss_memory_gib"] * 2 ** 30 / logits, 2) for r in rows},
           "memory_ratio": round(rows[0]["loss_memory_gib"] / max(rows[1]["loss_memory_gib"], 1e-3), 1),
           "time_ratio_chunked_over_plain": round(rows[1]["seconds"] / rows[0]["seconds"], 2),
           "losses_equal": abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-3 * abs(rows[0]["loss"])}
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
