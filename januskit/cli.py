"""`januskit` command line: argument parsing only; the work is done by library functions."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"


def _log_to_stderr(level: int = logging.INFO) -> None:
    """The long-running commands' log: timestamped records on stderr."""
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint folder (official or HF layout) or preset name; default: the bundled model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (bfloat16 halves memory; float32 is the most exact on CPU)")
    p.add_argument("--fast", action="store_true",
                   help="prepack weights for oneDNN (CPU): about 2x faster decoding, last-bit differences in float32")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile; the first image or answer waits for it, tens of "
                        "seconds on CPU): same tokens in float32")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads; default: torch's, or 1 for tiny models (narrow matrices gain nothing from "
                        "threads, and on a busy machine idle-spinning workers slow them down many times)")
    p.add_argument("--vae", default=None, help="JanusFlow only: VAE folder (diffusers AutoencoderKL, e.g. "
                   "stabilityai/sdxl-vae); default: the checkpoint's vae/ subfolder if it has one")
    _quantize_args(p, "--quantize", "quantise the LLM and its heads while loading (weight-only; "
                   "docs/quantization.md); a folder written by `januskit quantize` is quantised already")


def _quantize_args(p: argparse.ArgumentParser, flag: str, help_: str, required: bool = False) -> None:
    p.add_argument(flag, default=None, required=required, choices=["int8", "int4"], help=help_)
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                   help="int4: input columns sharing one scale and minimum (smaller: more exact, larger files)")


def _load(args: argparse.Namespace):
    import torch

    import januskit

    if args.fast and getattr(args, "compile", False):
        raise SystemExit("januskit: --fast and --compile are alternatives (the compiled step prepacks the "
                         "weights itself); pass one of them")
    model = args.model
    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise SystemExit(f"januskit: the bundled default model is missing ({DEFAULT_MODEL}); pass --model DIR, "
                             f"or rebuild it with `januskit world build --out {DEFAULT_MODEL}`")
        model = DEFAULT_MODEL
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        pipe = januskit.load(model, dtype=args.dtype, vae=getattr(args, "vae", None), quantize=args.quantize,
                             group_size=args.group_size)
    if args.fast:
        pipe.pack_for_cpu()
    pipe.compile_decode = bool(getattr(args, "compile", False))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif pipe.config.llm.dim < 1024:
        torch.set_num_threads(1)
    return pipe


def cmd_chat(args: argparse.Namespace) -> int:
    pipe = _load(args)
    t0 = time.perf_counter()
    kw = dict(images=args.image, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    if args.json:
        ids = pipe.chat_ids(args.prompt, **kw)
        text, n = pipe.processor.tokenizer.decode(ids).lstrip(), len(ids)  # as pipe.chat: no space from "Assistant:"
        print(json.dumps(dict(model=pipe.source, prompt=args.prompt, images=args.image, answer=text,
                              new_tokens=n, seconds=round(time.perf_counter() - t0, 3), seed=args.seed)))
    else:
        for piece in pipe.chat_stream(args.prompt, **kw):
            print(piece, end="", flush=True)
        print()
    return 0


def _sjd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sjd", action="store_true", help="Janus: speculative Jacobi decoding, several image tokens per "
                   "LLM forward, the same distribution (docs/speculative-decoding.md)")
    p.add_argument("--sjd-window", type=int, default=None, help="SJD: tokens verified per LLM forward (default 16)")
    p.add_argument("--sjd-coupling", action="store_true", help="SJD: MC-SJD's draft refresh (maximal coupling with "
                   "the old draft: more drafts survive, fewer forwards)")


def _speculative(args: argparse.Namespace) -> dict:
    """The --sjd flags as generate_batch options; not filtered by own_options, so JanusFlow refuses them."""
    if not args.sjd:
        if args.sjd_window is not None or args.sjd_coupling:
            raise SystemExit(f"januskit {args.command}: --sjd-window and --sjd-coupling need --sjd")
        return {}
    return {"speculative": "mc-sjd" if args.sjd_coupling else "sjd", "window": args.sjd_window}


def cmd_generate(args: argparse.Namespace) -> int:
    sjd = _speculative(args)
    pipe = _load(args)
    return _write_images(args, pipe, lambda **kw: pipe.generate_images(args.prompt, n=args.n, seed=args.seed,
                                                                      cfg_weight=args.cfg_weight, **kw), sjd)


def cmd_edit(args: argparse.Namespace) -> int:
    """Image-conditioned generation: a trained edit (two-condition guidance), or with --strength the
    training-free img2img (JanusFlow) / variations (Janus) of any checkpoint."""
    pipe = _load(args)
    if args.strength is None:
        def run(**kw):
            return pipe.edit_image(args.prompt, args.image, n=args.n, seed=args.seed, cfg_text=args.cfg_weight,
                                   cfg_image=args.cfg_image, **kw)
    else:
        if len(args.image) != 1 or args.cfg_image is not None:
            raise ValueError("--strength (img2img / variations) takes one --image and no --cfg-image")

        def run(**kw):
            return pipe.image_to_image(args.prompt, args.image[0], strength=args.strength, n=args.n, seed=args.seed,
                                       cfg_weight=args.cfg_weight, **kw)
    return _write_images(args, pipe, run, {})


def _write_images(args: argparse.Namespace, pipe, run, extra: dict) -> int:
    """Run an image command with a progress bar and write its PNGs (and, with --json, a summary)."""
    from tqdm import tqdm

    # The flags of the other architecture (--steps for Janus, --temperature... for JanusFlow) do not apply.
    options = pipe.own_options(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, steps=args.steps)
    options |= extra
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    unit, desc = pipe.progress_unit
    with tqdm(unit=unit, desc=desc, disable=args.json, file=sys.stderr) as bar:
        def progress(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(done - bar.n)

        res = run(memory_budget_gb=args.memory_budget_gb, progress=progress, **options)
    seconds = time.perf_counter() - t0
    files = []
    for i, img in enumerate(res.images):
        f = out / f"{args.prefix}{args.seed}_{i:03d}.png"
        img.save(f)
        files.append(str(f))
    if args.json:
        info = dict(model=pipe.source, arch=pipe.arch, prompt=args.prompt, n=args.n, seed=args.seed,
                    cfg=res.info["cfg_weight"], files=files, seconds=round(seconds, 3))
        info.update({k: res.info[k] for k in ("temperature", "tokens_per_image", "steps", "latent_shape",
                                              "speculative", "window", "llm_forwards", "cfg_image", "strength",
                                              "kept_tokens", "start_step") if k in res.info})
        if res.tokens is not None:
            info.update(image_tokens_per_second=round(res.tokens.numel() / seconds, 2))
        print(json.dumps(info))
    else:
        print("\n".join(files))
        if "speculative" in res.info:
            f = res.info["llm_forwards"]
            print(f"{res.info['speculative']} (window {res.info['window']}): {res.tokens.shape[1]} tokens per image in "
                  f"{sum(f) / len(f):.1f} LLM forwards on average", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint.convert import convert

    dst = convert(args.src, args.dst, args.to, overwrite=args.overwrite)
    print(f"wrote {args.to} layout to {dst}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantization import quantize_folder

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the layers kept in float are reported
        spec = quantize_folder(args.src, args.dst, args.to, args.group_size, strict=args.strict,
                               overwrite=args.overwrite)
    kept = f", {len(spec.kept)} kept in float" if spec.kept else ""
    print(f"wrote {spec.describe()} checkpoint ({len(spec.modules)} layers quantised{kept}) to {args.dst}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import januskit
    from .checkpoint.init import init_checkpoint

    dst = init_checkpoint(args.dir, arch=args.arch, preset_name=args.preset, seed=args.seed,
                          dtype=januskit.resolve_dtype(args.dtype), overwrite=args.overwrite, vae=not args.no_vae)
    c = json.loads((dst / "config.json").read_text())
    print(f"wrote random-weight {args.arch} checkpoint ({args.preset or 'default preset'}, seed {args.seed}, "
          f"{c['model_type']}) to {dst}")
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    import januskit
    from .checkpoint.assemble import assemble

    dst = assemble(args.llm, args.siglip, args.vq, args.dir, preset_name=args.preset, seed=args.seed,
                   dtype=januskit.resolve_dtype(args.dtype), overwrite=args.overwrite)
    print(f"wrote Stage-I starting checkpoint ({args.preset}, fresh adaptors/heads seed {args.seed}) to {dst}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint.info import describe

    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .train.config import load_run_config
    from .train.trainer import train

    _log_to_stderr(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)  # one log under torchrun
    out = train(load_run_config(args.config, args.set), resume=args.resume)
    print(f"trained model written to {out}")
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    import torch

    from .train.image_tokenizer import RetrainSettings, retrain_image_tokenizer

    _log_to_stderr()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rec = retrain_image_tokenizer(args.images, args.model or DEFAULT_MODEL, args.out, RetrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, held_out=args.held_out, seed=args.seed,
        force=args.force, overwrite=args.overwrite), progress=not args.json)
    if args.json:
        print(json.dumps(rec))
        return 0
    b, a = rec["before"]["held_out"], rec["after"]["held_out"]
    n = len(rec["trained_on"]["held_out"])
    print(f"{rec['kind'].upper()} retrained on {rec['trained_on']['train']} images in {rec['seconds']:.0f} s; "
          f"{n} held-out images: PSNR {b['psnr']:.2f} -> {a['psnr']:.2f} dB, mean abs error {b['mae_255']:.2f} -> "
          f"{a['mae_255']:.2f} (0-255)" + (f", codebook use {b['usage']:.0%} -> {a['usage']:.0%}" if "usage" in a else ""))
    print(f"model written to {args.out} (record: provenance.json, \"image_tokenizer\")")
    print(f"next: {rec['next']}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .train.finetune import FinetuneOptions, finetune

    _log_to_stderr()
    sources = {k: getattr(args, k) for k in ("understanding", "text", "generation", "edit") if getattr(args, k)}
    opts = FinetuneOptions(out=args.out, model=args.model, data=args.data, sources=sources, steps=args.steps,
                           epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                           lora=args.lora, holdout=args.holdout, seed=args.seed, threads=args.threads,
                           time_steps=args.time_steps, eval_max=args.eval_max, evaluate=not args.no_eval,
                           resume=args.resume, keep_checkpoints=args.keep_checkpoints, save_every=args.save_every,
                           tokenizer_images=args.train_tokenizer, tokenizer_steps=args.tokenizer_steps,
                           tensorboard=args.tensorboard)
    finetune(opts)
    return 0


def cmd_world_write(args: argparse.Namespace) -> int:
    from .world.dataset import write_world

    root = write_world(args.dir, seed=args.seed, scale=args.scale, overwrite=args.overwrite, captions=args.captions)
    print(json.dumps(json.loads((root / "world.json").read_text())["counts"], indent=1))
    print(f"wrote the miniature world (seed {args.seed}) to {root}")
    return 0


def cmd_world_build(args: argparse.Namespace) -> int:
    from .recipes.default_model import Recipe, build, with_overrides

    _log_to_stderr()
    recipe = Recipe(seed=args.seed, **({} if args.threads is None else {"threads": args.threads}),
                    **({"rl": None} if args.no_rl else {}))
    recipe = with_overrides(recipe, args.set)
    if args.smoke:
        recipe = recipe.smoke()
    out = build(args.out, args.work, recipe, evaluate_model=not args.no_eval)
    print(f"miniature Janus-Pro written to {out}")
    return 0


def cmd_world_flow(args: argparse.Namespace) -> int:
    from .recipes.janusflow import FlowRecipe, build_flow
    from .recipes.default_model import Recipe

    _log_to_stderr()
    recipe = FlowRecipe(seed=args.seed, base=Recipe(seed=args.seed, threads=args.threads))
    if args.smoke:
        recipe = recipe.smoke()
    out = build_flow(args.out, args.work, recipe, repa=not args.no_repa, evaluate_model=not args.no_eval)
    print(f"miniature JanusFlow written to {out}")
    return 0


def cmd_world_edit_model(args: argparse.Namespace) -> int:
    import dataclasses

    from .recipes.default_model import Recipe
    from .recipes.edit_model import EditRecipe, build_edit

    _log_to_stderr()
    recipe = EditRecipe(base=Recipe(seed=args.seed, **({} if args.threads is None else {"threads": args.threads})))
    if args.no_rl:
        recipe = dataclasses.replace(recipe, rl=None)
    if args.smoke:
        recipe = recipe.smoke()
    out = build_edit(args.out, args.work, args.model or DEFAULT_MODEL, recipe, evaluate_model=not args.no_eval)
    print(f"miniature edit model written to {out}")
    return 0


def cmd_world_ablation(args: argparse.Namespace) -> int:
    from .recipes.ablation import run_ablation

    _log_to_stderr()
    table = run_ablation(args.work, only=args.only, smoke=args.smoke, threads=args.threads, base=args.base,
                         steps=args.steps)
    print(table)
    return 0


def cmd_world_overfit(args: argparse.Namespace) -> int:
    from .recipes.overfit import OverfitPlan, overfit

    _log_to_stderr()
    plan = OverfitPlan(scenes=args.scenes, steps=args.steps, lr=args.lr, seed=args.seed, threads=args.threads)
    rep = overfit(args.model or DEFAULT_MODEL, args.work, plan)
    print(json.dumps({k: rep[k] for k in ("generation", "understanding", "final_losses", "seconds")}, indent=1))
    return 0


def _weighted(items: list[str] | None, flag: str) -> tuple[tuple[str, float], ...]:
    """NAME=WEIGHT (or NAME, weight 1) options as (name, weight) pairs."""
    out = []
    for item in items or []:
        name, _, w = item.partition("=")
        try:
            out.append((name.strip(), float(w) if w else 1.0))
        except ValueError:
            raise SystemExit(f"januskit: {flag} {item!r}: the weight after '=' is not a number") from None
    return tuple(out)


def cmd_world_rl(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .recipes.rl_world import RLPlan, run

    _log_to_stderr()
    plan = RLPlan(steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size, lr=args.lr,
                  kl_weight=args.kl_weight, logprob=args.logprob, eval_every=args.eval_every, seed=args.seed,
                  threads=args.threads, rewards=_weighted(args.reward, "--reward") or (("world", 1.0),),
                  categories=tuple(args.categories.split(",")) if args.categories else None,
                  prompts="world_edit" if args.edits else "world", cfg_image=args.cfg_image)
    if args.edits and not args.reward:
        plan = replace(plan, rewards=(("world_edit", 1.0),))
    rep = run(args.model or DEFAULT_MODEL, args.work, plan, evaluate_model=not args.no_eval)
    keys = ("geneval", "qa", "readme", "diversity", "edits")
    print(json.dumps({k: {x: v[x] for x in keys if x in v} for k, v in rep.items()}, indent=1))
    return 0


def cmd_world_scaling(args: argparse.Namespace) -> int:
    from .recipes.scaling import Study, run_study

    _log_to_stderr()
    study = Study(sizes=tuple(args.sizes.split(",")), budgets=tuple(int(b) for b in args.budgets.split(",")),
                  threads=args.threads, seed=args.seed, lr=args.lr)
    for row in run_study(args.work, args.components or DEFAULT_MODEL, study):
        print(json.dumps({k: row[k] for k in ("size", "step", "samples", "geneval", "qa")}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serving.engine import Limits
        from .serving.server import serve
    except ImportError as e:
        raise SystemExit(f"januskit {args.command}: the server needs the `serve` extra "
                         f"(pip install 'januskit[serve]'; add `ui` for the web UI): {e}") from None
    ui = args.command == "ui" or not args.no_ui
    if ui:
        import importlib.util

        if importlib.util.find_spec("gradio") is None:
            if args.command == "ui":
                raise SystemExit("januskit ui: the web UI needs the `ui` extra (pip install 'januskit[ui]')") from None
            ui = False
            print("januskit serve: gradio is not installed, serving the API without the web UI "
                  "(pip install 'januskit[ui]' for it)", file=sys.stderr)
    _log_to_stderr()
    pipe = _load(args)
    name = args.name or ("januskit-default" if args.model is None else Path(str(args.model)).name)
    limits = Limits(max_queue=args.max_queue, max_batch_images=args.max_batch, max_batch_chats=args.max_batch,
                    max_n=args.max_n, max_tokens=args.max_tokens, timeout_s=args.timeout,
                    max_body_bytes=int(args.max_body_mb * 2**20), max_prompt_chars=args.max_prompt_chars,
                    max_image_pixels=args.max_image_pixels, read_timeout_s=args.read_timeout)
    serve(pipe, model_id=name, host=args.host, port=args.port, limits=limits, ui=ui)
    return 0


def _count_or_all(v: str) -> int | None:
    """A count >= 0, or "all" (None)."""
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {n}")
    return n


def cmd_eval_world(args: argparse.Namespace) -> int:
    from .eval.world import EvalSettings, evaluate, format_report, test_split, write_eval_split

    if args.export_benchmarks:
        from .eval.geneval import write_world_benchmarks

        # the printed commands read the split's images: the default world's go into the export folder
        split = test_split(args.world) if args.world else write_eval_split(Path(args.export_benchmarks) / "world")
        files = write_world_benchmarks(split, Path(args.export_benchmarks))
        print(f"januskit eval geneval --data {files['geneval']} --detector world\n"
              f"januskit eval pope --data {files['pope']} --images {split}")
        return 0

    sjd = _speculative(args)
    pipe = _load(args)
    s = EvalSettings(images_per_prompt=args.images_per_prompt, cfg_weight=args.cfg_weight, temperature=args.temperature,
                     steps=args.steps, seed=args.seed, prompts_per_category=args.prompts_per_category,
                     questions_per_type=args.questions_per_type, edits_per_task=args.edits_per_task,
                     cfg_image=args.cfg_image, **sjd)
    save_dir = args.out
    if args.grid and save_dir is None:
        save_dir = tempfile.mkdtemp(prefix="januskit-grid-")
    rep = evaluate(pipe, args.world, s, save_dir=save_dir, progress=not args.json)
    if args.grid and rep.generation:
        from .eval.grid import verdict_grid

        verdict_grid(rep.generation["records"], save_dir, s.images_per_prompt, args.grid)
    if args.grid and rep.edits:
        from .eval.grid import edit_grid

        grid = Path(args.grid)
        edit_grid(rep.edits["records"], Path(save_dir) / "edits", test_split(args.world), s.images_per_prompt,
                  grid.with_name(grid.stem + "-edits" + grid.suffix))
    if args.grid and args.out is None:
        shutil.rmtree(save_dir, ignore_errors=True)
    if not (rep.generation or rep.understanding or rep.edits):  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(rep.to_json() | {"model": str(pipe.source)}))
    else:
        print(format_report(rep))
    return 0


def cmd_eval_bench(args: argparse.Namespace) -> int:
    """POPE, MME, GQA from their release files (januskit.eval.<bench>), through the shared harness."""
    from .eval import gqa, mmbench, mme, pope
    from .eval.harness import SHORT_ANSWER, RunOptions, answer_items, chat_answerer, known_release, write_summary

    bench, data = args.command_bench, Path(args.data)
    instruction = {"default": SHORT_ANSWER if bench in ("pope", "gqa") else None, "none": None,
                   "short": SHORT_ANSWER}[args.instruction]
    if bench in ("pope", "gqa") and not args.images:
        raise SystemExit(f"januskit eval {bench}: --images is required (the folder of the benchmark's images)")
    if bench == "pope":
        items = pope.load_items(data, Path(args.images), instruction)
    elif bench == "gqa":
        items = gqa.load_items(data, Path(args.images), instruction)
    elif bench == "mmbench":  # its own option-letter instruction is part of the prompt
        items = mmbench.load_items(data, circular=not args.no_circular)
    else:
        items = mme.load_items(data, instruction)
    out = Path(args.out or f"runs/eval-{bench}")
    opts = RunOptions(out=out, batch=args.batch, limit=args.limit, max_new_tokens=args.max_new_tokens,
                      system_prompt=None if args.system_prompt == "default" else "", progress=not args.json)
    pipe = _load(args)
    answers = answer_items(chat_answerer(pipe, opts), items, opts, bench)
    if answers is None:  # not rank 0: rank 0 scores
        return 0
    items = items[: args.limit] if args.limit else items
    if bench == "pope":
        rep = pope.score(items, answers)
        rows = [(f"{s} acc / F1 / yes-ratio", f"{m['accuracy']:.4f} / {m['f1']:.4f} / {m['yes_ratio']:.3f}")
                for s, m in rep["splits"].items()]
    elif bench == "gqa":
        rep = gqa.score(items, answers, out)
        rows = [("accuracy", rep["accuracy"])]
    elif bench == "mmbench":
        rep = mmbench.score(items, answers)
        rows = [("single pass", rep["single_pass"])] + [(f"category: {k}", v) for k, v in rep["categories"].items()]
    else:
        rep = mme.score(items, answers)
        rows = [(k, f"{v['score']:.2f} (acc {v['acc']:.2f}, acc+ {v['acc_plus']:.2f})") for k, v in rep["subtasks"].items()]
        rows += [("perception", rep["perception"]), ("cognition", rep["cognition"])]
    settings = {"instruction": instruction, "system_prompt": args.system_prompt, "limit": args.limit,
                "max_new_tokens": args.max_new_tokens, "model": str(pipe.source)}
    md = write_summary(out, bench, rep | {"settings": settings}, rep["headline"], rows,
                       args.release or known_release(args.model))
    print(json.dumps(json.loads((out / "summary.json").read_text())) if args.json else md)
    return 0


def _plugin(spec: str | None, what: str):
    """`world` (the miniature world's judge) or `package.module:factory`, called with no arguments."""
    if spec is None:
        return None
    if spec == "world":
        from .eval.geneval import WorldDetector

        return WorldDetector() if what == "detector" else None
    import importlib

    mod, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"januskit eval: --{what} {spec!r}: give 'package.module:factory'"
                         + (" or 'world'" if what == "detector" else ""))
    try:
        return getattr(importlib.import_module(mod), name)()
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"januskit eval: --{what} {spec!r}: {e}") from None


def _generation_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("cfg_weight", args.cfg_weight), ("temperature", args.temperature),
                              ("steps", args.steps)) if v is not None}


def _image_batch(args: argparse.Namespace, pipe, per_prompt: int) -> int:
    return args.batch or (64 if pipe.arch == "janus" else per_prompt)


def _all_ranks_done() -> bool:
    """After each rank generated its share: wait for the others (torchrun); True on the rank that scores."""
    from .eval.harness import barrier, rank_world

    rank, world = rank_world()
    barrier(world)
    return rank == 0


def cmd_eval_geneval(args: argparse.Namespace) -> int:
    """Generate in GenEval's layout, then (with a detector) score with its rules."""
    from .eval.geneval import generate, read_metadata, score_folder
    from .eval.harness import known_release, write_summary

    metas = read_metadata(Path(args.data))
    out = Path(args.out or "runs/eval-geneval")
    detector, colour = _plugin(args.detector, "detector"), _plugin(args.colour_classifier, "colour-classifier")
    if not args.score_only:
        pipe = _load(args)
        generate(pipe, metas, out, n=args.images_per_prompt, seed=args.seed, limit=args.limit,
                 batch=_image_batch(args, pipe, args.images_per_prompt), progress=not args.json,
                 **_generation_options(args))
        if not _all_ranks_done():
            return 0
    if detector is None:
        print(f"images in {out} (GenEval's layout); score them with GenEval's evaluate_images.py, or pass --detector")
        return 0
    rep = score_folder(out, detector, colour)
    md = write_summary(out, "geneval", rep, rep["overall"], [(t, v) for t, v in rep["tags"].items()],
                       args.release or known_release(args.model))
    print(json.dumps(json.loads((out / "summary.json").read_text())) if args.json else md)
    return 0


def cmd_eval_dpg(args: argparse.Namespace) -> int:
    """DPG-Bench: 2x2 grids per prompt, then (with a judge) the dependency-aware VQA score."""
    from .eval import dpg
    from .eval.harness import known_release, write_summary

    prompts = dpg.read_dpg(Path(args.data))
    prompts = prompts[: args.limit] if args.limit else prompts
    out = Path(args.out or "runs/eval-dpg")
    pipe = None
    if not args.score_only:
        pipe = _load(args)
        dpg.generate(pipe, prompts, out, seed=args.seed, batch=_image_batch(args, pipe, 4), progress=not args.json,
                     **_generation_options(args))
        if not _all_ranks_done():
            return 0
    if args.judge is None:
        print(f"grids in {out} (the official layout); score them with compute_dpg_bench.py, or pass --judge")
        return 0
    if args.judge == "chat":
        judge = dpg.ChatJudge(pipe or _load(args))
    else:
        judge = _plugin(args.judge, "judge")
    rep = dpg.score(prompts, out, judge)
    md = write_summary(out, "dpg", rep, rep["overall"], list(rep["categories"].items()),
                       args.release or known_release(args.model))
    print(json.dumps(json.loads((out / "summary.json").read_text())) if args.json else md)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import januskit

    ap = argparse.ArgumentParser(prog="januskit", description="Janus / Janus-Pro / JanusFlow in plain PyTorch")
    ap.add_argument("--version", action="version", version=f"januskit {januskit.__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="answer a prompt, optionally about images")
    _model_arg(p)
    p.add_argument("prompt")
    p.add_argument("--image", "-i", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the reference's default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of streaming text")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="text-to-image with classifier-free guidance")
    _image_args(p, "prompt")
    _sjd_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="image-to-image: an edit by instruction (models trained on edit samples), or "
                       "with --strength img2img (JanusFlow) / variations (Janus) of any model; docs/editing.md")
    _image_args(p, "instruction (or, with --strength, the prompt)", cfg="text guidance weight s_txt (default: the "
                "model's CFG weight, 5 for Janus, 2 for JanusFlow)")
    p.add_argument("--image", "-i", action="append", required=True, help="a source image (repeat for several)")
    p.add_argument("--cfg-image", type=float, default=None, help="image guidance weight s_img (default 1.5)")
    p.add_argument("--strength", type=float, default=None, help="training-free instead: how much of the image to "
                   "replace, in (0, 1] (JanusFlow: the ODE starts at t = 1 - strength; Janus: the source's top "
                   "(1 - strength) of rows are kept)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("convert", help="convert a checkpoint folder between layouts")
    p.add_argument("--to", required=True, choices=["hf", "official"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write an int8 / int4 copy of a float checkpoint folder (official layout)")
    p.add_argument("src")
    p.add_argument("dst")
    _quantize_args(p, "--to", "weight-only quantisation of the LLM and its heads (docs/quantization.md)", required=True)
    p.add_argument("--strict", action="store_true", help="refuse a layer the kernels cannot run, instead of "
                   "keeping it in float with a warning")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("init", help="write a random-weight checkpoint folder in the official layout")
    p.add_argument("dir")
    p.add_argument("--arch", default="janus", choices=["janus", "janusflow"])
    p.add_argument("--preset", default=None, choices=list(januskit.PRESET_NAMES),
                   help="default: tiny-janus-pro for janus, tiny-janusflow for janusflow")
    p.add_argument("--no-vae", action="store_true", help="janusflow: do not add a random VAE in vae/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("assemble", help="build a Stage-I starting checkpoint from a pretrained LLM, SigLIP and VQ")
    p.add_argument("dir", help="destination folder (official layout)")
    p.add_argument("--llm", required=True, help="HF LlamaForCausalLM folder (DeepSeek-LLM base, with tokenizer.json)")
    p.add_argument("--siglip", required=True, help="timm-layout SigLIP weights (.safetensors, .bin or .pt)")
    p.add_argument("--vq", required=True, help="LlamaGen VQ-16 weights (.pt/.bin, may be wrapped in {'model': ...})")
    p.add_argument("--preset", required=True, choices=list(januskit.PRESET_NAMES))
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh adaptors and image head")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("info", help="describe a checkpoint folder or preset")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="run one training stage from a TOML config (see configs/)")
    p.add_argument("config", help="run config, e.g. configs/tiny-smoke.toml")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a config value, e.g. --set train.out=runs/x (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-tokenizer", help="retrain a miniature model's VQ tokenizer (Janus) or VAE (JanusFlow) on "
                       "a folder of images; a fine-tune must follow (januskit finetune)")
    p.add_argument("images", help="folder of .png / .jpg images (any size: resized and centre-cropped; searched "
                   "recursively)")
    p.add_argument("--model", "-m", default=None, help="model folder (official layout); default: the bundled model")
    p.add_argument("--out", required=True, help="output folder: the model with the new tokenizer; its "
                   "provenance.json says what it was trained on and the reconstruction before / after")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: VQ 500, VAE 600)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: VQ 16, VAE 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: VQ 1e-3, VAE 2e-3)")
    p.add_argument("--held-out", type=int, default=None, help="images kept out of training to measure on "
                   "(default: a tenth of them, 1 to 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="retrain a full-size checkpoint's tokenizer too (refused by "
                   "default: theirs are general and need no retraining)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on your JSONL data in one command: plan, train, and "
                       "held-out figures before -> after (docs/data-format.md)")
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder (official layout); default: the bundled "
                   "model")
    p.add_argument("--data", default=None, help="folder holding understanding.jsonl, text.jsonl, generation.jsonl "
                   "and/or edit.jsonl")
    for kind in ("understanding", "text", "generation", "edit"):
        p.add_argument(f"--{kind}", action="append", default=None, metavar="JSONL", help=f"{kind} records "
                       "(repeatable)")
    p.add_argument("--out", required=True, help="output folder: the model, run_config.json, metrics.jsonl, "
                   "finetune.json")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training records (default 3)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by model size)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: by model size)")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default: the longest sample, "
                   "rounded up to 64)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the output) instead of "
                   "all weights")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of each kind kept out of training for the "
                   "before/after evaluation (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="training and holdout seed")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: by model size)")
    p.add_argument("--time-steps", type=int, default=4, help="steps timed for the estimate, the first not counted "
                   "(0: no estimate)")
    p.add_argument("--eval-max", type=int, default=200, help="held-out records evaluated per kind")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: steps / 10)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoints/ after a finished run")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out (its plan is reused)")
    p.add_argument("--train-tokenizer", default=None, metavar="IMAGES_DIR", help="first retrain the miniature "
                   "model's VQ (or VAE) on these images (januskit train-tokenizer), into OUT-tokenizer/, and fine-tune "
                   "that folder")
    p.add_argument("--tokenizer-steps", type=int, default=None, help="steps of that first step (default: the "
                   "pretrainer's)")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard/: losses per kind, LR, "
                   "throughput, and the held-out figures before (step 0) and after (needs januskit[tensorboard])")
    p.set_defaults(func=cmd_finetune)

    world = sub.add_parser("world", help="the miniature world: dataset, default-model recipe, ablation")
    wsub = world.add_subparsers(dest="world_command", required=True)
    p = wsub.add_parser("write", help="write the world's train/val/test splits (training data format)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="size of the train split relative to the default")
    p.add_argument("--captions", default="v1", help="the train split's captions: v1 (GenEval's templates and scene "
                   "descriptions, the default model's recipe) or v2 (also colour with position, counts with colours, "
                   "partial descriptions, in varied wording: januskit/world/captions.py)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_world_write)
    p = wsub.add_parser("build", help="train the default model from scratch: world, SigLIP, VQ, LLM, 3 stages, GRPO")
    p.add_argument("--out", default="runs/world/default-model", help="final model folder")
    p.add_argument("--work", default="runs/world", help="intermediate folders (a rerun continues from them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's, 2; another count "
                   "gives a different model, as floating-point sums are split differently)")
    p.add_argument("--smoke", action="store_true", help="the whole chain with tiny budgets (a minute)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--no-rl", action="store_true", help="stop after supervised training (no GRPO step)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a recipe field (januskit.recipes.default_model.Recipe; dotted for nested settings, "
                   "the value as JSON), e.g. --set vq_norm=branch --set vq.attention=false --set siglip.steps=800; "
                   "a stage by its folder: --set stages.stage2.steps=3000, --set stages.stage1=null drops it; repeatable")
    p.set_defaults(func=cmd_world_build)
    p = wsub.add_parser("flow", help="train the miniature JanusFlow (VAE, 3 stages, REPA) on a build's shared steps")
    p.add_argument("--out", default="runs/world/janusflow-model", help="final model folder (with its vae/)")
    p.add_argument("--work", default="runs/world", help="a `world build` work folder (world, components, text "
                   "stage are reused or built); the flow steps go there too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-repa", action="store_true", help="the REPA ablation's branch: stages 2 and 3 without REPA")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.set_defaults(func=cmd_world_flow)
    p = wsub.add_parser("edit-model", help="the world's edit model: the default model fine-tuned on the six edit "
                        "tasks, then GRPO on the edit judge, scored on all test edits (docs/editing.md)")
    p.add_argument("--model", default=None, help="starting model (default: the bundled default model)")
    p.add_argument("--out", default="runs/world/edit-model", help="final model folder")
    p.add_argument("--work", default="runs/world-edit", help="step folders (edit-sft, edit-rl); a rerun continues")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the recipe's, 2)")
    p.add_argument("--no-rl", action="store_true", help="stop after the supervised edit stage")
    p.add_argument("--smoke", action="store_true", help="tiny budgets (a minute)")
    p.add_argument("--no-eval", action="store_true")
    p.set_defaults(func=cmd_world_edit_model)
    p = wsub.add_parser("ablation", help="Janus Table 5 in miniature (decoupled vs shared encoder, task-only)")
    p.add_argument("--work", default="runs/ablation")
    p.add_argument("--only", action="append", default=None, help="run only these experiments (A, B, C, D)")
    p.add_argument("--base", default=None, help="reuse a `world build` work folder (world, components, text LLM)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of the unified runs (A, B; default 1500); "
                   "C and D get the steps that give each task the same samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.set_defaults(func=cmd_world_ablation)
    p = wsub.add_parser("overfit", help="can the stack learn binding: memorise a few scenes, score them")
    p.add_argument("--model", default=None, help="starting model (default: the bundled default model)")
    p.add_argument("--work", default="runs/overfit")
    p.add_argument("--scenes", type=int, default=256)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_world_overfit)
    p = wsub.add_parser("rl", help="GRPO on the world's judge from a model (default: the bundled one), scored "
                        "before and after")
    p.add_argument("--model", default=None, help="starting model (default: the bundled default model)")
    p.add_argument("--work", default="runs/rl", help="run folder (a rerun continues from it)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--kl-weight", type=float, default=0.04)
    p.add_argument("--logprob", choices=("cfg", "cond"), default="cfg",
                   help="log-prob of a CFG-sampled token: the guided distribution or the conditional one")
    p.add_argument("--reward", action="append", metavar="NAME[=WEIGHT]",
                   help="a registered reward and its weight, repeatable (default: world=1)")
    p.add_argument("--categories", default=None, metavar="CAT,CAT,...",
                   help="prompt categories drawn uniformly from this list (repeat one to weight it; default: all six)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--edits", action="store_true",
                   help="GRPO on the world's edit tasks (reward world_edit unless --reward; --categories names "
                        "tasks); the model must have been trained on edits (configs/world-edit.toml)")
    p.add_argument("--cfg-image", type=float, default=None, help="edits: image guidance weight (default 1.5)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.set_defaults(func=cmd_world_rl)
    p = wsub.add_parser("scaling", help="GenEval / QA / loss against samples seen, for several LLM sizes")
    p.add_argument("--work", default="runs/scaling", help="study folder (a rerun continues from it)")
    p.add_argument("--components", default=None, help="model whose SigLIP, VQ and tokenizer every size starts "
                   "from (default: the bundled default model)")
    p.add_argument("--sizes", default="S,M,L", help="LLM sizes of januskit.recipes.scaling.SIZES")
    p.add_argument("--budgets", default="500,1000,2000", help="steps (x 32 samples) at which to evaluate")
    p.add_argument("--lr", type=float, default=2e-3, help="the constant LR after warm-up (every size; use a "
                   "separate --work folder per LR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_world_scaling)

    for name, help_ in (("serve", "OpenAI-style HTTP API (chat completions, image generations) with the web UI at /ui"),
                        ("ui", "the web UI (Gradio) and the API: same as serve, the UI required")):
        p = sub.add_parser(name, help=help_)
        _model_arg(p)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--name", default=None, help="model id clients send (default: the folder name)")
        p.add_argument("--max-queue", type=int, default=32, help="waiting requests before 429")
        p.add_argument("--max-batch", type=int, default=8, help="images (or chats) decoded together")
        p.add_argument("--max-n", type=int, default=8, help="images per request")
        p.add_argument("--max-tokens", type=int, default=512, help="completion tokens per request (also the default)")
        p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
        p.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit")
        p.add_argument("--max-prompt-chars", type=int, default=131072, help="text characters per request")
        p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a client may take to send a "
                       "request's headers, and between pieces of its body")
        p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per input image "
                       "(checked from its header before decoding)")
        if name == "serve":
            p.add_argument("--no-ui", action="store_true", help="the API only")
        p.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="benchmarks")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("world", help="GenEval-style generation and QA/POPE understanding on the miniature world")
    _model_arg(p)
    p.add_argument("--world", default=None, help="a world folder (default: the default world's test split)")
    p.add_argument("--json", action="store_true", help="print the full report (per-item records) as JSON")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--cfg-weight", "--cfg", type=float, default=None,
                   help="classifier-free guidance weight; default: the reference's (Janus 5, JanusFlow 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="Janus only")
    p.add_argument("--steps", type=int, default=30, help="JanusFlow only: Euler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts-per-category", type=int, default=None, help="evaluate a subset: first K per category")
    p.add_argument("--questions-per-type", type=int, default=None, help="evaluate a subset: first K per type")
    p.add_argument("--edits-per-task", type=_count_or_all, default=0, metavar="K|all", help="edits: the first K of "
                   "each task, or all (default 0: none; a model trained on edit samples, docs/editing.md)")
    p.add_argument("--cfg-image", type=float, default=None, help="edits: image guidance weight (default 1.5)")
    _sjd_args(p)
    p.add_argument("--out", "--save-images", dest="out", default=None, help="the run folder: images in GenEval's "
                   "layout, answers as JSONL, run.json; a rerun with the same folder resumes (default: a temporary "
                   "folder, removed afterwards; needed under torchrun)")
    p.add_argument("--grid", default=None, help="PNG file: the first 2 prompts of each category, their images and "
                   "the judge's verdicts (and, with edits, <name>-edits.png: the first 2 edits of each task)")
    p.add_argument("--export-benchmarks", default=None, metavar="DIR", help="write the test split as GenEval's "
                   "evaluation_metadata.jsonl and a POPE file in DIR (for `eval geneval` / `eval pope`) and exit")
    p.set_defaults(func=cmd_eval_world)
    for bench, what in (("pope", "POPE: the three coco_pope_*.json files (--data folder) on COCO val2014 (--images)"),
                        ("mme", "MME: the MME_Benchmark_release_version folder (--data)"),
                        ("gqa", "GQA: testdev_balanced_questions.json (--data) and the images folder (--images)"),
                        ("mmbench", "MMBench: the TSV with base64 images (--data), circular evaluation")):
        p = esub.add_parser(bench, help=what + "; docs/evaluation.md")
        _model_arg(p)
        p.add_argument("--data", required=True, help="the benchmark's files, as the release lays them out")
        p.add_argument("--images", default=None, help="images folder (POPE: COCO val2014; GQA: images/)")
        p.add_argument("--out", default=None, help=f"answers, summary.json, summary.md (default runs/eval-{bench}); "
                       "a rerun with the same folder skips what is answered")
        p.add_argument("--limit", type=int, default=None,
                       help="only the first N questions as asked (a quick look; in MMBench each rotation is one)")
        p.add_argument("--batch", type=int, default=8, help="questions answered in one batch")
        p.add_argument("--max-new-tokens", type=int, default=16)
        p.add_argument("--instruction", choices=["default", "short", "none"], default="default",
                       help="default: the Janus authors' (POPE, GQA: 'Answer the question using a single word or "
                       "phrase.'; MME: none, its questions ask for yes or no; MMBench: always its option-letter "
                       "line, whatever this says); short: always that line; none: never")
        p.add_argument("--system-prompt", choices=["none", "default"], default="none",
                       help="none: no system prompt (the authors' evaluation); default: the processor's")
        p.add_argument("--release", default=None, help="print this release's paper figure beside ours (default: "
                       "from the model folder's name, e.g. Janus-Pro-7B)")
        p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
        if bench == "mmbench":
            p.add_argument("--no-circular", action="store_true", help="ask each question once (rotation 0 only)")
        p.set_defaults(func=cmd_eval_bench, command_bench=bench)
    p = _generation_bench_args(esub, "geneval", "GenEval: generate for evaluation_metadata.jsonl in the official "
                               "layout, score with a plugged-in detector", "evaluation_metadata.jsonl (or its folder)",
                               "<out>/<index>/samples/<k>.png (default runs/eval-geneval); a rerun skips prompts whose "
                               "images are all there")
    p.add_argument("--images-per-prompt", "-n", type=int, default=4)
    p.add_argument("--detector", default=None, help="'world' (the miniature world's judge) or package.module:factory "
                   "returning a callable image -> [januskit.eval.geneval.Box]; without it, images are only generated")
    p.add_argument("--colour-classifier", default=None, help="package.module:factory returning a callable "
                   "(image, box, colours) -> colour (not needed when the detector gives colours, as 'world' does)")
    p.set_defaults(func=cmd_eval_geneval)
    p = _generation_bench_args(esub, "dpg", "DPG-Bench: 2x2 grids per prompt (the official layout), scored by a "
                               "plugged-in VQA judge with the dependency rule", "the dpg_bench folder: dpg_bench.csv "
                               "and prompts/", "<out>/<item_id>.png grids (default runs/eval-dpg); a rerun skips grids "
                               "already written")
    p.add_argument("--judge", default=None, help="'chat' (this model's own chat answers the questions) or "
                   "package.module:factory returning a callable (image, question) -> bool; without it, only grids")
    p.set_defaults(func=cmd_eval_dpg)
    return ap


def _image_args(p: argparse.ArgumentParser, prompt: str, cfg: str = "classifier-free guidance weight (default: the "
                "reference's, 5 for Janus, 2 for JanusFlow)") -> None:
    """What `generate` and `edit` share: the prompt, how many, where, and the sampler's options."""
    _model_arg(p)
    p.add_argument("prompt", help=prompt)
    p.add_argument("-n", type=int, default=1, help="images to generate")
    p.add_argument("--seed", "-s", type=int, default=0)
    p.add_argument("--out", "-o", default="out", help="folder for the PNG files")
    p.add_argument("--prefix", default="img_", help="file name prefix")
    p.add_argument("--cfg-weight", "--cfg", type=float, default=None, help=cfg)
    p.add_argument("--steps", type=int, default=30, help="JanusFlow: Euler steps of the ODE (reference 30)")
    p.add_argument("--temperature", type=float, default=1.0, help="Janus: 0 = argmax")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--memory-budget-gb", type=float, default=4.0, help="Janus: images are generated in chunks that fit this")
    p.add_argument("--json", action="store_true")


def _generation_bench_args(esub, name: str, what: str, data: str, out: str) -> argparse.ArgumentParser:
    """The options GenEval and DPG-Bench share: what to read, where to write, how to generate."""
    p = esub.add_parser(name, help=what + "; docs/evaluation.md")
    _model_arg(p)
    p.add_argument("--data", required=True, help=data)
    p.add_argument("--out", default=None, help=out)
    p.add_argument("--seed", type=int, default=0, help="image k of prompt i is sampled with generator (seed, i*n + k)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--batch", type=int, default=None, help="images generated together, across prompts (default: 64 "
                   "for Janus, whose sampler splits them to fit 4 GB; one prompt's for JanusFlow, which runs "
                   "a batch at once)")
    p.add_argument("--cfg-weight", "--cfg", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="Janus only")
    p.add_argument("--steps", type=int, default=None, help="JanusFlow only")
    p.add_argument("--score-only", action="store_true", help="score what is already in --out")
    p.add_argument("--release", default=None, help="print this release's paper figure beside ours")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, KeyError) as e:  # OSError: FileNotFoundError, FileExistsError, PermissionError, ...
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"januskit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
