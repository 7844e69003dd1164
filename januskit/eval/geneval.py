"""GenEval (Ghosh et al. 2023): generate images for `evaluation_metadata.jsonl` in the official output layout,
then score them with GenEval's rules through a detector you plug in.

Metadata: one JSON object per line, `{"tag", "include": [{"class", "count", "color"?, "position"?: [relation,
index of an earlier include]}], "exclude"?: [{"class", "count"}], "prompt"}`.

Layout (what GenEval's evaluate_images.py reads): `<out>/<index:05d>/metadata.jsonl` (the prompt's metadata line)
and `<out>/<index:05d>/samples/<k:04d>.png`, 4 images per prompt by default. Image k of prompt i is drawn with
generator (seed, i * n + k) alone (n images per prompt), so it does not depend on the batch, the number of ranks or a resume
(`januskit eval world` draws its images the same way, through this module).

Rules, as GenEval's evaluate_images.py applies them (re-implemented from its description):
- detections of each class above a confidence of 0.3 (0.9 for the `counting` tag), best first, at most 16;
- every `include` needs at least `count` objects of its class (its top `count` detections are "found");
  with a `color`, at least `count` of those must be classified as that colour; with a `position`
  [relation, j], every found object must stand in that relation to every object found for include j
  (and include j must have matched);
- every `exclude` fails the image when `count` or more objects of its class are detected;
- relation by box centres: offset = centre(a) - centre(b), shrunk on each axis by 0.1 x (sum of the two
  boxes' sizes), then divided by the unshrunk offset's length; "left of" if dx < -0.5, "right of" if dx > 0.5,
  "above" if dy < -0.5, "below" if dy > 0.5 (image y grows downwards);
- a tag's score is the share of its images judged correct; overall = the mean over tags.

The official detector (Mask2Former through mmdet, CLIP ViT-L/14 for colours) cannot be installed here; any
`Detector` (image -> labelled boxes with scores and optional masks) and `ColourClassifier` plug in.
`WorldDetector` is the miniature world's: its judge's shape finder, the shape as the class, its own colour."""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from .harness import BenchmarkDataError, generate_sets, rank_world, read_jsonl

THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Box:
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    mask: np.ndarray | None = None
    colour: str | None = None  # a detector that knows colours may say so (WorldDetector); else the classifier decides


class Detector(Protocol):
    def __call__(self, image: Image.Image) -> list[Box]: ...


ColourClassifier = Callable[[Image.Image, Box, Sequence[str]], str]


def read_metadata(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        path = path / "evaluation_metadata.jsonl"
    if not path.is_file():
        raise BenchmarkDataError(f"GenEval: {path} is missing; the official repository has it as "
                                 "prompts/evaluation_metadata.jsonl")
    metas = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            ok = isinstance(m["prompt"], str) and isinstance(m["tag"], str) and all(
                isinstance(r["class"], str) and int(r["count"]) >= 1 for r in m["include"] + m.get("exclude", []))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise BenchmarkDataError(f"{path}:{n}: not a GenEval record (tag, prompt, include with class and count)")
        for i, r in enumerate(m["include"]):
            if "position" in r and (r["position"][0] not in RELATIONS or not 0 <= r["position"][1] < i):
                raise BenchmarkDataError(f"{path}:{n}: position {r['position']} must be [relation, an earlier include]")
        metas.append(m)
    return metas


def sample_path(out: Path, i: int, k: int) -> Path:
    """Image k of prompt i in GenEval's layout."""
    return out / f"{i:05d}" / "samples" / f"{k:04d}.png"


def generate(pipe, metas: list[dict[str, Any]], out: Path, *, n: int = 4, seed: int = 0, limit: int | None = None,
             batch: int = 64, progress: bool = True, on_batch: Any = None, **options: Any) -> list[Path]:
    """This rank's share of the prompts, each into its folder, in batches of about `batch` images across
    prompts; image k of prompt i is sampled with generator (seed, i * n + k) (harness.generate_sets).
    Folders already holding n samples are skipped (a killed run redoes at most the batch in flight).
    `options`: generate_batch's (cfg_weight, temperature, ...). Returns this rank's folders."""
    rank, world = rank_world()
    metas = metas[:limit] if limit else metas
    folder = [out / f"{i:05d}" for i in range(len(metas))]

    def done(i: int) -> bool:
        return all(sample_path(out, i, k).is_file() for k in range(n))

    def save(i: int, images: list[Image.Image]) -> None:
        samples = folder[i] / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        (folder[i] / "metadata.jsonl").write_text(json.dumps(metas[i]) + "\n")
        for k, img in enumerate(images):
            tmp = samples / f".{k:04d}.png"
            img.save(tmp)
            tmp.replace(samples / f"{k:04d}.png")  # a sample file exists only once complete

    generate_sets(pipe, [m["prompt"] for m in metas], n, done, save, seed=seed, batch=batch, name="geneval",
                  progress=progress, on_batch=on_batch, **options)
    return [folder[i] for i in range(len(metas)) if i % world == rank]


def relative_position(a: Box, b: Box) -> set[str]:
    """The relations of a to b, GenEval's way (see the module docstring)."""
    ba, bb = np.asarray(a.box, dtype=np.float64).reshape(2, 2), np.asarray(b.box, dtype=np.float64).reshape(2, 2)
    offset = ba.mean(0) - bb.mean(0)
    dims = np.abs(np.diff(ba, axis=0))[0] + np.abs(np.diff(bb, axis=0))[0]
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def judge(image: Image.Image, meta: dict[str, Any], detector: Detector,
          colour_of: ColourClassifier | None = None) -> tuple[bool, str]:
    """One image against its metadata: (correct, the reasons it is not)."""
    threshold = COUNTING_THRESHOLD if meta["tag"] == "counting" else THRESHOLD
    found: dict[str, list[Box]] = defaultdict(list)
    for b in sorted(detector(image), key=lambda b: -b.score):
        if b.score > threshold and len(found[b.label]) < MAX_OBJECTS:
            found[b.label].append(b)
    colours = sorted({r["color"] for r in meta["include"] if "color" in r})
    correct, reasons, groups = True, [], []
    for req in meta["include"]:
        cls, count = req["class"], int(req["count"])
        objs = found.get(cls, [])[:count]
        matched = len(objs) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(objs)}")
        elif "color" in req:
            seen = [b.colour if b.colour is not None else _classify(colour_of, image, b, colours) for b in objs]
            if seen.count(req["color"]) < count:
                matched = False
                n = seen.count(req["color"])
                reasons.append(f"expected {req['color']} {cls}>={count}, found {n} {req['color']}")
        if matched and "position" in req:
            rel, j = req["position"]
            if groups[j] is None:
                matched = False
                reasons.append(f"no target for {cls} to be {rel}")
            elif not all(rel in relative_position(o, t) for o in objs for t in groups[j]):
                matched = False
                reasons.append(f"expected {cls} {rel} target")
        correct &= matched
        groups.append(objs if matched else None)
    for req in meta.get("exclude", []):
        if len(found.get(req["class"], [])) >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(found[req['class']])}")
    return correct, "\n".join(reasons)


def _classify(colour_of: ColourClassifier | None, image: Image.Image, b: Box, colours: list[str]) -> str:
    if colour_of is None:
        raise ValueError("GenEval: a colour requirement needs a colour classifier (or a detector that gives colours)")
    return colour_of(image, b, colours)


def score_folder(out: Path, detector: Detector, colour_of: ColourClassifier | None = None) -> dict[str, Any]:
    """Judge every sample under `out` (the official layout); per-image rows in out/results.jsonl."""
    rows = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_lines = read_jsonl(folder / "metadata.jsonl")
        if not meta_lines:
            raise BenchmarkDataError(f"GenEval: {folder / 'metadata.jsonl'} is missing or empty")
        meta = meta_lines[0]
        for png in sorted((folder / "samples").glob("*.png")):
            ok, why = judge(Image.open(png).convert("RGB"), meta, detector, colour_of)
            rows.append({"filename": str(png.relative_to(out)), "tag": meta["tag"], "prompt": meta["prompt"],
                         "correct": ok, "reason": why})
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_tag[r["tag"]].append(r["correct"])
    tags = {t: sum(v) / len(v) for t, v in sorted(by_tag.items())}
    overall = sum(tags.values()) / len(tags) if tags else 0.0
    return {"tags": tags, "overall": overall, "images": len(rows), "headline": overall}


class WorldDetector:
    """The miniature world's judge as a GenEval detector: each shape it finds is a box labelled with the
    shape's name, score 1, its mask, and its colour (so no classifier is needed)."""

    def __call__(self, image: Image.Image) -> list[Box]:
        from ..world.judge import detect_regions

        return world_boxes(detect_regions(image))


def world_boxes(regions) -> list[Box]:
    """world.judge.detect_regions' output as GenEval boxes (shape as the class, score 1, the judge's colour)."""
    return [Box(d.shape, box, 1.0, mask, d.colour) for d, box, mask in regions]


def world_metadata(prompt) -> dict[str, Any]:
    """A world test prompt (januskit.world.prompts.Prompt, GenEval's six categories) as a GenEval record."""
    def inc(colour: str | None, shape: str, count: int = 1) -> dict[str, Any]:
        return {"class": shape, "count": count} | ({"color": colour} if colour else {})

    cat, items = prompt.category, prompt.items
    m: dict[str, Any] = {"tag": cat, "prompt": prompt.text}
    if cat in ("single_object", "colors"):
        m["include"] = [inc(*items[0])]
    elif cat in ("two_object", "color_attr"):
        m["include"] = [inc(*items[0]), inc(*items[1])]
    elif cat == "counting":
        m["include"] = [inc(*items[0], count=prompt.count)]
        m["exclude"] = [{"class": items[0][1], "count": prompt.count + 1}]
    elif cat == "position":  # "A <relation> B": B first, then A relative to it
        m["include"] = [inc(*items[1]), inc(*items[0]) | {"position": [prompt.relation, 0]}]
    else:
        raise ValueError(f"GenEval has no category {cat!r}")
    return m


def write_world_benchmarks(split_dir: Path, out: Path) -> dict[str, Path]:
    """The world's test split in two benchmarks' own formats, for `januskit eval geneval --detector world`
    and `januskit eval pope`: `evaluation_metadata.jsonl` (its six GenEval categories) and
    `coco_pope_random.json` (its POPE questions; images referenced relative to the split folder)."""
    from ..world.dataset import read_prompts

    out.mkdir(parents=True, exist_ok=True)
    meta = out / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(world_metadata(p)) + "\n" for p, _ in read_prompts(split_dir / "prompts.jsonl")))
    rows = [r for r in read_jsonl(split_dir / "questions.jsonl") if r["qtype"] == "pope"]
    pope = out / "coco_pope_random.json"
    pope.write_text("".join(json.dumps({"question_id": i + 1, "image": r["image"], "text": r["question"],
                                        "label": r["answer"]}) + "\n" for i, r in enumerate(rows)))
    return {"geneval": meta, "pope": pope}
