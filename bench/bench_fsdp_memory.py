"""Per-rank host memory and tokens/s of FSDP2 training at the Janus-Pro-7B width, on 1, 2 and 4 CPU ranks
(gloo), and from them the memory a full 7B Stage III run needs per GPU at 8 and 64 ranks.

    nice .venv/bin/python bench/bench_fsdp_memory.py --ckpt-dir /tmp/j7b-2l --json bench/fsdp-memory.json
    nice .venv/bin/python bench/bench_fsdp_memory.py --ckpt-dir /tmp/j7b-2l --ranks 2 --legacy   # full build
    nice .venv/bin/python bench/bench_fsdp_memory.py --ckpt-dir /tmp/j7b-2l --param-dtype bfloat16  # bf16 units

**Model.** The janus-pro-7b preset (LLM dim 4096, 32 heads, SwiGLU 11008, vocab 102400; SigLIP-L; the VQ) with
`--layers` decoder layers instead of 30: a random checkpoint in the official layout, bf16 as released, written
once into `--ckpt-dir`. **Run.** For each rank count, fresh processes (parallel.spawn, as torchrun starts
them) build the training module as `januskit train` does with `parallel = "fsdp"`: on meta, sharded, each
rank reading only its rows (`--legacy`: the whole model built on every rank first, the path before
januskit.train.sharded), then take `--steps` optimiser steps of `--stage` on synthetic data, the global batch
fixed at `--batch` rows of `--seq-len` slots, bf16 autocast. Each rank reports its peak RSS (ru_maxrss) after
the build and after the steps, the bytes of its own shards, and its tokens/s (the first step excluded); and, to
place the part that does not shrink with ranks, its resident size now after the build and after each step, and
the first step's trace: the resident size as each FSDP unit's forward starts and ends and its backward starts.

**Extrapolation.** Per-rank state of a sharded run = (4 B fp32 master + 4 B gradient + 8 B AdamW) per trainable
parameter / ranks + 4 B per frozen (replicated) parameter, plus what does not shrink with ranks (the two largest
units gathered in the compute dtype, activations, the process itself), which the measured RSS minus the shards gives.
The table prints both for the real 7B (30 layers) at 8 and 64 ranks.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 1024**3


def model_folder(ckpt_dir: Path, layers: int, seed: int, name: str = "janus-pro-7b") -> Path:
    """The checkpoint of preset `name` at `layers` decoder layers (written when missing or different)."""
    import dataclasses

    import torch

    from januskit.checkpoint.init import random_model, random_unused, synthetic_tokenizer, processor_files
    from januskit.checkpoint.official import save_janus
    from januskit.config import preset

    c = preset(name)
    c = dataclasses.replace(c, llm=dataclasses.replace(c.llm, n_layers=layers))
    marker = ckpt_dir / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"preset": name, "layers": layers, "seed": seed}:
        return ckpt_dir
    t = time.perf_counter()
    model = random_model(c, seed, torch.bfloat16)
    files = {"tokenizer.json": synthetic_tokenizer(name, c).to_json_str(), **processor_files(c)}
    save_janus(model, ckpt_dir, unused=random_unused(c, seed, torch.bfloat16), files=files, overwrite=True)
    marker.write_text(json.dumps({"preset": name, "layers": layers, "seed": seed}))
    print(f"wrote {ckpt_dir} ({layers} layers) in {time.perf_counter() - t:.0f} s", flush=True)
    return ckpt_dir


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def current_rss_gib() -> float:
    """The resident size now (not the peak): /proc/self/statm's second field, in pages."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def trace_units(model, plan, trace: list) -> None:
    """Record the current RSS as each FSDP unit's forward starts and ends and its backward starts (hooks), so the
    step's peak can be placed: which unit was gathered, and how much the activations and the optimizer add."""
    names = {id(m): n for n, m in model.named_modules()}
    for u in plan.units:
        n = names.get(id(u), type(u).__name__)
        u.register_forward_pre_hook(lambda m, a, n=n: trace.append((f"fwd {n}", current_rss_gib())))
        u.register_forward_hook(lambda m, a, o, n=n: trace.append((f"fwd end {n}", current_rss_gib())))
        u.register_full_backward_pre_hook(lambda m, g, n=n: trace.append((f"bwd {n}", current_rss_gib())))


def worker(opts: dict[str, Any]) -> None:
    """One rank: build, measure, step, measure; rank 0 writes every rank's figures to opts['out']."""
    import torch
    from torch.distributed.tensor import DTensor

    from januskit.train import parallel
    from januskit.train import trainer as T
    from januskit.train.config import RunConfig

    torch.set_num_threads(opts["threads"])
    parallel.init("cpu")
    cfg = RunConfig.from_dict({
        "model": {"source": opts["source"]},
        "stage": {"name": opts["stage"], "steps": opts["steps"], "batch_size": opts["batch"], "lr": 1e-5,
                  "warmup": 0},
        "train": {"out": opts["run"], "micro_batch_size": 1, "seq_len": opts["seq_len"], "parallel": "fsdp",
                  "autocast": "bfloat16", "gradient_checkpointing": True, "progress": False, "plot": False,
                  "fsdp_param_dtype": opts["param_dtype"]},
        "data": {"builder": "januskit.train.data.synthetic:build", "text_len": [4, 16]},
    })
    if opts["legacy"]:  # the path before sharded construction: every rank builds the whole model first
        T.sharded.build_meta = lambda spec: T.build_model(spec)
        T.sharded.fill = lambda *a, **k: None
        T.sharded.real_tensors = lambda loss: {}
    t0 = time.perf_counter()
    run = T.build_run(cfg)
    build_s = time.perf_counter() - t0
    after_build = rss_gib()
    state = run.loss.state_dict()
    local = sum((v.to_local() if isinstance(v, DTensor) else v).numel() * v.element_size() for v in state.values())
    trainable = sum(p.numel() for p in run.loss.parameters() if p.requires_grad)  # global counts (DTensor numel)
    total = sum(p.numel() for p in run.loss.parameters())
    batches = iter(run.data)
    times, tokens, trace, first = [], [], [], []
    trace_units(run.model, parallel.shard_plan(run.model), trace)
    marks = {"after build": current_rss_gib()}
    for i in range(opts["steps"]):
        t = time.perf_counter()
        raw = T.train_step(run.wrapped, batches, run.optimizer, run.scheduler, run.step_cfg)
        times.append(time.perf_counter() - t)
        tokens.append(int(raw["tokens"]))
        marks[f"after step {i + 1}"] = current_rss_gib()
        if i == 0:  # the first step's trace: where the resident size climbs
            first = list(trace)
    top = max(first, key=lambda x: x[1]) if first else ("", 0.0)
    mine = {"rank": parallel.rank(), "build_s": round(build_s, 1), "rss_after_build_gib": round(after_build, 2),
            "rss_now_gib": {k: round(v, 2) for k, v in marks.items()},
            "step1_highest_mark": [top[0], round(top[1], 2)],
            "step1_trace": [[k, round(v, 2)] for k, v in first],
            "rss_after_steps_gib": round(rss_gib(), 2), "shards_gib": round(local / GIB, 3),
            "step_s": [round(x, 2) for x in times],
            # this rank's share of the global tokens per second, the first step (warm-up) left out
            "tok_per_s_rank": round(sum(tokens[1:]) / parallel.world() / max(1e-9, sum(times[1:])), 1)
            if len(times) > 1 else None}
    ranks = parallel.gather_objects(mine)
    if parallel.is_main():
        Path(opts["out"]).write_text(json.dumps({"ranks": ranks, "parameters": total, "trainable": trainable}))
    parallel.teardown()


def measure(source: Path, ranks: int, args, legacy: bool) -> dict[str, Any]:
    from januskit.train import parallel

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "figures.json"
        opts = {"source": str(source), "stage": args.stage, "steps": args.steps, "batch": args.batch,
                "seq_len": args.seq_len, "threads": max(1, args.threads // ranks), "run": str(Path(d) / "run"),
                "out": str(out), "legacy": legacy, "param_dtype": args.param_dtype}
        parallel.spawn(worker, ranks, opts)
        return json.loads(out.read_text())


def extrapolate(res: dict[str, Any]) -> dict[str, Any]:
    """Per-GPU memory of the real 7B (30 layers) in Stage III at 8 and 64 ranks, from the measured figures."""
    from januskit.config import preset
    from januskit.models import build_model
    import torch

    from januskit.train import parallel

    c = preset("janus-pro-7b")
    with torch.device("meta"):
        m = build_model(c)
    m.gen_vision_model.requires_grad_(False)  # the VQ never trains: replicated, outside FSDP (parallel.shard_plan)
    plan = parallel.shard_plan(m)
    total = sum(p.numel() for p in m.parameters())
    frozen = sum(p.numel() for p in plan.ignored)
    # the two largest units own (a unit's parameters less its child units'): one gathered, the next prefetched
    inner = {id(p) for u in plan.units for child in u.children() if child in plan.units for p in child.parameters()}
    owns = sorted((sum(p.numel() for p in u.parameters() if id(p) not in inner) for u in plan.units), reverse=True)
    layer = sum(p.numel() for p in m.llm.layers[0].parameters())
    # what does not shrink with ranks, from the largest measured rank count: RSS after the steps less the shards
    widest = max(res["runs"], key=lambda r: len(r["ranks"]))
    fixed = max(r["rss_after_steps_gib"] - r["shards_gib"] for r in widest["ranks"])
    out = {}
    for n in (8, 64):
        sharded = 16 * (total - frozen) / n / GIB  # weights, gradients, AdamW's two moments: float32
        gathered = sum(owns[:2]) * 2 / GIB  # the largest unit's bf16 weights gathered, and the next prefetched
        out[str(n)] = {"sharded_state_gib": round(sharded, 2), "replicated_vq_gib": round(4 * frozen / GIB, 2),
                       "gathered_units_gib": round(gathered, 2), "measured_fixed_gib_at_bench_size": round(fixed, 2)}
    return {"parameters": total, "frozen_replicated": frozen, "per_layer": layer, "largest_units": owns[:2],
            "per_gpu": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--stage", default="janus-pro/1", help="stage whose parts train (default: Stage I's)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="global rows per step (a multiple of every rank count)")
    ap.add_argument("--seq-len", type=int, default=768)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads shared by the ranks of a run")
    ap.add_argument("--legacy", action="store_true", help="build the whole model on every rank first")
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="[train] fsdp_param_dtype: the dtype units are gathered and computed in")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="janus-pro-7b", help="another width (a quick check of the script)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    source = model_folder(args.ckpt_dir, args.layers, args.seed, args.preset)
    runs, failed = [], []
    for n in [int(x) for x in args.ranks.split(",")]:
        try:
            r = measure(source, n, args, args.legacy)
        except RuntimeError as e:  # a rank killed (the OOM killer): recorded, and the larger counts are skipped
            failed.append({"ranks": n, "error": str(e)})
            print(f"{n} rank(s): failed: {e}", flush=True)
            break
        runs.append(r)
        worst = max(x["rss_after_steps_gib"] for x in r["ranks"])
        print(f"{n} rank(s){' (legacy)' if args.legacy else ''}, {args.param_dtype} units: peak RSS per rank after "
              f"build "
              f"{[x['rss_after_build_gib'] for x in r['ranks']]} GiB, after steps {worst} GiB (max), shards "
              f"{[x['shards_gib'] for x in r['ranks']]} GiB, tokens/s per rank "
              f"{[x['tok_per_s_rank'] for x in r['ranks']]}", flush=True)
    res = {"layers": args.layers, "stage": args.stage, "legacy": args.legacy, "param_dtype": args.param_dtype,
           "runs": runs, "failed": failed}
    res["extrapolation"] = extrapolate(res)
    print(json.dumps(res["extrapolation"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
