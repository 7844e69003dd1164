"""Server batching: N concurrent image requests against the same N requests one after another, on a
live server on 127.0.0.1, same process, same weights.

Each request asks for one image (prompt i, seed i). Sequentially every request decodes alone (2 CFG
rows); concurrently the engine decodes them together (2N rows in one forward per token). The ratio is
sequential seconds / concurrent seconds; each concurrent image must equal its sequential twin byte for
byte (Janus: discrete tokens; JanusFlow: see tests/test_serve.py for its 1-level tolerance).

    python bench/bench_serve_batching.py                          # bundled miniature Janus-Pro, N = 2 4 8
    python bench/bench_serve_batching.py --model janus-pro-1b --layers 4 --n 2 4   # real widths, random weights
"""
from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import httpx
import torch

import januskit
from januskit.serving.engine import Limits
from januskit.serving.server import ServerThread

PROMPTS = ["a red circle", "a blue square to the left of a green triangle", "two yellow stars",
           "a purple circle above an orange square", "three green triangles", "a red square below a blue circle",
           "a cyan star", "a green circle to the right of a red triangle"]


def load(model: str | None, layers: int | None):
    if model is None:
        return januskit.load(Path(januskit.__file__).parent / "assets" / "default-model")
    if Path(model).is_dir():
        return januskit.load(model)
    import dataclasses

    from januskit.checkpoint.init import random_model, synthetic_tokenizer
    from januskit.config import preset
    from januskit.pipelines.janus import JanusPipeline
    from januskit.processing.chat import Processor
    from januskit.processing.image import ImageTransform

    c = preset(model)
    if layers:  # keep the real widths, cut the depth (the ratio depends on widths and rows, not depth)
        c = dataclasses.replace(c, llm=dataclasses.replace(c.llm, n_layers=layers))
    proc = Processor(synthetic_tokenizer(model, c), ImageTransform(size=c.vision.image_size), c.vision.n_tokens)
    return JanusPipeline(random_model(c, 0, torch.bfloat16), proc, f"preset:{model} ({c.llm.n_layers} layers)")


def post(url: str, i: int, out: list, extra: dict) -> None:
    r = httpx.post(url + "/v1/images/generations", timeout=3600,
                   json={"prompt": PROMPTS[i % len(PROMPTS)], "n": 1, "seed": i, **extra})
    r.raise_for_status()
    out[i] = r.json()["data"][0]["b64_json"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or preset (random weights); default: bundled")
    ap.add_argument("--layers", type=int, default=None, help="presets only: keep this many LLM layers")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="concurrent requests")
    ap.add_argument("--steps", type=int, default=None, help="JanusFlow: Euler steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load(args.model, args.layers)
    extra = {"steps": args.steps} if args.steps else {}
    rows = []
    with ServerThread(pipe, model_id="bench", limits=Limits(max_batch_images=max(args.n), max_queue=64,
                                                            timeout_s=3600)) as s:
        post(s.url, 0, [None], extra)  # warm-up
        for n in args.n:
            seq = [None] * n
            t0 = time.perf_counter()
            for i in range(n):
                post(s.url, i, seq, extra)
            t_seq = time.perf_counter() - t0
            con = [None] * n
            ts = [threading.Thread(target=post, args=(s.url, i, con, extra)) for i in range(n)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            t_con = time.perf_counter() - t0
            batch = list(s.engine.batches)[-1]
            row = dict(requests=n, sequential_s=round(t_seq, 3), concurrent_s=round(t_con, 3),
                       speedup=round(t_seq / t_con, 2), last_batch=batch, identical=sum(a == b for a, b in zip(seq, con)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = dict(model=pipe.source, arch=pipe.arch, threads=args.threads, machine=platform.processor() or platform.machine(),
                  rows=rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
