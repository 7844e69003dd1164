"""Training-step throughput of the default model's Stage II, configurations side by side in one run.

The step is the recipe's own (januskit.recipes.default_model: preset mini-janus-pro, Stage II row
janus-pro/2 = LLM + adaptors + heads, und:text:gen 2:3:5, 32 samples a step, bf16 autocast with
float32 master weights), built by `stage_config` and `januskit.train.trainer.build_run` exactly as
`januskit world build` builds it, on real world data: a `--scale` world (default 0.1 of the train
split) with VQ ids from the shipped model, which is also the starting point (weights do not change the
work). Each configuration changes recipe fields (threads, micro_batch_size, seq_len, attention,
compile) and/or runs as `ranks` DDP processes (gloo, one thread each unless told).

Every configuration is built once, in its own worker process (`ranks` of them for DDP) that waits for
orders, warmed up (`--warmup` steps: compilation happens there and is reported), and
then the configurations take turns: each round runs `--steps` steps of every configuration, one after
the other, so a slow phase of the machine hits them alike. Ratios are to the baseline's block of the
same round (median over rounds). All configurations see the same batches at the same step.

Per block the script also records how much CPU other processes took (/proc/stat busy time minus this
benchmark's own), as `others` in cores: 0 means the machine was ours.

    nice .venv/bin/python bench/bench_train_step.py                      # the default table
    nice .venv/bin/python bench/bench_train_step.py --configs baseline,threads2 --rounds 2
    nice .venv/bin/python bench/bench_train_step.py --add 'mine:threads=2,attention=segments,ranks=1'
    nice .venv/bin/python bench/bench_train_step.py --determinism segments+threads2 --det-steps 6
    nice .venv/bin/python bench/bench_train_step.py --profile baseline   # top ops by self CPU time
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "januskit" / "assets" / "default-model"

# name -> options. Recipe fields: threads, micro_batch_size, seq_len, attention, compile, keep_memory,
# fused_optimizer; plus ranks (DDP processes, gloo), parallel ("ddp" or "fsdp" with ranks), prefetch (the
# data builder's background steps) and omp ("passive": OMP_WAIT_POLICY for the worker process, which
# OpenMP reads when it loads). Unset = the recipe's default.
_SC = {"attention": "segments", "compile": "layers"}
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},  # the step the issue measured: 1 thread, micro-batch 8, seq 512, mask attention, eager, cached data
    "recipe": {"attention": "segments", "threads": 2, "data": "fresh", "autocast": "none"},  # today's recipe
    "float32": {"autocast": "none"},
    "float32+threads2": {"autocast": "none", "threads": 2},
    "threads2": {"threads": 2},
    "threads2-passive": {"threads": 2, "omp": "passive"},
    "ddp2": {"ranks": 2},
    "mb16": {"micro_batch_size": 16},
    "seq1024": {"seq_len": 1024, "micro_batch_size": 16},
    "segments": {"attention": "segments"},
    "compile": {"compile": "layers"},
    "keep_memory": {"keep_memory": True},
    "segments+compile": _SC,
    "segments+compile+keep_memory": {**_SC, "keep_memory": True},
    "segments+compile+fused": {**_SC, "fused_optimizer": True},
    "segments+compile+threads2": {**_SC, "threads": 2},
    "segments+compile+threads2-passive": {**_SC, "threads": 2, "omp": "passive"},
    "segments+compile+ddp2": {**_SC, "ranks": 2},
    "segments+compile+fused+threads2-passive": {**_SC, "fused_optimizer": True, "threads": 2, "omp": "passive"},
    "segments+compile+fused+ddp2": {**_SC, "fused_optimizer": True, "ranks": 2},
    "segments+threads2": {"attention": "segments", "threads": 2},
    "segments+ddp2": {"attention": "segments", "ranks": 2},
    "segments+compile+fsdp2": {**_SC, "ranks": 2, "parallel": "fsdp"},
}
DEFAULT = ["baseline", "recipe", "threads2", "threads2-passive", "ddp2", "mb16", "seq1024", "segments", "compile", "keep_memory",
           "segments+compile", "segments+compile+keep_memory", "segments+compile+fused", "segments+compile+threads2",
           "segments+compile+threads2-passive", "segments+compile+ddp2", "segments+compile+fused+threads2-passive",
           "segments+compile+fused+ddp2"]
RECIPE_KEYS = ("threads", "micro_batch_size", "seq_len", "attention", "compile", "keep_memory", "fused_optimizer",
               "data", "autocast", "answer_weighting")
# The baseline's recipe fields (the step the issue measured); a configuration overrides them.
BASELINE = {"threads": 1, "attention": "mask", "data": "files", "autocast": "bfloat16"}
INT_KEYS = ("threads", "micro_batch_size", "seq_len", "ranks", "prefetch")
BOOL_KEYS = ("keep_memory", "fused_optimizer")


def parse_add(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, body = spec.partition(":")
    opts: dict[str, Any] = {}
    for kv in filter(None, body.split(",")):
        k, _, v = kv.partition("=")
        opts[k] = int(v) if k in INT_KEYS else (v == "true") if k in BOOL_KEYS else v
    return name, opts


# ---------------------------------------------------------------------------------------------
# Data and configs

def prepare_world(work: Path, scale: float) -> Path:
    """A world of `scale` x the train split with generation-vq.jsonl (the shipped model's VQ), once."""
    from januskit.checkpoint.official import load_janus
    from januskit.train.data.vq_cache import cache_vq_ids
    from januskit.world.dataset import write_world

    world = work / f"world-{scale:g}"
    if not (world / "world.json").is_file():
        write_world(world, seed=0, scale=scale, overwrite=True)
    vq = world / "train" / "generation-vq.jsonl"
    if not vq.is_file():
        cache_vq_ids(world / "train", load_janus(SOURCE, torch.float32), vq,
                     manifests=[world / "train" / "generation.jsonl"], batch_size=64)
    return world


def run_config(opts: dict[str, Any], world: Path, out: Path, steps: int = 10**6):
    """The recipe's Stage II RunConfig with `opts` applied (steps: the stage length; the LR schedule
    only depends on it after warm-up, and the benchmark never reaches it)."""
    from januskit.recipes.default_model import Recipe, stage_config

    r = Recipe(**{**BASELINE, **{k: opts[k] for k in RECIPE_KEYS if k in opts}})
    plan = dataclasses.replace(next(p for p in r.stages if p.name == "stage2"), steps=steps)
    cfg = stage_config(plan, SOURCE, out, world, r)
    cfg.train.progress = False
    cfg.train.plot = False
    if "prefetch" in opts:
        cfg.data.options["prefetch"] = opts["prefetch"]
    if opts.get("ranks", 1) > 1:
        cfg.train.parallel = opts.get("parallel", "ddp")
    return cfg


def threads_of(opts: dict[str, Any]) -> int:
    return int(opts.get("threads", 1))


# ---------------------------------------------------------------------------------------------
# Runners: one configuration's built training state, stepped on request

class Stepper:
    """The state `train` builds (build_run), in the current process; `steps(n)` runs n optimiser steps."""

    def __init__(self, opts: dict[str, Any], world: Path, out: Path) -> None:
        from januskit.train.trainer import build_run

        self.opts, self.threads = opts, threads_of(opts)
        torch.set_num_threads(self.threads)
        t = time.perf_counter()
        self.run = build_run(run_config(opts, world, out))
        self.build_s = time.perf_counter() - t
        self.batches = iter(self.run.data)

    def steps(self, n: int) -> dict[str, Any]:
        from januskit.train.trainer import train_step

        torch.set_num_threads(self.threads)
        r = self.run
        times, tokens = [], []
        cpu0 = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            raw = train_step(r.wrapped, self.batches, r.optimizer, r.scheduler, r.step_cfg)
            times.append(time.perf_counter() - t)
            tokens.append(int(raw["tokens"]))
        return {"times": times, "tokens": tokens, "cpu": time.process_time() - cpu0,
                "samples": r.stage.batch_size}

    def quiesce(self) -> None:
        """Let the data prefetch thread finish what it has in flight (so it does not run in another's block)."""
        for f in list(getattr(self.run.data, "_pending", [])):
            f.exception()


def _worker(rank: int, world_size: int, port: int, opts: dict[str, Any], world: str, out: str, conn) -> None:
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from januskit.train import parallel

    parallel.init("cpu")
    try:
        s = Stepper(opts, Path(world), Path(out))
        conn.send({"build_s": s.build_s})
        while True:
            msg = conn.recv()
            if msg[0] == "steps":
                conn.send(s.steps(msg[1]))
            elif msg[0] == "quiesce":
                s.quiesce()
                conn.send(None)
            else:
                break
    finally:
        parallel.teardown()


class Worker:
    """A configuration in its own process(es): `ranks` of them for DDP (gloo, like torchrun's), else one.
    They wait for orders, so only one configuration computes at a time; rank 0's timings count."""

    def __init__(self, opts: dict[str, Any], world: Path, out: Path) -> None:
        ctx = mp.get_context("spawn")
        self.opts, self.n = opts, int(opts.get("ranks", 1))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.conns, self.procs = [], []
        env = dict(os.environ)
        if "omp" in opts:  # OpenMP's wait policy is read when the library loads: set it for the new process
            os.environ["OMP_WAIT_POLICY"] = opts["omp"].upper()
        try:
            for rank in range(self.n):
                a, b = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(rank, self.n, port, opts, str(world), str(out), b), daemon=True)
                p.start()
                self.conns.append(a), self.procs.append(p)
        finally:
            os.environ.clear()
            os.environ.update(env)
        self.build_s = max(c.recv()["build_s"] for c in self.conns)

    def steps(self, n: int) -> dict[str, Any]:
        for c in self.conns:
            c.send(("steps", n))
        res = [c.recv() for c in self.conns]
        out = dict(res[0])
        out["cpu"] = sum(r["cpu"] for r in res)
        return out

    def quiesce(self) -> None:
        for c in self.conns:
            c.send(("quiesce",))
        for c in self.conns:
            c.recv()

    def close(self) -> None:
        for c in self.conns:
            c.send(("quit",))
        for p in self.procs:
            p.join(timeout=60)


def cpu_busy() -> float:
    """Seconds of busy CPU time of the whole machine (all cores) so far, from /proc/stat."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------

def bench(names: list[str], configs: dict[str, dict[str, Any]], world: Path, work: Path, args) -> dict[str, Any]:
    runners: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            opts = configs[name]
            out = work / "out" / name
            t = time.perf_counter()
            runners[name] = Worker(opts, world, out)
            print(f"built {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        for name in names:  # warm-up: compilation happens here
            for r in runners.values():
                r.quiesce()
            w = runners[name].steps(args.warmup)
            info[name] = {"warmup_times": w["times"]}
            print(f"warm-up {name}: {[round(x, 2) for x in w['times']]}", file=sys.stderr, flush=True)
        blocks: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in names:
                for r in runners.values():
                    r.quiesce()
                load0, busy0, t0 = os.getloadavg()[0], cpu_busy(), time.perf_counter()
                b = runners[name].steps(args.steps)
                wall, busy = time.perf_counter() - t0, cpu_busy() - busy0
                b.update(round=rnd, wall=wall, others=max(0.0, (busy - b["cpu"]) / wall), load_before=load0,
                         load_after=os.getloadavg()[0])
                blocks[name].append(b)
                print(f"round {rnd} {name}: {args.steps * b['samples'] / sum(b['times']):.1f} samples/s, "
                      f"others {b['others']:.2f} cores", file=sys.stderr, flush=True)
    finally:
        for r in runners.values():
            r.close()
    base = names[0]
    rows = []
    for name in names:
        bl = blocks[name]
        sps = [len(b["times"]) * b["samples"] / sum(b["times"]) for b in bl]
        tps = [sum(b["tokens"]) / sum(b["times"]) for b in bl]
        ratios = [s / (len(bb["times"]) * bb["samples"] / sum(bb["times"])) for s, bb in zip(sps, blocks[base])]
        steps = sorted(t for b in bl for t in b["times"])
        med_step = steps[len(steps) // 2]
        warm = info[name]["warmup_times"]
        rows.append({
            "config": name, "options": configs[name], "samples_per_s": statistics.median(sps),
            "tokens_per_s": statistics.median(tps), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "median_step_s": med_step,
            "tokens_per_step": statistics.mean(t for b in bl for t in b["tokens"]),
            # compile (and other one-off) cost: the warm-up steps' time beyond steady steps
            "warmup_s": sum(warm), "warmup_extra_s": max(0.0, sum(warm) - len(warm) * med_step),
            "others_cores": statistics.mean(b["others"] for b in bl), "blocks": bl, "build_s": runners[name].build_s})
    return {"rows": rows, "baseline": base}


def table(res: dict[str, Any]) -> str:
    lines = ["| config | ranks x threads | micro | seq | attention | compile | other | samples/s | tokens/s "
             "| ratio (min-max) | step s | warm-up extra s | others (cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        o = r["options"]
        other = [k for k in ("keep_memory", "fused_optimizer") if o.get(k)]
        other += [f"omp {o['omp']}"] if "omp" in o else []
        other += [o["parallel"]] if "parallel" in o else []
        lines.append(
            f"| {r['config']} | {o.get('ranks', 1)} x {o.get('threads', 1)} | {o.get('micro_batch_size', 8)} "
            f"| {o.get('seq_len', 512)} | {o.get('attention', 'mask')} | {o.get('compile', 'none')} "
            f"| {', '.join(other) or '-'} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | **{r['ratio']:.2f}** "
            f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['median_step_s']:.3f} | {r['warmup_extra_s']:.1f} "
            f"| {r['others_cores']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Determinism: two real runs of `train` per configuration, model bytes compared

def train_once(opts: dict[str, Any], world: Path, out: Path, steps: int) -> tuple[str, float]:
    """One real run of `train` in fresh process(es) (parallel.spawn, as the recipe's `ranks` runs a stage)."""
    from januskit.train import parallel
    from januskit.train.trainer import train

    cfg = run_config(opts, world, out, steps=steps)
    cfg.train.save_every = steps
    env = dict(os.environ)
    if "omp" in opts:
        os.environ["OMP_WAIT_POLICY"] = opts["omp"].upper()
    t = time.perf_counter()
    try:
        parallel.spawn(train, int(opts.get("ranks", 1)), cfg)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(), time.perf_counter() - t


def determinism(names: list[str], configs: dict[str, dict[str, Any]], world: Path, work: Path,
                steps: int) -> list[dict[str, Any]]:
    res = []
    for name in names:
        digests, secs = [], []
        for i in range(2):
            out = work / "det" / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            d, s = train_once(configs[name], world, out, steps)
            digests.append(d), secs.append(round(s, 1))
        res.append({"config": name, "options": configs[name], "steps": steps, "sha256": digests,
                    "identical": digests[0] == digests[1], "seconds": secs})
        print(f"determinism {name}: {'identical' if digests[0] == digests[1] else 'DIFFERENT'} "
              f"({digests[0][:12]} / {digests[1][:12]})", file=sys.stderr, flush=True)
    return res


def profile(name: str, opts: dict[str, Any], world: Path, work: Path, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    s = Stepper(opts, world, work / "out" / f"profile-{name}")
    s.steps(3)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        s.steps(steps)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(DEFAULT), help=f"comma-separated, the first is the baseline; "
                    f"known: {', '.join(CONFIGS)}")
    ap.add_argument("--add", action="append", default=[], help="NAME:key=value,... an extra configuration "
                    f"(keys: {', '.join(RECIPE_KEYS)}, ranks, prefetch); append NAME to --configs to run it")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation happens here)")
    ap.add_argument("--scale", type=float, default=0.1, help="world train split size (1 = the recipe's)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "januskit-bench-train"))
    ap.add_argument("--json", default=None, help="write results here (default: WORK/results.json)")
    ap.add_argument("--fresh-compile-cache", action="store_true", default=True,
                    help="a new TORCHINDUCTOR_CACHE_DIR (cold compile, as in a fresh build; default)")
    ap.add_argument("--warm-compile-cache", dest="fresh_compile_cache", action="store_false")
    ap.add_argument("--determinism", default=None, help="comma-separated configs: two real train() runs each, "
                    "model bytes compared (instead of the throughput table)")
    ap.add_argument("--det-steps", type=int, default=6)
    ap.add_argument("--profile", default=None, help="a config: print its top ops by self CPU time (3 steps)")
    args = ap.parse_args()

    configs = dict(CONFIGS)
    for spec in args.add:
        n, o = parse_add(spec)
        configs[n] = o
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh_compile_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=work)
    torch.set_num_threads(1)
    from januskit.train import parallel

    parallel.init("cpu")
    world = prepare_world(work, args.scale)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
            "cores": os.cpu_count(), "scale": args.scale, "argv": sys.argv[1:], "load_start": os.getloadavg()}
    if args.profile:
        print(profile(args.profile, configs[args.profile], world, work, 3, 30))
        return
    if args.determinism:
        names = args.determinism.split(",")
        res = {"meta": meta, "determinism": determinism(names, configs, world, work, args.det_steps)}
    else:
        names = args.configs.split(",")
        res = {"meta": meta, **bench(names, configs, world, work, args)}
        print(table(res))
    res["meta"]["load_end"] = os.getloadavg()
    path = Path(args.json) if args.json else work / "results.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
