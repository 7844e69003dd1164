"""Speculative Jacobi decoding (januskit.sampling.speculative): how many LLM forwards it saves, and what a
forward of a window costs.

Acceptance (the default): the bundled default model on the world's test prompts (the first K per category,
J images each, generators (seed, i)), its own CFG weight, temperature 1, batches of 64 images as `januskit
eval world` runs them; per mode and window, the LLM forwards per image (prefill included; ordinary sampling:
64) and tokens per forward. Ordinary and speculative decoding are also timed, one after the other in this
process (a machine-dependent figure, and on a shared machine a noisy one).

    python bench/bench_speculative.py --prompts-per-category 50 --images-per-prompt 4 --windows 4 8 16 32

`--forward-cost`: one image's two CFG rows through a random-weight model of Janus-Pro-1B's widths, S new
tokens at cache slot 300, S = 1 (an ordinary decode step) against S = 4, 8, 16; interleaved repeats,
medians. A speculative round is worth its tokens per forward divided by this cost ratio.

    python bench/bench_speculative.py --forward-cost --threads 2 [--packed | --quantize int4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import januskit
from januskit.cli import DEFAULT_MODEL
from januskit.eval.world import _first_k, test_split
from januskit.models.llama import KVCache
from januskit.sampling.image_ar import generate_image_tokens
from januskit.sampling.logits import row_generator
from januskit.sampling.speculative import speculative_image_tokens
from januskit.world.dataset import read_prompts

BATCH = 64


def acceptance(k: int, ipp: int, windows: list[int], seed: int) -> None:
    pipe = januskit.load(DEFAULT_MODEL)
    prompts = _first_k(read_prompts(test_split(None) / "prompts.jsonl"), lambda r: r[0].category, k)
    ids = [pipe.processor.generation_prompt(p.text) for p, _ in prompts for _ in range(ipp)]
    T, w, pad = pipe.config.vq.n_tokens, pipe.default_cfg_weight, pipe.processor.pad_id
    print(f"{len(prompts)} prompts x {ipp} images, cfg {w}, temperature 1, {T} tokens per image, batches of {BATCH}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    def run(sample):
        t0 = time.perf_counter()
        outs = [sample(ids[i:i + BATCH], [row_generator(seed, j) for j in range(i, min(i + BATCH, len(ids)))])
                for i in range(0, len(ids), BATCH)]
        return outs, time.perf_counter() - t0

    _, plain_s = run(lambda p, g: generate_image_tokens(pipe.model, p, pad_id=pad, cfg_weight=w, generators=g))
    print(json.dumps(dict(mode="plain", images=len(ids), forwards_mean=T, tokens_per_forward=1.0,
                          seconds=round(plain_s, 1))), flush=True)
    for W in windows:
        for coupling in (False, True):
            outs, sec = run(lambda p, g: speculative_image_tokens(pipe.model, p, pad_id=pad, cfg_weight=w, generators=g,
                                                                  window=W, coupling=coupling))
            f = torch.cat([o.forwards for o in outs]).float()
            print(json.dumps(dict(mode="mc-sjd" if coupling else "sjd", window=W, images=len(ids),
                                  forwards_mean=round(f.mean().item(), 2), tokens_per_forward=round(T / f.mean().item(), 3),
                                  forwards_min=int(f.min()), forwards_max=int(f.max()),
                                  batch_forwards_mean=round(sum(o.batch_forwards for o in outs) / len(outs), 1),
                                  seconds=round(sec, 1), speedup_vs_plain=round(plain_s / sec, 2))), flush=True)


@torch.inference_mode()
def forward_cost(repeats: int, start: int = 300, quantize: str | None = None, packed: bool = False) -> None:
    pipe = januskit.load("janus-pro-1b", dtype="bfloat16", quantize=quantize)
    m, c = pipe.model, pipe.config
    if packed:
        from januskit.models.cpu_pack import pack_linears

        for part in (m.llm, m.gen_aligner, m.gen_head):
            pack_linears(part, 2)
    cache = KVCache(c.llm, 2, 600, torch.bfloat16)  # an ordinary decode's cache: a short prompt + 576 tokens
    x = torch.randint(0, c.vq.codebook_size, (2, start))
    m.llm(m.gen_embeds(x), torch.arange(start).expand(2, -1), cache, 0)  # slots 0..start hold keys
    times: dict[int, list[float]] = {S: [] for S in (1, 4, 8, 16)}
    for _ in range(repeats):
        for S in times:
            h = m.gen_embeds(torch.randint(0, c.vq.codebook_size, (2, S)))
            t0 = time.perf_counter()
            m.image_logits(m.llm(h, torch.arange(start, start + S).expand(2, -1), cache, start)).float()
            times[S].append(time.perf_counter() - t0)
    base = statistics.median(times[1])
    kind = quantize or ("bfloat16 packed" if packed else "bfloat16")
    print(f"Janus-Pro-1B widths (random weights), {kind}, 2 rows, cache slot {start}, {torch.get_num_threads()} "
          f"thread(s), medians of {repeats}")
    for S, t in times.items():
        print(f"S={S:2d}: {statistics.median(t) * 1000:7.1f} ms  ({statistics.median(t) / base:.2f}x a 1-token step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts-per-category", type=int, default=50)
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forward-cost", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantize", choices=("int8", "int4"), default=None, help="--forward-cost: weight-only quantised")
    ap.add_argument("--packed", action="store_true", help="--forward-cost: oneDNN-prepacked bf16 linears")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the random-weight preset's warning
    if args.forward_cost:
        forward_cost(args.repeats, quantize=args.quantize, packed=args.packed)
    else:
        acceptance(args.prompts_per_category, args.images_per_prompt, args.windows, args.seed)


if __name__ == "__main__":
    main()
