"""Image-token decoding speed: januskit vs transformers' JanusForConditionalGeneration, same weights.

Builds a random-weight checkpoint with Janus-Pro-1B widths (LLM dim 2048, 16 heads, SwiGLU 5632,
vocab 102400, gen head 2048 -> 2048 -> 16384) but only `--layers` decoder layers, writes it with
januskit's own code (official layout), converts it to the HF layout with `official_to_hf`, loads both,
and times text-to-image token generation with CFG (2 rows per image, cfg weight 5) and greedy
selection on both, so the work is identical. SigLIP and the VQ model are tiny (they take no part in
decoding); their image size sets the number of image tokens ((image_size / 16) ** 2: 384 -> 576).

Timing: each run is one full generate call (prefill + decode), timed with time.perf_counter after
warm-up runs. A forward hook on the LLM body of each implementation marks the end of every LLM call, so
a run splits into prefill (up to the end of the first LLM call, including cache set-up) and decode (the
rest: 575 one-token LLM steps and 576 gen-head evaluations + CFG + argmax). tokens/s = image tokens /
decode seconds. By default the timed runs of the two implementations go step by step in turn (each in
its own thread; the hook hands the turn over), so a slow phase of a throttled VM hits both alike;
--sequential times whole runs one after the other instead.

    python bench/bench_image_decode.py                    # bf16, 4 layers, 1 image (2 CFG rows)
    python bench/bench_image_decode.py --dtype float32 --json out.json
    python bench/bench_image_decode.py --n-images 4 --threads 1 --sequential
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from januskit.checkpoint.convert import official_to_hf
from januskit.checkpoint.init import processor_files, random_model, random_unused, synthetic_tokenizer
from januskit.checkpoint.official import load_janus, save_janus
from januskit.checkpoint.official_config import to_official
from januskit.config import JanusConfig, preset
from januskit.processing.chat import Processor
from januskit.sampling.image_ar import generate_image_tokens

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PROMPT = "A close-up photo of a red fox sitting in the snow at sunrise, highly detailed."


def bench_config(layers: int, image_size: int) -> JanusConfig:
    """Janus-Pro-1B widths, `layers` LLM layers, tiny SigLIP / VQ at `image_size` (tokens = (size/16)^2)."""
    if image_size % 16:
        raise SystemExit(f"--image-size must be a multiple of 16, got {image_size}")
    base, tiny = preset("janus-pro-1b"), preset("tiny-janus-pro")
    vision = dataclasses.replace(tiny.vision, image_size=image_size)
    # Tiny VQ channels (factor 16), but the real codebook so the gen head is 2048 -> 16384.
    vq = dataclasses.replace(tiny.vq, codebook_size=base.vq.codebook_size, codebook_dim=base.vq.codebook_dim,
                             image_size=image_size)
    c = dataclasses.replace(base, llm=dataclasses.replace(base.llm, n_layers=layers), vision=vision, vq=vq,
                            aligner=dataclasses.replace(base.aligner, input_dim=vision.width))
    assert c.vision.n_tokens == c.vq.n_tokens  # HF takes the image-token count from the vision config
    return c


def write_checkpoints(c: JanusConfig, root: Path, seed: int) -> tuple[Path, Path]:
    """Random official-layout folder (bf16, like the released checkpoints) + its HF-layout conversion."""
    off, hf = root / "official", root / "hf"
    if (off / "config.json").is_file() and (hf / "config.json").is_file():
        if json.loads((off / "config.json").read_text()) == to_official(c):
            return off, hf
    model = random_model(c, seed, torch.bfloat16)
    tok = synthetic_tokenizer("janus-pro-1b", c)
    files = {"tokenizer.json": tok.to_json_str(), **processor_files(c)}
    save_janus(model, off, unused=random_unused(c, seed, torch.bfloat16), files=files, overwrite=True)
    del model
    gc.collect()
    official_to_hf(off, hf, overwrite=True)
    return off, hf


def weight_bytes(c: JanusConfig, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes read per step: (all LLM decoder layers, gen head)."""
    d, i, e = c.llm.dim, c.llm.intermediate_size, torch.finfo(dtype).bits // 8
    hd = c.llm.head_dim
    attn = d * (c.llm.n_heads + 2 * c.llm.kv_heads) * hd + c.llm.n_heads * hd * d
    layer = attn + 3 * d * i + 2 * d
    g = c.gen_head
    head = g.n_embed * g.image_token_embed + g.image_token_embed + g.image_token_embed * g.image_token_size + g.image_token_size
    return c.llm.n_layers * layer * e, head * e


class StepClock:
    """Forward hook on an LLM body: stamps the end of every call (the first one is the prefill).
    `on_step`, when set, runs inside the hook after the stamp (used to hand over turns)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.stamps: list[float] = []
        self.on_step = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_) -> None:
        self.stamps.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step()

    def run(self, fn):
        self.stamps.clear()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return out, dict(total=t1 - t0, prefill=self.stamps[0] - t0, decode=t1 - self.stamps[0],
                         llm_calls=len(self.stamps), median_step=statistics.median(steps) if steps else float("nan"))


def run_interleaved(runners: dict) -> dict:
    """Run every implementation's generate at once, in its own thread, but one step at a time in turn:
    each LLM-call hook passes the turn on and waits for it to come back. Only the turn holder computes,
    so each is timed alone, and a slow phase of the machine hits all implementations alike.
    Returns {name: (output, metrics)} with the same metrics as StepClock.run."""
    names = list(runners)
    cond = threading.Condition()
    state = {"turn": names[0], "active": set(names)}
    turns: dict[str, list[float]] = {n: [] for n in names}
    began: dict[str, float] = {}
    result: dict[str, tuple] = {}
    threads = torch.get_num_threads()

    def wait_turn(me: str) -> None:  # with cond held
        while state["turn"] != me:
            cond.wait()
        began[me] = time.perf_counter()

    def pass_turn(me: str) -> None:  # with cond held
        live = [n for n in names if n in state["active"]]
        if live:
            state["turn"] = live[(live.index(me) + 1) % len(live)] if me in live else live[0]
        cond.notify_all()

    def on_step(me: str) -> None:
        turns[me].append(time.perf_counter() - began[me])
        with cond:
            pass_turn(me)
            wait_turn(me)

    def worker(me: str) -> None:
        torch.set_num_threads(threads)
        clock, fn = runners[me]
        clock.stamps.clear()
        clock.on_step = lambda: on_step(me)
        try:
            with cond:
                wait_turn(me)
            out = fn()
            turns[me].append(time.perf_counter() - began[me])
            result[me] = out
        finally:
            clock.on_step = None
            with cond:
                state["active"].discard(me)
                pass_turn(me)

    workers = [threading.Thread(target=worker, args=(n,)) for n in names]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    report = {}
    for n in names:
        if n not in result:
            raise SystemExit(f"{n}: interleaved run failed")
        t = turns[n]  # t[0]: prefill, then one turn per step (rest of the step up to the next LLM call)
        report[n] = (result[n], dict(total=sum(t), prefill=t[0], decode=sum(t[1:]), llm_calls=len(runners[n][0].stamps),
                                     median_step=statistics.median(t[1:-1]) if len(t) > 2 else float("nan")))
    return report


def make_runners(off: Path, hf_dir: Path, c: JanusConfig, dtype: torch.dtype, n_images: int, cfg: float,
                 packed: bool = False):
    proc = Processor.from_folder(off, c.vision.image_size, c.vision.n_tokens)
    tok = proc.tokenizer
    ids = proc.generation_prompt(PROMPT)
    assert ids[0] == tok.bos_id and ids[-1] == tok.boi_id and tok.bos_id not in ids[1:] and tok.boi_id not in ids[:-1]

    jk = load_janus(off, dtype)

    from transformers import GenerationConfig, JanusForConditionalGeneration

    hf = JanusForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).eval()
    # Same weights? (guards against keys HF would silently initialise)
    pairs = [(jk.gen_head.vision_head.weight, hf.model.generation_head.vision_head.weight),
             (jk.llm.layers[-1].mlp.down_proj.weight, hf.model.language_model.layers[-1].mlp.down_proj.weight),
             (jk.gen_aligner.layers[2].weight, hf.model.generation_aligner.hidden_layers[0].weight)]
    for a, b in pairs:
        if a.dtype != b.dtype or not torch.equal(a, b):
            raise SystemExit("januskit and HF weights differ after loading: conversion or loading problem")
    if packed:  # januskit's optional CPU path (januskit.models.cpu_pack), after the weight check above
        from januskit.models.cpu_pack import pack_linears
        if not sum(pack_linears(part, 2 * n_images) for part in (jk.language_model, jk.gen_aligner, jk.gen_head)):
            raise SystemExit("--packed: oneDNN prepacking is not available in this torch build")

    gen_cfg = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                               do_sample=False, guidance_scale=cfg, num_return_sequences=1,
                               generation_kwargs={"boi_token_id": tok.boi_id})
    input_ids = torch.tensor([ids] * n_images)

    def run_jk() -> torch.Tensor:
        return generate_image_tokens(jk, [ids] * n_images, pad_id=tok.pad_id, cfg_weight=cfg, temperature=0.0)

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_mode="image",
                               generation_config=gen_cfg)

    return dict(januskit=(StepClock(jk.llm), run_jk), transformers=(StepClock(hf.model.language_model), run_hf)), len(ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--layers", type=int, default=4, help="LLM decoder layers (Janus-Pro-1B has 24)")
    ap.add_argument("--image-size", type=int, default=384, help="generated image side; tokens = (size/16)^2 (384 -> 576)")
    ap.add_argument("--n-images", type=int, default=1, help="images per run; CFG doubles the rows")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (interleaved)")
    ap.add_argument("--time-budget", type=float, default=540.0,
                    help="seconds: skip the remaining repeats once the next round would end past this (0 = no limit; "
                         "at least one timed run per implementation always happens)")
    ap.add_argument("--sequential", action="store_true",
                    help="time whole runs one after the other instead of interleaving the implementations step by "
                         "step (the default interleaving is robust to slow phases of a throttled machine)")
    ap.add_argument("--cfg", type=float, default=5.0, help="CFG weight")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    ap.add_argument("--only", choices=("januskit", "transformers"), default=None, help="time one implementation")
    ap.add_argument("--packed", action="store_true", help="januskit with oneDNN-prepacked weights (pack_for_cpu)")
    ap.add_argument("--ckpt-dir", type=Path, default=None,
                    help="write (or reuse) the random checkpoints here instead of a temporary folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    c = bench_config(args.layers, args.image_size)
    n_tok, rows = c.vq.n_tokens, 2 * args.n_images
    layer_b, head_b = weight_bytes(c, dtype)
    bytes_per_run = (n_tok - 1) * layer_b + n_tok * head_b  # 575 LLM steps + 576 gen-head evaluations
    print(f"config: LLM {c.llm.n_layers} layers x dim {c.llm.dim} (heads {c.llm.n_heads}, mlp {c.llm.intermediate_size}, "
          f"vocab {c.llm.vocab_size}); gen head {c.gen_head.n_embed}->{c.gen_head.image_token_embed}->"
          f"{c.gen_head.image_token_size}; {n_tok} image tokens ({args.image_size}px); {args.n_images} image(s) = "
          f"{rows} CFG rows; dtype {args.dtype}; threads {torch.get_num_threads()}")
    if not args.sequential and not args.only:
        print("timed runs interleave januskit and transformers step by step (--sequential: whole runs in turn)")
    print(f"weights read per step: LLM layers {layer_b / 1e6:.1f} MB + gen head {head_b / 1e6:.1f} MB")

    tmp = None
    root = args.ckpt_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="januskit-bench-")
        root = Path(tmp.name)
    try:
        t = time.perf_counter()
        off, hf_dir = write_checkpoints(c, root, args.seed)
        print(f"checkpoints ready in {time.perf_counter() - t:.1f}s ({root})")
        t = time.perf_counter()
        runners, prompt_len = make_runners(off, hf_dir, c, dtype, args.n_images, args.cfg, args.packed)
        print(f"both models loaded in {time.perf_counter() - t:.1f}s; prompt {prompt_len} tokens")
        names = [args.only] if args.only else list(runners)

        outs: dict[str, torch.Tensor] = {}
        for name in names:
            for w in range(args.warmup):
                clock, fn = runners[name]
                outs[name], m = clock.run(fn)
                print(f"  warmup {name}: {m['total']:.2f}s")
        times: dict[str, list[dict]] = {n: [] for n in names}
        round_s = 0.0  # seconds of the last round, for the time budget
        for r in range(args.repeats):
            elapsed = time.perf_counter() - t_start
            if r > 0 and args.time_budget > 0 and elapsed + round_s > args.time_budget:
                print(f"  time budget: stopping after {r} of {args.repeats} repeats ({elapsed:.0f}s elapsed, "
                      f"a round takes {round_s:.0f}s, --time-budget {args.time_budget:.0f}s)")
                break
            t_round = time.perf_counter()
            inter = run_interleaved({n: runners[n] for n in names}) if not args.sequential and len(names) > 1 else None
            for name in names:
                if inter is not None:
                    outs[name], m = inter[name]
                else:
                    clock, fn = runners[name]
                    outs[name], m = clock.run(fn)
                if m["llm_calls"] != n_tok:
                    raise SystemExit(f"{name}: {m['llm_calls']} LLM calls, expected {n_tok} (prefill + {n_tok - 1} steps)")
                times[name].append(m)
                print(f"  run {r + 1} {name}: total {m['total']:.2f}s, prefill {m['prefill']:.3f}s, "
                      f"decode {m['decode']:.2f}s ({m['median_step'] * 1e3:.1f} ms/step median)")
            round_s = time.perf_counter() - t_round

        results = {}
        for name in names:
            dec = [m["decode"] for m in times[name]]
            best = min(dec)
            results[name] = dict(
                decode_s=dec, total_s=[m["total"] for m in times[name]], prefill_s=[m["prefill"] for m in times[name]],
                median_step_ms=[m["median_step"] * 1e3 for m in times[name]],
                best_decode_s=best, median_decode_s=statistics.median(dec),
                tokens_per_s_best=args.n_images * n_tok / best,
                tokens_per_s_median=args.n_images * n_tok / statistics.median(dec),
                tokens_per_s_median_step=args.n_images / statistics.median(m["median_step"] for m in times[name]),
                weight_gb_per_s_best=bytes_per_run / best / 1e9)

        print()
        hdr = f"{'implementation':<14} {'dtype':<9} {'rows':>4} {'tokens':>7} {'best s':>8} {'median s':>9} " \
              f"{'tok/s best':>10} {'tok/s med':>10} {'ms/step':>8} {'tok/s@step':>10} {'weights GB/s':>12}"
        print(hdr)
        print("-" * len(hdr))
        for name, r in results.items():
            print(f"{name:<14} {args.dtype:<9} {rows:>4} {args.n_images * n_tok:>7} {r['best_decode_s']:>8.2f} "
                  f"{r['median_decode_s']:>9.2f} {r['tokens_per_s_best']:>10.1f} {r['tokens_per_s_median']:>10.1f} "
                  f"{statistics.median(r['median_step_ms']):>8.2f} {r['tokens_per_s_median_step']:>10.1f} "
                  f"{r['weight_gb_per_s_best']:>12.1f}")
        ratio = None
        if len(results) == 2:
            ratio = results["januskit"]["tokens_per_s_best"] / results["transformers"]["tokens_per_s_best"]
            ratio_med = results["januskit"]["tokens_per_s_median"] / results["transformers"]["tokens_per_s_median"]
            ratio_step = results["januskit"]["tokens_per_s_median_step"] / results["transformers"]["tokens_per_s_median_step"]
            print(f"\nspeed ratio januskit / transformers (tokens/s): best {ratio:.3f}, median {ratio_med:.3f}, "
                  f"median step {ratio_step:.3f}")
        spread = max(max(r["decode_s"]) / min(r["decode_s"]) for r in results.values())
        if spread > 1.25:
            print(f"warning: decode times vary {spread:.1f}x between repeats: the machine was throttled or busy "
                  "(compare 'best' or the median-step figures, or rerun)")

        agree = None
        if len(outs) == 2:
            a, b = outs["januskit"].cpu(), outs["transformers"].cpu()
            lead = []
            for ra, rb in zip(a, b):
                diff = (ra != rb).nonzero()
                lead.append(int(diff[0]) if len(diff) else len(ra))
            agree = dict(leading_match_per_image=lead, identical_images=sum(x == n_tok for x in lead),
                         equal_fraction=float((a == b).float().mean()))
            print(f"greedy agreement: leading matching tokens per image {lead} of {n_tok} "
                  f"({agree['equal_fraction'] * 100:.1f}% equal positions overall)")
        wall = time.perf_counter() - t_start
        print(f"wall time {wall:.0f}s")

        if args.json:
            import transformers
            report = dict(
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                config=dict(layers=c.llm.n_layers, dim=c.llm.dim, heads=c.llm.n_heads, intermediate=c.llm.intermediate_size,
                            vocab=c.llm.vocab_size, gen_head=[c.gen_head.n_embed, c.gen_head.image_token_embed,
                                                              c.gen_head.image_token_size],
                            image_tokens=n_tok, rows=rows, prompt_tokens=prompt_len),
                bytes_per_step=dict(llm_layers=layer_b, gen_head=head_b), results=results, ratio_best=ratio,
                agreement=agree, wall_s=wall,
                env=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                         threads=torch.get_num_threads(), cpus=os.cpu_count(), machine=platform.machine()))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
