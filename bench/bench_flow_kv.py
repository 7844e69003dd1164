"""JanusFlow sampling speed: the prompt's KV cache computed once vs the prompt recomputed at every ODE
step (what the reference demo ends up doing), same weights, same noise, same process.

The model has JanusFlow-1.3B widths (LLM dim 2048, 16 heads, SwiGLU 5632, vocab 102400; ShallowUViT
768 channels; 4x48x48 latents -> 576 generation tokens) with only `--layers` LLM layers (24 in the
real model; the ratio depends on the sequence lengths, not the depth). The prompt is `--prompt-tokens`
random ids between BOS and <begin_of_image>, so it sweeps the one variable the ratio depends on: each
step feeds 577 new positions either way, plus the prompt when it is recomputed.

    python bench/bench_flow_kv.py                               # bf16, 4 layers, 30 steps, prompts 16..577
    python bench/bench_flow_kv.py --steps 30 --prompt-tokens 16 120 --repeats 3 --json out.json

Runs alternate (reuse, recompute, reuse, ...) so a slow phase of the VM hits both; the ratio is
recompute seconds / reuse seconds of the best repeats, and each pair's final latents are compared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from januskit.checkpoint.init import random_model
from januskit.config import preset
from januskit.sampling.flow import generate_latents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[16, 64, 256, 577])
    ap.add_argument("--n-images", type=int, default=1, help="images per run (2 CFG rows each)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    c = preset("janusflow-1.3b")
    c = dataclasses.replace(c, llm=dataclasses.replace(c.llm, n_layers=args.layers),
                            vision=dataclasses.replace(c.vision, layers=1))
    dtype = getattr(torch, args.dtype)
    model = random_model(c, seed=0, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"JanusFlow-1.3B widths, {args.layers} LLM layers, {args.dtype}, {args.steps} steps, "
          f"{args.n_images} image(s) = {2 * args.n_images} rows, {torch.get_num_threads()} threads")
    print(f"{'prompt':>7} {'reuse s':>9} {'recompute s':>12} {'ratio':>6} {'max |diff|':>11}")
    for L in args.prompt_tokens:
        ids = [1] + torch.randint(10, 1000, (L,), generator=g).tolist() + [2]
        prompts = [ids] * args.n_images
        z0 = torch.randn(args.n_images, *c.latent_shape, generator=g)
        times = {True: [], False: []}
        out = {}
        for _ in range(args.repeats):
            for reuse in (True, False):
                t = time.perf_counter()
                out[reuse] = generate_latents(model, prompts, z0, steps=args.steps, cfg_weight=2.0, reuse_prompt_kv=reuse)
                times[reuse].append(time.perf_counter() - t)
        a, b = min(times[True]), min(times[False])
        diff = float((out[True] - out[False]).abs().max())
        rows.append(dict(prompt_tokens=L, reuse_s=times[True], recompute_s=times[False], ratio=b / a, max_abs_diff=diff))
        print(f"{L:>7} {a:>9.2f} {b:>12.2f} {b / a:>6.2f} {diff:>11.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), torch=torch.__version__, machine=platform.machine(),
                           threads=torch.get_num_threads(), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
