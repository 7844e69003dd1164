"""Image-token decoding over januskit's fast paths, side by side with transformers, in one script run.

    .venv/bin/python bench/bench_decode_paths.py --json docs/figures/decode-paths.json
    .venv/bin/python bench/bench_decode_paths.py --layers 24 --configs bf16-packed,int4,int4-compiled --repeats 1
    .venv/bin/python bench/bench_decode_paths.py --mode text        # chat decoding: 128 answer tokens
    .venv/bin/python bench/bench_decode_paths.py --vq-decode        # prompt to pixels adds this: the real VQ decoder

Same random weights for every row: Janus-Pro-1B widths with `--layers` LLM layers (bench_image_decode's
config), written once in the official layout and converted for transformers. One 384-px image (576
tokens, CFG: 2 rows), greedy, 2 threads unless `--threads`; or, with `--mode text`, a 128-token answer
to a text prompt (1 row, the 102400-word text head each step, no stop token). Each configuration runs in
its own child process (load, one untimed run that warms up and compiles, `--repeats` timed runs), so its
peak RSS is its own and compiled graphs do not leak between rows. The whole list, transformers first,
runs `--rounds` times over and each row keeps its best run: this VM has slow phases lasting minutes, and
rounds spread them over every configuration instead of one.

Columns: tok/s (576 / the best run's prompt-to-tokens time: prefill included, VQ decode excluded), ms
per step (the same time / 576), GB/s (weight bytes a step reads, in the row's storage format, over ms
per step), % of the bandwidth limit (a 2 GB streaming sum timed in the parent at the start), peak RSS
(quantised rows load with the streaming quantiser, as `januskit.load(..., quantize=)` does), and for
compiled rows the warm-up (the first run's extra time: the compile, or inductor's on-disk cache).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_image_decode import PROMPT, bench_config, weight_bytes, write_checkpoints  # noqa: E402

CONFIGS = {  # name: (pack_for_cpu, quantize, compile)
    "bf16": (False, None, False),
    "bf16-packed": (True, None, False),
    "bf16-compiled": (False, None, True),
    "int8": (False, "int8", False),
    "int8-compiled": (False, "int8", True),
    "int4": (False, "int4", False),
    "int4-compiled": (False, "int4", True),
}


def bandwidth_gbs(threads: int, gib: float = 2.0) -> float:
    """Best of 5 streaming float32 sums over `gib` GiB: what reading memory costs on this machine."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30 / 4))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


TEXT_TOKENS = 128


def step_bytes(c, quantize: str | None, group_size: int, mode: str) -> int:
    """Weight bytes a decode step reads: every LLM layer's linears and the gen head (text: the text head)
    in the row's format (norm weights and biases stay bf16)."""
    layers, head = weight_bytes(c, torch.bfloat16)
    if mode == "text":
        head = c.llm.dim * c.llm.vocab_size * 2
    if quantize is None:
        return layers + head
    per_param = 1 + 2 / c.llm.dim if quantize == "int8" else 0.5 + 4 / group_size  # + scales (and zeros)
    return int((layers + head) / 2 * per_param)


def vq_decode_seconds(threads: int, repeats: int = 3) -> dict[str, float]:
    """Prompt to pixels adds the VQ decoder: one 384-px image (24 x 24 ids) through the real Janus-Pro VQ
    (random weights), best of `repeats`, per dtype."""
    from januskit.config import preset
    from januskit.models.vq import VQModel

    torch.set_num_threads(threads)
    c = preset("janus-pro-1b").vq
    torch.manual_seed(0)
    ids = torch.randint(0, c.codebook_size, (1, c.n_tokens))
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        m = VQModel(c).to(dtype).eval()
        with torch.inference_mode():
            m.decode(ids)
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                m.decode(ids)
                ts.append(time.perf_counter() - t)
        out[str(dtype).removeprefix("torch.")] = min(ts)
    return out


def child(args: argparse.Namespace) -> dict:
    """One configuration: load, apply, warm up, time `repeats` runs."""
    from januskit.checkpoint.official import load_janus
    from januskit.processing.chat import Processor
    from januskit.sampling.image_ar import generate_image_tokens
    from januskit.sampling.text import generate_text

    torch.set_num_threads(args.threads)
    off = Path(args.ckpt) / "official"
    c = bench_config(args.layers, 384)
    proc = Processor.from_folder(off, c.vision.image_size, c.vision.n_tokens)
    ids = proc.generation_prompt(PROMPT)
    chat = proc.batch([proc.encode_chat(proc.user_turn(PROMPT, []), None)])
    if args.config == "transformers" and args.mode == "text":
        from transformers import JanusForConditionalGeneration

        hf = JanusForConditionalGeneration.from_pretrained(Path(args.ckpt) / "hf", dtype=torch.bfloat16).eval()

        def run():
            with torch.inference_mode():
                hf.generate(chat.input_ids, attention_mask=torch.ones_like(chat.input_ids), do_sample=False,
                            max_new_tokens=TEXT_TOKENS, min_new_tokens=TEXT_TOKENS)
    elif args.config == "transformers":
        from transformers import GenerationConfig, JanusForConditionalGeneration

        hf = JanusForConditionalGeneration.from_pretrained(Path(args.ckpt) / "hf", dtype=torch.bfloat16).eval()
        tok = proc.tokenizer
        gen_cfg = GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                   do_sample=False, guidance_scale=5.0, num_return_sequences=1,
                                   generation_kwargs={"boi_token_id": tok.boi_id})
        x = torch.tensor([ids])

        def run():
            with torch.inference_mode():
                hf.generate(x, attention_mask=torch.ones_like(x), generation_mode="image", generation_config=gen_cfg)
    else:
        packed, quantize, compile = CONFIGS[args.config]
        if quantize:
            from januskit.quantization import load_quantized

            model = load_quantized(off, torch.bfloat16, quantize, args.group_size)
        else:
            model = load_janus(off, torch.bfloat16)
        if packed:
            from januskit.models.cpu_pack import pack_linears

            parts = (model.language_model,) if args.mode == "text" else (model.llm, model.gen_aligner, model.gen_head)
            if not sum(pack_linears(p, 2 if args.mode == "image" else 1) for p in parts):
                raise SystemExit("oneDNN prepacking is not available in this torch build")

        def run():
            if args.mode == "text":  # no stop token: always TEXT_TOKENS steps, as transformers' min_new_tokens
                for _ in generate_text(model, chat, max_new_tokens=TEXT_TOKENS, stop_ids=[], compile=compile):
                    pass
            else:
                generate_image_tokens(model, [ids], pad_id=proc.pad_id, cfg_weight=5.0, temperature=0.0,
                                      compile=compile)
    times = []
    for _ in range(1 + args.repeats):  # the first run warms up (and compiles)
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return dict(config=args.config, first_s=times[0], times_s=times[1:], best_s=min(times[1:]),
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("image", "text"), default="image")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration per round")
    ap.add_argument("--rounds", type=int, default=2, help="passes over the configurations (best run kept)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--ckpt", type=Path, default=None, help="reuse this folder for the random checkpoint")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--vq-decode", action="store_true", help="only time the real VQ decoder (384 px) and exit")
    args = ap.parse_args()
    if args.vq_decode:
        print(json.dumps({f"vq_decode_s_{k}": round(v, 3) for k, v in vq_decode_seconds(args.threads).items()}))
        return 0
    if args.child:
        print(json.dumps(child(args)))
        return 0

    c = bench_config(args.layers, 384)
    ckpt = args.ckpt or Path(tempfile.gettempdir()) / f"januskit-bench-1b-{args.layers}l"
    write_checkpoints(c, ckpt, seed=0)
    limit = bandwidth_gbs(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    order = names if args.no_transformers else ["transformers", *names]
    runs: dict[str, list[dict]] = {name: [] for name in order}
    for rnd, name in ((r, n) for r in range(args.rounds) for n in order):
        cmd = [sys.executable, __file__, "--child", "1", "--config", name, "--ckpt", str(ckpt), "--layers",
               str(args.layers), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--group-size", str(args.group_size), "--mode", args.mode]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: the child run failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs[name].append(r)
        print(f"round {rnd + 1}: {name:15s} best {r['best_s']:.2f} s (first {r['first_s']:.2f} s)", flush=True)
    rows = []
    for name, rs in runs.items():
        r = min(rs, key=lambda x: x["best_s"])
        r = dict(r, rounds_best_s=[x["best_s"] for x in rs], first_s=min(x["first_s"] for x in rs),
                 peak_rss_gib=max(x["peak_rss_gib"] for x in rs))
        n_tok = c.vq.n_tokens if args.mode == "image" else TEXT_TOKENS
        r["tok_s"] = n_tok / r["best_s"]
        r["ms_step"] = 1e3 * r["best_s"] / n_tok
        _, quantize, compile = CONFIGS.get(name, (False, None, False))
        r["gb_s"] = step_bytes(c, quantize, args.group_size, args.mode) / (r["ms_step"] / 1e3) / 1e9
        r["limit_pct"] = 100 * r["gb_s"] / limit
        r["warmup_s"] = r["first_s"] - r["best_s"] if compile else None
        rows.append(r)
        print(f"{name:15s} {r['tok_s']:6.1f} tok/s {r['ms_step']:6.1f} ms/step {r['gb_s']:5.1f} GB/s "
              f"({r['limit_pct']:3.0f}% of {limit:.0f}) RSS {r['peak_rss_gib']:.2f} GiB"
              + (f" warm-up {r['warmup_s']:.0f} s" if r["warmup_s"] is not None else ""), flush=True)
    base = next((r["tok_s"] for r in rows if r["config"] == "transformers"), None)
    bf16 = next((r["tok_s"] for r in rows if r["config"] == "bf16"), None)
    packed = next((r["tok_s"] for r in rows if r["config"] == "bf16-packed"), None)
    for r in rows:
        r["vs_transformers"] = None if base is None else r["tok_s"] / base
        r["vs_bf16"] = None if bf16 is None else r["tok_s"] / bf16
        r["vs_bf16_packed"] = None if packed is None else r["tok_s"] / packed
    print("\n| config | tok/s | ms/step | weights GB/s | % of limit | peak RSS GiB | warm-up s | x transformers | x bf16 "
          "| x bf16-packed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(f"| {r['config']} | {r['tok_s']:.1f} | {r['ms_step']:.1f} | {r['gb_s']:.1f} | {r['limit_pct']:.0f} | "
              f"{r['peak_rss_gib']:.2f} | {f(r['warmup_s'], 0)} | {f(r['vs_transformers'])} | {f(r['vs_bf16'])} | "
              f"{f(r['vs_bf16_packed'])} |")
    for r in rows:
        b = r["rounds_best_s"]
        if len(b) > 1 and max(b) > 1.15 * min(b):
            print(f"note: {r['config']}'s rounds differ by {max(b) / min(b):.2f}x ({', '.join(f'{x:.1f}' for x in b)} s): "
                  "the machine had a slow phase")
    if args.json:
        args.json.write_text(json.dumps(dict(mode=args.mode, layers=args.layers, threads=args.threads, group_size=args.group_size,
                                             rounds=args.rounds, repeats=args.repeats,
                                             bandwidth_limit_gbs=limit, torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
