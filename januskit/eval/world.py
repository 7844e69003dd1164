"""`januskit eval world`: the miniature world's GenEval-style and QA benchmarks, scored by the judge.

Generation: each test prompt gets `images_per_prompt` samples (Janus: CFG and temperature over VQ
tokens; JanusFlow: CFG on the velocity over `steps` Euler steps), every image is decoded, read by the
judge and scored by its category's rule; a category's score is the fraction of
correct images and `overall` is the mean of the six category scores (GenEval's definition).
Understanding: greedy answers, exact match after normalisation; POPE also gets precision / recall /
F1 with "yes" as the positive class, as the POPE paper reports it. `describe` (the full scene
description) is reported beside the QA accuracy, not inside it.
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
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
from ..world.judge import detect, detect_regions, score
from ..world.prompts import CATEGORIES, Prompt
from ..world.questions import QTYPES, normalise
from .geneval import world_boxes, world_metadata
from .geneval import judge as geneval_judge


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


@dataclass
class WorldReport:
    generation: dict[str, Any] = field(default_factory=dict)
    understanding: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "understanding": self.understanding, "settings": self.settings}


def test_split(world: str | Path | None, split: str = "test", seed: int = 0) -> Path:
    """The folder holding `<split>/prompts.jsonl` and `questions.jsonl`: the given world, or the
    default world's split written (deterministically, ~1 s) to a temporary folder."""
    if world is not None:
        d = Path(world) / split
        for f in ("prompts.jsonl", "questions.jsonl"):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / f}: missing (write a world with `januskit world write DIR`)")
        return d
    from ..world.dataset import SIZES

    root = Path(tempfile.mkdtemp(prefix="januskit-world-"))
    sizes = {k: v for k, v in SIZES[split].items() if k in ("n_prompts", "n_questions")}
    write_split(root, split, seed, held_out(), n_gen=0, n_und=0, n_text=0, **sizes)
    return root / split


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


@torch.inference_mode()
def generate_for(pipe, prompts: list[str], s: EvalSettings, progress: Callable[[int], None] | None = None,
                 llm_forwards: list[int] | None = None) -> np.ndarray:
    """(len(prompts) * images_per_prompt, S, S, 3) uint8 images; image j of prompt i uses generator
    (seed, i * images_per_prompt + j), so any subset or batch size gives the same images. `llm_forwards`
    (Janus) collects the LLM forward passes of each image."""
    rows = [(i, j) for i in range(len(prompts)) for j in range(s.images_per_prompt)]
    ids = [pipe.processor.generation_prompt(p) for p in prompts]
    options = pipe.own_options(temperature=s.temperature, steps=s.steps)  # the settings of this architecture
    if s.speculative is not None:  # asked for explicitly: JanusFlow refuses it rather than ignoring it
        options |= dict(speculative=s.speculative, window=s.window)
    out = []
    for start in range(0, len(rows), s.batch):
        chunk = rows[start:start + s.batch]
        gens = [row_generator(s.seed, i * s.images_per_prompt + j) for i, j in chunk]
        batch = pipe.generate_batch([ids[i] for i, _ in chunk], generators=gens, cfg_weight=cfg_weight_of(pipe, s),
                                    **options)
        out.append(batch.uint8())
        if llm_forwards is not None:
            llm_forwards += batch.info.get("llm_forwards", [])
        if progress:
            progress(len(chunk))
    return np.concatenate(out)


def eval_generation(pipe, prompts: list[tuple[Prompt, bool]], s: EvalSettings, save_dir: Path | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    if pipe.image_size is None:
        raise ValueError(f"{pipe.source}: a JanusFlow model needs its VAE to be evaluated (--vae DIR)")
    forwards: list[int] = []
    pixels = generate_for(pipe, [p.text for p, _ in prompts], s, progress, forwards)  # (n, S, S, 3) uint8
    by_cat: dict[str, list[bool]] = defaultdict(list)
    by_cat_geneval: dict[str, list[bool]] = defaultdict(list)
    held: dict[str, list[bool]] = defaultdict(list)
    records = []
    for k, img in enumerate(pixels):
        p, is_held = prompts[k // s.images_per_prompt]
        regions = detect_regions(img, masks=False)  # one detection serves both judges
        ok = score(p, [d for d, _, _ in regions])
        # GenEval's own rules on the same objects (januskit.eval.geneval), reported beside the world judge's
        ok_geneval = None  # training captions' own categories (color_position, objects, ...) have no GenEval form
        if p.category in CATEGORIES:
            boxes = world_boxes(regions)
            ok_geneval = geneval_judge(img, world_metadata(p), lambda _: boxes)[0]
            by_cat_geneval[p.category].append(ok_geneval)
        by_cat[p.category].append(ok)
        if p.category in ("position", "color_attr"):
            held["held_out" if is_held else "seen"].append(ok)
        records.append({"prompt": p.text, "category": p.category, "held_out": is_held, "correct": ok,
                        "correct_geneval_rules": ok_geneval})
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(save_dir / f"{k // s.images_per_prompt:04d}_{k % s.images_per_prompt}.png")
    cats = {c: float(np.mean(by_cat[c])) for c in CATEGORIES if by_cat[c]}
    cats_geneval = {c: float(np.mean(by_cat_geneval[c])) for c in CATEGORIES if by_cat_geneval[c]}
    out = {"overall": float(np.mean(list(cats.values()))), "categories": cats,
           "geneval_rules": {"overall": float(np.mean(list(cats_geneval.values()))) if cats_geneval else None,
                             "categories": cats_geneval},
           "position_color_attr": {k: float(np.mean(v)) for k, v in held.items()},
           "images": len(records), "prompts": len(prompts), "records": records}
    if forwards:  # Janus: n_tokens per image, fewer with speculative decoding
        out["llm_forwards_per_image"] = float(np.mean(forwards))
    return out


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


def eval_understanding(pipe, split_dir: Path, rows: list[dict], batch: int = 32) -> dict[str, Any]:
    answers: list[str] = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        answers += pipe.chat_batch([r["question"] for r in chunk], [[split_dir / r["image"]] for r in chunk],
                                   max_new_tokens=96 if any(r["qtype"] == "describe" for r in chunk) else 8)
    by_type: dict[str, list[bool]] = defaultdict(list)
    pope = {"tp": 0, "fp": 0, "fn": 0, "tn": 0, "other": 0}
    records = []
    for r, a in zip(rows, answers):
        ok = normalise(a) == normalise(r["answer"])
        by_type[r["qtype"]].append(ok)
        records.append({"qtype": r["qtype"], "question": r["question"], "answer": r["answer"], "model": a, "correct": ok})
        if r["qtype"] == "pope":
            said = normalise(a)
            truth = r["answer"] == "yes"
            key = "other" if said not in ("yes", "no") else \
                {(True, True): "tp", (True, False): "fn", (False, True): "fp", (False, False): "tn"}[(truth, said == "yes")]
            pope[key] += 1
    qa = [ok for t in QTYPES for ok in by_type.get(t, [])]
    out: dict[str, Any] = {"accuracy": float(np.mean(qa)) if qa else float("nan"),
                           "types": {t: float(np.mean(v)) for t, v in by_type.items()}, "questions": len(rows)}
    if by_type.get("pope"):
        prec = pope["tp"] / max(1, pope["tp"] + pope["fp"])
        rec = pope["tp"] / max(1, pope["tp"] + pope["fn"])
        out["pope"] = {"accuracy": out["types"]["pope"], "precision": prec, "recall": rec,
                       "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                       "yes_ratio": (pope["tp"] + pope["fp"]) / max(1, len(by_type["pope"]))}
    out["records"] = records
    return out


def evaluate(pipe, world: str | Path | None = None, settings: EvalSettings = EvalSettings(), *,
             generation: bool = True, understanding: bool = True, save_dir: str | Path | None = None,
             progress: bool = False) -> WorldReport:
    split = test_split(world)
    # The report keeps the key "cfg" for the guidance weight, so that reports compare across versions.
    rep = WorldReport(settings={"cfg" if k == "cfg_weight" else k: v for k, v in vars(settings).items()}
                      | {"cfg": cfg_weight_of(pipe, settings), "arch": pipe.arch})
    if generation and settings.prompts_per_category != 0:  # 0 prompts (or questions) a category: that half skipped
        prompts = _first_k(read_prompts(split / "prompts.jsonl"), lambda r: r[0].category, settings.prompts_per_category)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts) * settings.images_per_prompt, unit="img", desc="generation")
        rep.generation = eval_generation(pipe, prompts, settings, Path(save_dir) if save_dir else None,
                                         bar.update if bar else None)
        if bar:
            bar.close()
        rep.generation["judge"] = eval_judge(pipe, prompts, settings.seed)
    if understanding and settings.questions_per_type != 0:
        rows = [json.loads(x) for x in (split / "questions.jsonl").read_text().splitlines() if x.strip()]
        rows = _first_k(rows, lambda r: r["qtype"], settings.questions_per_type)
        rep.understanding = eval_understanding(pipe, split, rows)
    return rep


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
        if "judge" in g:
            j = g["judge"]
            lines.append(f"  judge on the prompts' own scenes: clean {j['clean']['overall']:.3f}, "
                         f"through the {'VAE' if rep.settings.get('arch') == 'janusflow' else 'VQ tokenizer'} "
                         f"{j['vq']['overall']:.3f} (the ceiling)")
    if u:
        lines.append(f"Understanding ({u['questions']} questions, greedy, exact match)")
        lines += [f"  {t:<14} {v:6.3f}" for t, v in u["types"].items()]
        lines.append(f"  {'accuracy':<14} {u['accuracy']:6.3f}   (colour, shape, count, position, POPE)")
        if "pope" in u:
            p = u["pope"]
            lines.append(f"  POPE: accuracy {p['accuracy']:.3f}  precision {p['precision']:.3f}  recall {p['recall']:.3f}"
                         f"  F1 {p['f1']:.3f}  yes-ratio {p['yes_ratio']:.3f}")
    return "\n".join(lines)
