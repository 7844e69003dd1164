"""The conditions of image-to-image guidance (InstructPix2Pix's two-condition classifier-free guidance).

An edit prompt (`Processor.edit_prompt`) carries two conditions: the source images (their blocks:
<begin_of_image>, the image slots, <end_of_image>) and the text (every other position). Guidance uses
three rows per image: full (both), image-only (text dropped) and unconditional (both dropped; the same row
as text-to-image's unconditional one), combined as
    out = u + s_img * (img - u) + s_txt * (full - img)
on the logits (Janus) or the velocity (JanusFlow). BOS and the final <begin_of_image> are never dropped.
Janus replaces dropped positions by pad (as its text-to-image unconditional row does), JanusFlow hides
them from attention (as its own does); training drops the same positions (train.data.encode)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_CFG_IMAGE = 1.5  # InstructPix2Pix's image guidance weight

# The three rows of an edit, in sampling order: (keep text, keep image).
ROWS = {"full": (True, True), "image": (False, True), "none": (False, False)}


def dropped_positions(ids: Sequence[int], *, image_id: int, boi_id: int, eoi_id: int, keep_text: bool,
                      keep_image: bool) -> torch.Tensor:
    """(L,) bool: the positions of an edit prompt a condition row drops."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    slot = t == image_id
    block = slot.clone()  # an image's slots with the <begin_of_image> before and <end_of_image> after them
    block[:-1] |= (t[:-1] == boi_id) & slot[1:]
    block[1:] |= (t[1:] == eoi_id) & slot[:-1]
    drop = torch.zeros_like(slot)
    if not keep_image:
        drop |= block
    if not keep_text:
        drop |= ~block
    if len(t):
        drop[0] = drop[-1] = False  # BOS and the final <begin_of_image>
    return drop


def guide(full: torch.Tensor, image: torch.Tensor, none: torch.Tensor, s_txt: torch.Tensor,
          s_img: torch.Tensor) -> torch.Tensor:
    """Two-condition guidance of logits or velocities (the weights broadcast against them)."""
    return none + s_img * (image - none) + s_txt * (full - image)


@dataclass
class EditInputs:
    """The source side of image-to-image rows: per prompt its sources' pixels (k, 3, S, S), in the order of
    the prompt's image blocks; the image guidance weight(s) s_img; the prompt's special ids. `via`:
    "understanding" (the pixels are the understanding encoder's input) or "vq" (Janus: generation pixels
    in [-1, 1], entering as their VQ tokens through gen_embed -> gen_aligner)."""

    sources: Sequence[torch.Tensor]
    cfg_image: float | Sequence[float]
    image_id: int
    boi_id: int
    eoi_id: int
    via: str = "understanding"
