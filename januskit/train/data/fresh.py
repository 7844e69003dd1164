"""The miniature world as an endless training source: a new scene rendered for every sample.

A render costs well under a millisecond, so no sample has to repeat: instead of reading the fixed
train split, `WorldSource` draws sample `i` of a kind from its own generator, seeded by (seed, kind, i),
with the very draws `januskit.world.dataset.write_split` makes for the train split (`generation_pair`,
`understanding_item`, `text_item`: the same caption kinds, questions and documents, held-out
combinations excluded), and hands it on as the same record a manifest would hold, through the same
validation (`records.parse_record`) and the same encoder. Rank r of w takes samples r, r+w, r+2w, ...,
so the stream does not depend on how many processes share it, and the position is one integer:
`state_dict()` / `load_state_dict()` resume it exactly.

Generation images are rendered, not read, so their VQ ids are computed on the fly by the frozen VQ
(`TrainData` calls `fill_vq_ids` with the model's `vq_tokenizer`, in the trainer's thread). To
precompute them instead, write a fixed split (`write_world(..., captions=...)`), cache its ids once
(`vq_cache.cache_vq_ids`) and read generation from that manifest while the other kinds stay fresh
(`kinds = ["understanding", "text"]`, `generation = ".../generation-vq.jsonl"`); docs/miniature-world.md
gives the costs of both.

    [data]
    builder = "januskit.train.data.fresh:build"
    captions = "v2"          # the train split's caption mix: "v1" (default), "v2" or a table of kind weights
    kinds = ["understanding", "text", "generation"]   # the kinds drawn fresh (the default; add "edit" for edits)
    seed = 0                 # the world's seed (default: the run's seed)
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

from ...world.captions import CaptionMix, caption_mix
from ...world.dataset import HeldOut, conversation, generation_pair, held_out, text_item, understanding_item
from ...world.edits import TASKS as EDIT_TASKS
from ...world.edits import draw_edit, held_out_edits
from ...world.prompts import scene_to_json
from ...world.render import render
from .loader import TrainData
from .loader import build as build_loader
from .records import KIND_CODE, DataError, Sample, parse_record

log = logging.getLogger(__name__)

_STREAM = 7919  # keeps these streams apart from write_world's (seed, split) generators
WORLD_KINDS = ("understanding", "text", "generation", "edit")  # what the world draws
DEFAULT_KINDS = WORLD_KINDS[:3]  # edit is asked for by name (kinds = [..., "edit"] and a fourth ratio weight)


def _check_kinds(kinds: Sequence[str], what: str) -> None:
    bad = [k for k in kinds if k not in WORLD_KINDS]
    if bad:
        raise ValueError(f"{what}: unknown kind(s) {bad}; the world draws {', '.join(WORLD_KINDS)}")


def _mix_key(captions: str | dict | CaptionMix) -> Any:
    """The caption mix as plain values (it must match on resume)."""
    if isinstance(captions, str) and captions == "v1":
        return "v1"
    return json.loads(json.dumps(caption_mix(captions).to_json()))


class WorldSource:
    """Endless samples of one kind, each from a freshly drawn and rendered scene (see the module doc)."""

    def __init__(self, kind: str, *, seed: int = 0, captions: str | dict | CaptionMix = "v1", turns: int = 3,
                 question_first: bool = False, held: HeldOut | None = None, rank: int = 0, world_size: int = 1,
                 on_error: str = "raise",
                 transform: Callable[[Sample], Any] | None = None) -> None:
        _check_kinds([kind], "WorldSource")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.kind, self.seed, self.turns, self.rank, self.world_size = kind, seed, turns, rank, world_size
        self.question_first = bool(question_first)
        self.captions, self._mix = captions, _mix_key(captions)  # validates the mix now, not at the first sample
        self.held = held if held is not None else held_out()
        self.edit_held = held_out_edits()
        self.on_error, self.transform = on_error, transform
        self.index = rank  # global index of this rank's next sample
        self.skipped: Counter[str] = Counter()

    def item(self, i: int) -> tuple[dict, tuple]:
        """Sample `i` as the record write_split would write (plus its scene and, for generation, its
        structured prompt), and the scene to render (empty for text documents)."""
        rng = np.random.default_rng([self.seed, _STREAM, KIND_CODE[self.kind], i])
        if self.kind == "generation":
            p, s = generation_pair(rng, self.held, "train", self.captions)
            return {"kind": "generation", "caption": p.text, "image": "0.png", "category": p.category,
                    "scene": scene_to_json(s), "prompt": p.to_json()}, s
        if self.kind == "understanding":
            s, qs = understanding_item(rng, self.held, "train", self.turns)
            return conversation(qs, "0.png", self.question_first) | {"scene": scene_to_json(s)}, s
        if self.kind == "edit":  # the six tasks in turn, as write_split's edit.jsonl
            e = draw_edit(rng, EDIT_TASKS[i % len(EDIT_TASKS)], self.edit_held, world_held=self.held)
            return {"kind": "edit", "instruction": e.instruction, "images": ["0.png"], "target": "1.png",
                    "task": e.task}, (e.source, e.target)
        return {"kind": "text", "text": text_item(rng, self.held, "train")}, ()

    def sample(self, i: int) -> Sample:
        """Sample `i`, validated like a manifest line, its image(s) rendered (not yet encoded)."""
        rec, scene = self.item(i)
        if self.kind == "edit":
            source, target = scene
            fetch = lambda refs, name: [render(target)] if name == "target" else [render(source)]  # noqa: E731
        else:
            fetch = lambda refs, name: [render(scene)] if refs or name == "image" else []  # noqa: E731
        return parse_record(rec, f"world-{self.kind}:{i}", fetch, self.kind)

    def __iter__(self) -> "WorldSource":
        return self

    def __next__(self) -> Any:
        while True:
            i = self.index
            self.index += self.world_size  # advanced first: state_dict() is the position after this sample
            try:
                s = self.sample(i)
                return self.transform(s) if self.transform is not None else s
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self.skipped[e.reason] += 1
                n = sum(self.skipped.values())
                if n <= 20 or n % 1000 == 0:
                    log.warning("skipping bad sample (%d skipped so far: %s): %s", n, dict(self.skipped), e)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "skipped": dict(self.skipped), "kind": self.kind, "seed": self.seed,
                "captions": self._mix, "turns": self.turns, "question_first": self.question_first, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        now = self.state_dict()
        st = {"question_first": False, **st}  # checkpoints from before the option drew image-first conversations
        for k in ("kind", "seed", "captions", "turns", "question_first", "rank", "world_size"):
            if st[k] != now[k]:
                raise ValueError(f"world-{self.kind}: cannot resume: {k} was {st[k]!r} in the checkpoint, now "
                                 f"{now[k]!r} (the samples would differ)")
        self.index, self.skipped = int(st["index"]), Counter(st["skipped"])

    def reshard(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's position among `world` ranks from a run with len(states) ranks: every sample below the
        old ranks' furthest taken index is passed over (a few never drawn, none drawn twice); rank r goes on
        at the next index + r with stride `world`. The skip counts go to rank 0."""
        old = len(states)
        base = max(int(st["index"]) for st in states) - old + 1  # one past the furthest index any rank took
        skipped = sum((Counter(st["skipped"]) for st in states), Counter()) if rank == 0 else Counter()
        return {**states[0], "index": base + rank, "skipped": dict(skipped), "rank": rank, "world_size": world}


def build(ctx: Any, *, kinds: Sequence[str] = DEFAULT_KINDS, seed: int | None = None,
          captions: str | dict | CaptionMix = "v1", turns: int = 3, question_first: bool = False,
          **options: Any) -> TrainData:
    """Data builder for `[data] builder = "januskit.train.data.fresh:build"` (ctx: train.config.DataContext).
    `kinds`: the kinds drawn fresh from the world; any other kind the stage's ratio needs comes from files,
    given as for januskit.train.data.loader:build (`generation = "world/train/generation-vq.jsonl"`).
    `seed`: the world's seed (default: the run's); `captions`: the caption mix of generation samples
    ("v1", "v2" or a table, januskit.world.captions); `turns`: questions per understanding conversation;
    `question_first`: the first question before the image (januskit.world.dataset.conversation).
    Every other option (cfg_drop, short_caption_p, edit, edit_drop_*, too_long, on_error, prefetch, ...)
    is the loader's."""
    _check_kinds(kinds, "[data] kinds")
    held = held_out()
    world_seed = ctx.seed if seed is None else int(seed)
    if not isinstance(question_first, bool):
        raise ValueError(f"[data] question_first must be true or false, got {question_first!r}")
    made = {k: partial(WorldSource, k, seed=world_seed, captions=captions, turns=turns, question_first=question_first,
                       held=held) for k in kinds}
    return build_loader(ctx, builtin=made, **options)
