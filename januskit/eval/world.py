"""`januskit eval world`: the miniature world's GenEval-style and QA benchmarks, scored by the judge.

Runs through the paper benchmarks' harness. Generation: the test prompts as GenEval records
(eval.geneval.world_metadata), `images_per_prompt` samples each in GenEval's layout (Janus: CFG and
temperature over VQ tokens; JanusFlow: CFG on the velocity over `steps` Euler steps); every image is read
once by the judge's detector and scored by its category's rule (the headline) and by GenEval's rules; a
category's score is the fraction of correct images and `overall` the mean of the six (GenEval's
definition). Understanding: greedy answers through eval.harness (batched, resumable, sharded), exact match
after normalisation; the POPE questions also get accuracy / precision / recall / F1 / yes-ratio by the
official POPE rule. `describe` (the full scene description) is reported beside the QA accuracy, not in it.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..processing.image import to_uint8
from ..sampling.logits import row_generator
from ..sampling.speculative import DEFAULT_WINDOW
from ..world.dataset import held_out, read_prompts, write_split
from ..world.judge import OUTCOMES, detect, detect_regions, failure_mode, outcome_kind, score
from ..world.prompts import CATEGORIES, Prompt
from ..world.questions import QTYPES, normalise
from .geneval import generate, sample_path, world_boxes, world_metadata
from .geneval import judge as geneval_judge
from .harness import Item, RunOptions, answer_items, barrier, rank_world
from .pope import metrics as pope_metrics
from .pope import to_yes_no


@dataclass(frozen=True)
class EvalSettings:
    images_per_prompt: int = 4  # GenEval samples 4 images per prompt
    cfg_weight: float | None = None  # None: the pipeline's default_cfg_weight (Janus 5, JanusFlow 2)
    temperature: float = 1.0  # Janus only
    steps: int = 30  # JanusFlow only: Euler steps
    speculative: str | None = None  # Janus only: "sjd" or "mc-sjd" (speculative Jacobi decoding), None: ordinary
    window: int | None = None  # SJD's tokens per LLM forward (None: sampling.speculative.DEFAULT_WINDOW)
    seed: int = 0
    batch: int = 64  # images decoded together (2 CFG rows each)
    prompts_per_category: int | None = None  # a subset: the first k prompts of each category
    questions_per_type: int | None = None  # a subset: the first k questions of each type
    edits_per_task: int | None = 0  # edits: the first k of each task (None: all; 0: none, the default here)
    cfg_image: float | None = None  # edits: the image guidance weight (None: 1.5)


@dataclass
class WorldReport:
    generation: dict[str, Any] = field(default_factory=dict)
    understanding: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    edits: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"generation": self.generation, "understanding": self.understanding, "settings": self.settings}
        return out | ({"edits": self.edits} if self.edits else {})


def test_split(world: str | Path | None, split: str = "test", seed: int = 0) -> Path:
    """The folder holding `<split>/prompts.jsonl` and `questions.jsonl`: the given world, or the
    default world's split written (deterministically, ~1 s) to a temporary folder."""
    if world is not None:
        d = Path(world) / split
        for f in ("prompts.jsonl", "questions.jsonl"):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / f}: missing (write a world with `januskit world write DIR`)")
        return d
    return _default_split(split, seed)


def write_eval_split(root: Path, split: str = "test", seed: int = 0) -> Path:
    """The default world's evaluation sets of `split` (prompts, questions with their images, edits) in
    `root/split`, the same bytes each time."""
    from ..world.dataset import SIZES

    sizes = {k: v for k, v in SIZES[split].items() if k in ("n_prompts", "n_questions", "n_edits")}
    write_split(root, split, seed, held_out(), n_gen=0, n_und=0, n_text=0, **sizes)
    return root / split


@functools.cache
def _default_split(split: str, seed: int) -> Path:
    """Written once per process and removed when it exits: an evaluation leaves nothing in /tmp."""
    root = Path(tempfile.mkdtemp(prefix="januskit-world-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_eval_split(root, split, seed)


def _first_k(rows: list, key: Callable[[Any], str], k: int | None) -> list:
    if k is None:
        return rows
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in rows:
        if seen[key(r)] < k:
            seen[key(r)] += 1
            out.append(r)
    return out


def cfg_weight_of(pipe, s: EvalSettings) -> float:
    return s.cfg_weight if s.cfg_weight is not None else pipe.default_cfg_weight


def _geneval_record(p: Prompt) -> dict[str, Any]:
    """GenEval metadata for a test prompt; training captions' own categories (color_position, objects, ...)
    have no GenEval form and get a record with the tag and prompt only."""
    return world_metadata(p) if p.category in CATEGORIES else {"tag": p.category, "prompt": p.text, "include": []}


def _generation_options(pipe, s: EvalSettings) -> dict[str, Any]:
    options = pipe.own_options(temperature=s.temperature, steps=s.steps)  # the settings of this architecture
    if s.speculative is not None:  # asked for explicitly: JanusFlow refuses it rather than ignoring it
        options |= dict(speculative=s.speculative, window=s.window)
    return options | {"cfg_weight": cfg_weight_of(pipe, s)}


@torch.inference_mode()
def eval_generation(pipe, prompts: list[tuple[Prompt, bool]], s: EvalSettings, save_dir: Path | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Generate through GenEval's harness (eval.geneval.generate: its layout in `save_dir`, or a temporary
    folder; image k of prompt i from generator (seed, i * n + k)), then judge every image twice from one
    detection: by the world judge (the headline) and by GenEval's rules. Under torchrun each rank generates
    its share into the shared `save_dir`; rank 0 judges them all, the others return {}."""
    if pipe.image_size is None:
        raise ValueError(f"{pipe.source}: a JanusFlow model needs its VAE to be evaluated (--vae DIR)")
    rank, world = rank_world()
    if world > 1 and save_dir is None:
        raise ValueError("eval world under torchrun: pass --out DIR, a folder every rank can write")
    out = Path(save_dir) if save_dir is not None else Path(tempfile.mkdtemp(prefix="januskit-eval-world-"))
    n = s.images_per_prompt
    forwards: list[int] = []
    try:
        generate(pipe, [_geneval_record(p) for p, _ in prompts], out, n=n, seed=s.seed, batch=s.batch,
                 progress=progress, on_batch=lambda b: forwards.extend(b.info.get("llm_forwards", [])),
                 **_generation_options(pipe, s))
        barrier(world)
        if rank != 0:
            return {}
        return _judge_folder(out, prompts, n, forwards)
    finally:
        if save_dir is None:
            shutil.rmtree(out, ignore_errors=True)


def _judge_folder(out: Path, prompts: list[tuple[Prompt, bool]], n: int, forwards: list[int]) -> dict[str, Any]:
    by_cat: dict[str, list[bool]] = defaultdict(list)
    by_cat_geneval: dict[str, list[bool]] = defaultdict(list)
    held: dict[str, list[bool]] = defaultdict(list)
    modes: dict[str, dict[str, Counter]] = defaultdict(lambda: {"seen": Counter(), "held_out": Counter()})
    records = []
    for i, (p, is_held) in enumerate(prompts):
        for k in range(n):
            path = sample_path(out, i, k)
            img = np.asarray(Image.open(path).convert("RGB"))
            regions = detect_regions(img, masks=False)  # one detection serves both judges
            ok = score(p, [d for d, _, _ in regions])
            ok_geneval = None
            if p.category in CATEGORIES:
                boxes = world_boxes(regions)
                ok_geneval = geneval_judge(img, world_metadata(p), lambda _: boxes)[0]
                by_cat_geneval[p.category].append(ok_geneval)
            by_cat[p.category].append(ok)
            if p.category in ("position", "color_attr"):
                held["held_out" if is_held else "seen"].append(ok)
            mode = failure_mode(p, [d for d, _, _ in regions])
            if mode is not None:
                modes[p.category]["held_out" if is_held else "seen"][mode] += 1
            records.append({"prompt": p.text, "category": p.category, "held_out": is_held, "correct": ok,
                            "correct_geneval_rules": ok_geneval, "image": str(path.relative_to(out))}
                           | ({"outcome": mode} if mode is not None else {}))
    cats = {c: float(np.mean(by_cat[c])) for c in CATEGORIES if by_cat[c]}
    cats_geneval = {c: float(np.mean(by_cat_geneval[c])) for c in CATEGORIES if by_cat_geneval[c]}
    res = {"overall": float(np.mean(list(cats.values()))), "categories": cats,
           "geneval_rules": {"overall": float(np.mean(list(cats_geneval.values()))) if cats_geneval else None,
                             "categories": cats_geneval},
           "position_color_attr": {k: float(np.mean(v)) for k, v in held.items()},
           "outcomes": {c: {k: {o: n[o] / sum(n.values()) for o in OUTCOMES[outcome_kind(c)]}
                            for k, n in by.items() if n} for c, by in modes.items()},
           "images": len(records), "prompts": len(prompts), "records": records}
    if forwards:  # Janus: LLM forwards per image (the images generated in this call), fewer with SJD
        res["llm_forwards_per_image"] = float(np.mean(forwards))
    return res


@torch.inference_mode()
def eval_judge(pipe, prompts: list[tuple[Prompt, bool]], seed: int = 0) -> dict[str, Any]:
    """The judge's own accuracy per category on a scene drawn for each prompt: rendered (clean) and
    passed through the model's image tokenizer (VQ, or JanusFlow's VAE: encode + decode), the ceiling a
    generated image can reach. The second entry keeps the key "vq" for both."""
    from ..world.prompts import scene_for
    from ..world.render import render

    rng = np.random.default_rng(seed)
    imgs = [render(scene_for(p, rng)) for p, _ in prompts]
    rec = to_uint8(pipe.reconstruct_pixels(imgs))
    out: dict[str, Any] = {}
    for name, images in (("clean", [np.asarray(i) for i in imgs]), ("vq", list(np.asarray(rec)))):
        by_cat: dict[str, list[bool]] = defaultdict(list)
        for (p, _), img in zip(prompts, images):
            by_cat[p.category].append(score(p, detect(img)))
        cats = {c: float(np.mean(v)) for c, v in by_cat.items()}
        out[name] = {"overall": float(np.mean(list(cats.values()))), "categories": cats}
    return out


def eval_understanding(pipe, split_dir: Path, rows: list[dict], batch: int = 32, out: Path | None = None,
                       progress: bool = False) -> dict[str, Any]:
    """Greedy answers through the benchmark harness (eval.harness.answer_items: batched, sharded under
    torchrun, appended to `out`/answers.rank<r>.jsonl so a rerun skips them), with the processor's system
    prompt, the one the world's models are trained with. Exact match after normalisation; the POPE block is
    scored by the official POPE rule (eval.pope). Rank 0 returns the report, the others {}."""
    items = [Item(str(r.get("id", n)), split_dir / r["image"], r["question"], r) for n, r in enumerate(rows)]
    tmp = out is None
    opts = RunOptions(out=Path(tempfile.mkdtemp(prefix="januskit-eval-world-")) if tmp else out, batch=batch,
                      progress=progress)

    def answer(chunk: list[Item]) -> list[str]:
        describe = any(it.meta["qtype"] == "describe" for it in chunk)
        return pipe.chat_batch([it.prompt for it in chunk], [[it.image] for it in chunk],
                               max_new_tokens=96 if describe else 8)
    try:
        answers = answer_items(answer, items, opts, "world QA")
    finally:
        if tmp:
            shutil.rmtree(opts.out, ignore_errors=True)
    if answers is None:
        return {}
    by_type: dict[str, list[bool]] = defaultdict(list)
    records = []
    for it in items:
        r, a = it.meta, answers[it.id]
        ok = normalise(a) == normalise(r["answer"])
        by_type[r["qtype"]].append(ok)
        records.append({"qtype": r["qtype"], "question": r["question"], "answer": r["answer"], "model": a, "correct": ok})
    qa = [ok for t in QTYPES for ok in by_type.get(t, [])]
    res: dict[str, Any] = {"accuracy": float(np.mean(qa)) if qa else float("nan"),
                           "types": {t: float(np.mean(v)) for t, v in by_type.items()}, "questions": len(rows)}
    pope = [it for it in items if it.meta["qtype"] == "pope"]
    if pope:
        m = pope_metrics([it.meta["answer"] for it in pope], [to_yes_no(answers[it.id]) for it in pope])
        res["pope"] = {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    res["records"] = records
    return res


@torch.inference_mode()
def eval_edits(pipe, split_dir: Path, rows: list[dict], s: EvalSettings, save_dir: Path | None = None) -> dict[str, Any]:
    """Each edit's source image and instruction through pipe.edit_image's rows (generate_batch with
    sources), `images_per_prompt` images per edit, image k of edit i from generator (seed, i * n + k);
    an image is correct when the judge finds exactly the target scene (world.edits.score_edit). Per task,
    held-out vs seen combinations, and the mean over tasks; `diagnostics`: per task, the share of images
    right in each part of the exact match (world.edits.edit_diagnostics: object count, objects, cells, the
    untouched objects kept)."""
    from ..processing.image import load_image
    from ..world.edits import DIAGNOSTICS, TASKS, Edit, edit_diagnostics, score_edit

    if pipe.image_size is None:
        raise ValueError(f"{pipe.source}: a JanusFlow model needs its VAE to be evaluated (--vae DIR)")
    n = s.images_per_prompt
    edits = [Edit.from_json(r) for r in rows]
    srcs = [[load_image(split_dir / r["image"])] for r in rows]
    ids = [pipe.processor.edit_prompt(e.instruction, 1) for e in edits]
    rowsn = [(i, k) for i in range(len(edits)) for k in range(n)]
    options = _generation_options(pipe, s) | {"cfg_image": s.cfg_image}
    options.pop("speculative", None), options.pop("window", None)
    by_task: dict[str, list[bool]] = defaultdict(list)
    held: dict[str, list[bool]] = defaultdict(list)
    parts: dict[str, list[dict[str, bool]]] = defaultdict(list)
    records = []
    for start in range(0, len(rowsn), s.batch):
        chunk = rowsn[start:start + s.batch]
        out = pipe.generate_batch([ids[i] for i, _ in chunk], generators=[row_generator(s.seed, i * n + k) for i, k in chunk],
                                  sources=[srcs[i] for i, _ in chunk], **options)
        for (i, k), img in zip(chunk, out.uint8()):
            found = detect(img)
            ok = score_edit(found, edits[i].target)
            by_task[edits[i].task].append(ok)
            parts[edits[i].task].append(edit_diagnostics(found, edits[i]))
            held["held_out" if rows[i].get("held_out") else "seen"].append(ok)
            records.append({"task": edits[i].task, "instruction": edits[i].instruction, "held_out": bool(rows[i].get("held_out")),
                            "correct": ok, "source": rows[i]["image"], "image": f"edit{i:04d}_{k}.png"})
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(save_dir / records[-1]["image"])
    tasks = {t: float(np.mean(by_task[t])) for t in TASKS if by_task[t]}
    return {"overall": float(np.mean(list(tasks.values()))) if tasks else float("nan"), "tasks": tasks,
            "held_out_vs_seen": {k: float(np.mean(v)) for k, v in held.items()}, "edits": len(edits),
            "images": len(records),
            "diagnostics": {t: {d: float(np.mean([x[d] for x in parts[t]])) for d in DIAGNOSTICS} for t in tasks},
            "ceiling": edit_ceiling(pipe, edits), "records": records}


@torch.inference_mode()
def edit_ceiling(pipe, edits: list, batch: int = 100) -> dict[str, Any]:
    """Each edit's exact target scene rendered and passed through the model's image tokenizer (VQ, or
    JanusFlow's VAE: encode + decode), then judged like a generated image: per task the share the judge
    still reads as the target, the best an edit can score with this tokenizer."""
    from ..world.edits import score_edit
    from ..world.render import render

    by_task: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(edits), batch):
        chunk = edits[start:start + batch]
        rec = to_uint8(pipe.reconstruct_pixels([render(e.target) for e in chunk]))
        for e, img in zip(chunk, np.asarray(rec)):
            by_task[e.task].append(score_edit(detect(img), e.target))
    tasks = {t: float(np.mean(v)) for t, v in by_task.items()}
    return {"overall": float(np.mean(list(tasks.values()))) if tasks else float("nan"), "tasks": tasks}


def evaluate(pipe, world: str | Path | None = None, settings: EvalSettings = EvalSettings(), *,
             generation: bool = True, understanding: bool = True, save_dir: str | Path | None = None,
             progress: bool = False) -> WorldReport:
    """`save_dir`: the run folder (GenEval's layout for the images, the answers' JSONL, run.json); a rerun with
    the same folder and settings skips what is done, other settings or another model are refused. Without
    it, a temporary folder. Under torchrun (a shared `save_dir`) rank 0 returns the report, the others an
    empty one."""
    split = test_split(world)
    # The report keeps the key "cfg" for the guidance weight, so that reports compare across versions.
    rep = WorldReport(settings={"cfg" if k == "cfg_weight" else k: v for k, v in vars(settings).items()}
                      | {"cfg": cfg_weight_of(pipe, settings), "arch": pipe.arch})
    out = Path(save_dir) if save_dir is not None else None
    if out is not None:
        _claim(out, {"model": str(pipe.source), "world": str(world),  # the batch changes no image
                     "settings": {k: v for k, v in rep.settings.items() if k != "batch"}})
    if generation and settings.prompts_per_category != 0:  # 0 prompts (or questions) a category: that half skipped
        prompts = _first_k(read_prompts(split / "prompts.jsonl"), lambda r: r[0].category, settings.prompts_per_category)
        rep.generation = eval_generation(pipe, prompts, settings, out, progress)
        if rep.generation:
            rep.generation["judge"] = eval_judge(pipe, prompts, settings.seed)
    if understanding and settings.questions_per_type != 0:
        rows = [json.loads(x) | {"id": n} for n, x in enumerate((split / "questions.jsonl").read_text().splitlines())
                if x.strip()]
        rows = _first_k(rows, lambda r: r["qtype"], settings.questions_per_type)
        rep.understanding = eval_understanding(pipe, split, rows, out=out, progress=progress)
    if settings.edits_per_task != 0 and (split / "edits.jsonl").is_file() and rank_world()[0] == 0:
        rows = [json.loads(x) for x in (split / "edits.jsonl").read_text().splitlines() if x.strip()]
        rows = _first_k(rows, lambda r: r["task"], settings.edits_per_task)
        rep.edits = eval_edits(pipe, split, rows, settings, out / "edits" if out is not None else None)
    return rep


def _claim(out: Path, run: dict[str, Any]) -> None:
    """out/run.json records what the folder's images and answers are of; resuming under anything else is
    refused, naming the first field that differs."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    run = json.loads(json.dumps(run))  # as it reads back
    if path.is_file():
        old = json.loads(path.read_text())
        for key in sorted(set(old) | set(run)):
            a, b = old.get(key), run.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                key, a, b = (f"{key}.{diff[0]}", a.get(diff[0]), b.get(diff[0])) if diff else (key, a, a)
            if a != b:
                raise ValueError(f"{out}: holds a run with {key} = {a!r}, this one has {b!r}; pass a new folder "
                                 "(or delete it) to start over")
        return
    if rank_world()[0] == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1))
        tmp.replace(path)


def format_report(rep: WorldReport) -> str:
    lines = []
    g, u = rep.generation, rep.understanding
    if g:
        how = (f"{rep.settings['steps']} Euler steps" if rep.settings.get("arch") == "janusflow"
               else f"temperature {rep.settings['temperature']}")
        if rep.settings.get("speculative"):
            how += (f", {rep.settings['speculative']} window {rep.settings['window'] or DEFAULT_WINDOW}: "
                    f"{g['llm_forwards_per_image']:.1f} LLM forwards per image")
        lines.append(f"GenEval-style generation ({g['prompts']} prompts x {rep.settings['images_per_prompt']} images, "
                     f"cfg {rep.settings['cfg']}, {how})")
        lines += [f"  {c:<14} {v:6.3f}" for c, v in g["categories"].items()]
        lines.append(f"  {'overall':<14} {g['overall']:6.3f}")
        if g.get("geneval_rules", {}).get("overall") is not None:
            lines.append(f"  the same images by GenEval's own rules (januskit eval geneval --detector world): "
                         f"{g['geneval_rules']['overall']:.3f}")
        for k, v in g["position_color_attr"].items():
            lines.append(f"  position + colour attribution, {k.replace('_', '-')} combinations: {v:.3f}")
        for c, by in g.get("outcomes", {}).items():
            for k, share in by.items():
                lines.append(f"  {c} outcomes, {k.replace('_', '-')}: " + ", ".join(f"{o} {v:.2f}" for o, v in share.items()))
        if "judge" in g:
            j = g["judge"]
            lines.append(f"  judge on the prompts' own scenes: clean {j['clean']['overall']:.3f}, "
                         f"through the {'VAE' if rep.settings.get('arch') == 'janusflow' else 'VQ tokenizer'} "
                         f"{j['vq']['overall']:.3f} (the ceiling)")
    e = rep.edits
    if e:
        lines.append(f"Edits ({e['edits']} edits x {rep.settings['images_per_prompt']} images, the target scene "
                     f"exact; cfg_text {rep.settings['cfg']}, cfg_image {rep.settings.get('cfg_image') or 1.5})")
        diag = e.get("diagnostics", {})
        lines += [f"  {t:<14} {v:6.3f}" + ("   (right: " + ", ".join(f"{d} {x:.2f}" for d, x in diag[t].items()) + ")"
                                          if t in diag else "") for t, v in e["tasks"].items()]
        lines.append(f"  {'overall':<14} {e['overall']:6.3f}")
        for k, v in e["held_out_vs_seen"].items():
            lines.append(f"  {k.replace('_', '-')} combinations: {v:.3f}")
        if "ceiling" in e:
            c = e["ceiling"]
            lines.append(f"  the targets themselves through the "
                         f"{'VAE' if rep.settings.get('arch') == 'janusflow' else 'VQ tokenizer'} (the ceiling): "
                         + ", ".join(f"{t} {v:.2f}" for t, v in c["tasks"].items()) + f"; overall {c['overall']:.3f}")
    if u:
        lines.append(f"Understanding ({u['questions']} questions, greedy, exact match)")
        lines += [f"  {t:<14} {v:6.3f}" for t, v in u["types"].items()]
        lines.append(f"  {'accuracy':<14} {u['accuracy']:6.3f}   (colour, shape, count, position, POPE)")
        if "pope" in u:
            p = u["pope"]
            lines.append(f"  POPE: accuracy {p['accuracy']:.3f}  precision {p['precision']:.3f}  recall {p['recall']:.3f}"
                         f"  F1 {p['f1']:.3f}  yes-ratio {p['yes_ratio']:.3f}")
    return "\n".join(lines)
