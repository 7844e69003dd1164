"""Rewards for reinforcement learning on generated images: plain callables `(prompt, image) -> float`.

`prompt` is a `RewardPrompt`: the prompt text (a `str`, so any function of a string works) that may also
carry `meta`, what the prompt source knows about it (the miniature world's structured prompt, which its
judge needs). `image` is a PIL image. Rewards are looked up by name in `REWARDS`, or by import path
("package.module:function" or "...:Class", called with the options given), and combined by weights:

    [rl.rewards]
    world = 1.0                                   # the miniature world's judge: 1 if the image obeys the prompt
    "vqa" = {weight = 0.5, model = "path/to/januskit-model"}    # chat as a judge: P(yes)
    "mypkg.rewards:aesthetic" = {weight = 0.2, scale = 2.0}     # a user's function (options as keywords)

Built-in rewards:
- `world`: the miniature world's judge with GenEval's rules (januskit.world.judge), exact and cheap.
- `world_partial`: the share of the prompt's objects the judge finds with the named colour and shape (a
  denser signal; counts and relations still need the whole prompt).
- `world_edit`: for the world's edit tasks (`prompts = "world_edit"`): 1 if the judge finds exactly the
  target scene (every object's shape, colour and cell: the edit done and nothing else changed).
- `world_edit_partial`: the same, denser: 1 for the exact target, else half the share of target and found
  objects that match (shape, colour and cell; matched / the larger of the two counts).
- `classifier`: a classifier's probability of a named class: a torch.export file (.pt2) or an importable
  `torch.nn.Module` factory mapping (1, 3, S, S) pixels in [0, 1] to logits, and the class index or name.
- `vqa`: a januskit model's chat as a VQA judge: the probability of "yes" (against "no") as the next token
  after a question about the image, by default "Does this image show <prompt>? Answer yes or no."
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


class RewardPrompt(str):
    """A prompt's text, with `meta`: what the prompt source knows about it (may be empty)."""

    meta: dict[str, Any]

    def __new__(cls, text: str, meta: Mapping[str, Any] | None = None) -> "RewardPrompt":
        s = super().__new__(cls, text)
        s.meta = dict(meta or {})
        return s


Reward = Callable[[RewardPrompt, Image.Image], float]


def _world_prompt(prompt: RewardPrompt, who: str):
    from ...world.prompts import Prompt

    if "prompt" not in prompt.meta:
        raise ValueError(f"reward {who!r} needs the miniature world's structured prompt (meta['prompt']) for "
                         f"{str(prompt)!r}: use `prompts = \"world\"` or a prompts file whose lines carry \"meta\"")
    return Prompt.from_json(prompt.meta["prompt"])


def world_judge() -> Reward:
    """1.0 when the miniature world's judge finds the image obeys the prompt (GenEval's rules), else 0.0."""
    from ...world.judge import detect, score

    def reward(prompt: RewardPrompt, image: Image.Image) -> float:
        return float(score(_world_prompt(prompt, "world"), detect(image)))
    return reward


def world_partial() -> Reward:
    """The share of the prompt's named objects found with their colour (when named) and shape; 1.0 only if
    the whole prompt also holds (counts, relations and no extra objects are the judge's rules)."""
    from ...world.judge import detect, score

    def reward(prompt: RewardPrompt, image: Image.Image) -> float:
        p = _world_prompt(prompt, "world_partial")
        found = detect(image)
        if score(p, found):
            return 1.0
        items = p.items or ()
        if not items:
            return 0.0
        hit = sum(any(d.shape == s and (c is None or d.colour == c) for d in found) for c, s in items)
        return 0.5 * hit / len(items)  # below any image that obeys the prompt
    return reward


def _world_edit(prompt: RewardPrompt, who: str):
    from ...world.edits import Edit

    if "edit" not in prompt.meta:
        raise ValueError(f"reward {who!r} needs the miniature world's edit (meta['edit']) for {str(prompt)!r}: use "
                         "`prompts = \"world_edit\"`")
    return Edit.from_json(prompt.meta["edit"])


def world_edit() -> Reward:
    """1.0 when the judge finds exactly the edit's target scene, else 0.0 (world.edits.score_edit)."""
    from ...world.edits import score_edit
    from ...world.judge import detect

    def reward(prompt: RewardPrompt, image: Image.Image) -> float:
        return float(score_edit(detect(image), _world_edit(prompt, "world_edit").target))
    return reward


def world_edit_partial() -> Reward:
    """1.0 for the exact target scene; else 0.5 x (objects matching the target in shape, colour and cell) /
    (the larger of the target's and the image's object counts)."""
    from collections import Counter

    from ...world.edits import scene_key
    from ...world.judge import detect

    def reward(prompt: RewardPrompt, image: Image.Image) -> float:
        want = Counter(scene_key(_world_edit(prompt, "world_edit_partial").target))
        got = Counter(scene_key(detect(image)))
        if got == want:
            return 1.0
        return 0.5 * sum((want & got).values()) / max(sum(want.values()), sum(got.values()), 1)
    return reward


def classifier(model: str, label: int | str, classes: Sequence[str] | None = None, size: int | None = None) -> Reward:
    """P(label) under a classifier: `model` is a torch.export program file (.pt2, torch.export.save) or
    "module:factory" returning an nn.Module; it takes (1, 3, S, S) float pixels in [0, 1] (resized to `size`
    if given; an exported program wants the size it was exported with) and returns logits. `label`: a class
    index, or a name looked up in `classes`."""
    if isinstance(label, str):
        if not classes or label not in classes:
            raise ValueError(f"classifier reward: label {label!r} is not in classes {list(classes or [])}")
        index = list(classes).index(label)
    else:
        index = int(label)
    if ":" in model:
        net = _import(model, "classifier model")()
        net.eval()
    elif model.endswith(".pt2"):
        net = torch.export.load(model).module()  # no .eval() on an exported program: its graph is fixed
    else:
        raise ValueError(f"classifier reward: model {model!r} must be a torch.export file (.pt2) or 'module:factory'")

    @torch.inference_mode()
    def reward(prompt: RewardPrompt, image: Image.Image) -> float:
        img = image.convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        logits = net(x).float().reshape(-1)
        if not 0 <= index < logits.numel():
            raise ValueError(f"classifier reward: class index {index} but the model gives {logits.numel()} logits")
        return float(logits.softmax(-1)[index])
    return reward


def vqa(model: Any, question: str = "Does this image show {prompt}? Answer yes or no.", yes: str = "yes",
        no: str = "no", dtype: str = "float32") -> Reward:
    """P(yes) / (P(yes) + P(no)) for the first answer token after `question` (with {prompt} filled in) about
    the image, each word's probability summed over its one-token spellings ("yes", " yes", "Yes", " Yes": the
    answer follows the role tag, so tokenizers usually pick the spaced one). `model`: a model folder, or a
    loaded januskit Pipeline."""
    if isinstance(model, str):
        import januskit

        model = januskit.load(model, dtype=dtype)
    pipe = model
    tok = pipe.processor.tokenizer
    ids: dict[str, list[int]] = {}
    for word in (yes, no):
        spellings = {s for w in (word, word.capitalize()) for s in (w, " " + w)}
        ids[word] = sorted({e[0] for e in (tok.encode(s, add_bos=False) for s in spellings) if len(e) == 1})
        if not ids[word]:
            raise ValueError(f"vqa reward: no spelling of {word!r} is one token in this model's tokenizer")
    both = ids[yes] + ids[no]

    def reward(prompt: RewardPrompt, image: Image.Image) -> float:
        p = pipe.answer_probabilities(question.format(prompt=str(prompt)), [image], both)
        p_yes, p_no = p[:len(ids[yes])].sum(), p[len(ids[yes]):].sum()
        return float(p_yes / (p_yes + p_no).clamp(min=1e-12))
    return reward


REWARDS: dict[str, Callable[..., Reward]] = {"world": world_judge, "world_partial": world_partial,
                                               "world_edit": world_edit, "world_edit_partial": world_edit_partial,
                                               "classifier": classifier, "vqa": vqa}


def _import(path: str, what: str) -> Any:
    mod, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{what} {path!r} cannot be imported ({e})") from None


def make_reward(name: str, **options: Any) -> Reward:
    """A reward by registry name, or by import path "module:function" (a reward itself when given no
    options, else a factory called with them)."""
    if name in REWARDS:
        return REWARDS[name](**options)
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; built-in rewards: {', '.join(REWARDS)}, or an import path "
                         f"'module:function'")
    f = _import(name, "reward")
    if not callable(f):
        raise ValueError(f"reward {name!r} is not callable")
    return f(**options) if options else f


@dataclass(frozen=True)
class RewardSet:
    """Named rewards and their weights; `__call__` returns every reward's values and the weighted sum."""

    rewards: tuple[tuple[str, float, Reward], ...]

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> "RewardSet":
        """{name: weight} or {name: {weight = w, option = ...}} (the [rl.rewards] table)."""
        if not table:
            raise ValueError("[rl] rewards: at least one reward is needed, e.g. rewards = {world = 1.0}")
        out = []
        for name, spec in table.items():
            opts = dict(spec) if isinstance(spec, Mapping) else {"weight": spec}
            try:
                w = float(opts.pop("weight", 1.0))
            except (TypeError, ValueError):
                raise ValueError(f"[rl] rewards.{name}: weight must be a number") from None
            if not np.isfinite(w):
                raise ValueError(f"[rl] rewards.{name}: weight must be finite, got {w}")
            out.append((name, w, make_reward(name, **opts)))
        return cls(tuple(out))

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.rewards]

    def __call__(self, prompts: Sequence[RewardPrompt], images: Sequence[Image.Image]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(n,) weighted totals and {name: (n,) values}, float64."""
        each = {}
        for name, _, f in self.rewards:
            vals = []
            for p, img in zip(prompts, images):
                v = float(f(p, img))
                if not np.isfinite(v):
                    raise ValueError(f"reward {name!r} returned {v} for prompt {str(p)!r}")
                vals.append(v)
            each[name] = torch.tensor(vals, dtype=torch.float64)
        total = sum(w * each[n] for n, w, _ in self.rewards)
        return total, each
