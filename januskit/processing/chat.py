"""Conversations -> token ids, image slots, and left-padded batches (official `VLChatProcessor`).

Format ("deepseek" template, roles taken verbatim): optional system prompt + "\\n\\n", then per
message `role: content` followed by "\\n\\n" after user turns and the EOS string after assistant turns;
an empty final assistant message renders as `role:`. Janus-1.3B / JanusFlow roles are "User" /
"Assistant", Janus-Pro roles are the single tokens "<|User|>" / "<|Assistant|>".
Each "<image_placeholder>" becomes <begin_of_image> + n x <image_placeholder> + <end_of_image>.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import MAX_IMAGE_SIZE, Fields, folder_file, read_json_object
from .image import ImageTransform
from .tokenizer import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, TextTokenizer

# Where user_turn puts images given without markers: before the text (the official examples' layout) or after it
# (a model trained with the question first, so the image tokens are read knowing what is asked: the miniature
# world's `question_first` recipe, docs/miniature-world.md). processor_config.json's "image_placement" names it.
IMAGE_PLACEMENTS = ("before", "after")
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural language.")


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str  # may contain "<image_placeholder>" markers, one per image, in order
    images: Sequence = field(default_factory=list)  # PIL images, paths, bytes or data URIs


@dataclass
class EncodedChat:
    ids: list[int]
    images: list[torch.Tensor]  # preprocessed (3, S, S) each


@dataclass
class ChatBatch:
    input_ids: torch.Tensor  # (B, T) left-padded
    valid: torch.Tensor  # (B, T) bool, False on padding
    image_mask: torch.Tensor  # (B, T) bool, True on image-embedding slots
    pixel_values: torch.Tensor | None  # (N, 3, S, S), images of all rows in order, or None

    @property
    def padded(self) -> bool:
        return not bool(self.valid.all())


def read_processor_files(folder: str | Path, image_size: int) -> tuple[ImageTransform, str, str]:
    """The image transform of preprocessor_config.json, and the system prompt and image placement of
    processor_config.json (all optional), every field type-checked: a ConfigError names the file and field.
    `image_size` is the vision encoder's, which the preprocessor's must equal (other sizes do not fit its grid)."""
    folder = Path(folder)
    cfg: dict = {}
    if (path := folder / "preprocessor_config.json").is_file():
        pre = Fields(read_json_object(path), path)
        size = pre.integer("image_size", image_size, hi=MAX_IMAGE_SIZE)
        if size != image_size:
            pre.fail("image_size", f"{size} does not match the vision encoder's image_size {image_size}")
        cfg = {"image_size": size, "min_size": pre.integer("min_size", 14, hi=size),
               "image_mean": pre.numbers("image_mean", 3, (0.5, 0.5, 0.5), lo=-1e6, hi=1e6),
               "image_std": pre.numbers("image_std", 3, (0.5, 0.5, 0.5), lo=0.0, hi=1e6, lo_open=True),
               "rescale_factor": pre.number("rescale_factor", 1 / 255, hi=1.0),
               "do_normalize": pre.flag("do_normalize", True)}
    system, placement = SYSTEM_PROMPT, IMAGE_PLACEMENTS[0]
    if (path := folder / "processor_config.json").is_file():
        proc = Fields(read_json_object(path), path)
        system = proc.string("system_prompt", SYSTEM_PROMPT)
        placement = proc.string("image_placement", placement)
        if placement not in IMAGE_PLACEMENTS:
            proc.fail("image_placement", f"{placement!r} is not one of {', '.join(IMAGE_PLACEMENTS)}")
    return ImageTransform.from_preprocessor_config(cfg, image_size), system, placement


class Processor:
    def __init__(self, tokenizer: TextTokenizer, transform: ImageTransform, n_image_tokens: int,
                 pro_format: bool | None = None, system_prompt: str = SYSTEM_PROMPT,
                 image_placement: str = IMAGE_PLACEMENTS[0]) -> None:
        if image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"image_placement {image_placement!r} is not one of {', '.join(IMAGE_PLACEMENTS)}")
        self.tokenizer = tokenizer
        self.image_placement = image_placement
        # Default system prompt of understanding chats: the official one unless the checkpoint's
        # processor_config.json names another (the official VLChatProcessor takes the same key).
        self.system_prompt = system_prompt
        self.transform = transform
        self.n_image_tokens = n_image_tokens
        # An edit's source block length when sources enter as VQ tokens (a model trained with
        # [data] edit_source = "vq"); None: through the understanding encoder, n_image_tokens slots.
        self.edit_source_slots: int | None = None
        # Understanding-encoder sources after the instruction ([data] edit_layout = "sources_last"), so that
        # source slot i sits a fixed distance before target token i; VQ sources are always after it.
        self.edit_sources_last = False
        pro = tokenizer.is_pro_format if pro_format is None else pro_format
        self.roles = ("<|User|>", "<|Assistant|>") if pro else ("User", "Assistant")

    @classmethod
    def from_folder(cls, folder: str | Path, image_size: int, n_image_tokens: int) -> "Processor":
        folder = Path(folder)
        tok = TextTokenizer.from_file(folder_file(folder, "tokenizer.json"))
        transform, system, placement = read_processor_files(folder, image_size)
        return cls(tok, transform, n_image_tokens, system_prompt=system, image_placement=placement)

    # -- text ---------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], system_prompt: str | None = None) -> str:
        """The prompt string; a trailing empty assistant turn is added if the last turn is the user's.
        `system_prompt` None means the processor's own."""
        system_prompt = self.system_prompt if system_prompt is None else system_prompt
        msgs = list(messages)
        if not msgs or msgs[-1].role != "assistant":
            msgs.append(Message("assistant", ""))
        out = system_prompt + "\n\n" if system_prompt else ""
        for i, m in enumerate(msgs):
            if m.role not in ("user", "assistant"):
                raise ValueError(f"message {i}: role {m.role!r} is not 'user' or 'assistant'")
            if (m.role == "user") != (i % 2 == 0):
                raise ValueError(f"message {i}: turns must alternate user/assistant, starting with user")
            role = self.roles[0] if m.role == "user" else self.roles[1]
            content = m.content.strip()
            if content:
                out += f"{role}: {content}" + ("\n\n" if i % 2 == 0 else EOS_TOKEN)
            else:
                out += f"{role}:"
        return out.strip()

    def generation_prompt(self, prompt: str) -> list[int]:
        """Text-to-image prompt ids: empty system prompt, user turn, `Assistant:`, <begin_of_image>."""
        text = self.render([Message("user", prompt)], system_prompt="")
        return self.tokenizer.encode(text) + [self.tokenizer.boi_id]

    # -- understanding ------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Message], system_prompt: str | None = None) -> EncodedChat:
        images = [img for m in messages for img in m.images]
        n_marks = sum(m.content.count(IMAGE_TOKEN) for m in messages)
        if n_marks != len(images):
            raise ValueError(f"the conversation has {n_marks} {IMAGE_TOKEN} marker(s) but {len(images)} image(s)")
        ids = self._expand_images(self.tokenizer.encode(self.render(messages, system_prompt)))
        return EncodedChat(ids, [self.transform(img) for img in images])

    def _expand_images(self, ids: Sequence[int], slots: int | None = None) -> list[int]:
        """Each image placeholder -> <begin_of_image>, `slots` (default n_image_tokens) image slots, <end_of_image>."""
        tok = self.tokenizer
        n = self.n_image_tokens if slots is None else slots
        out: list[int] = []
        for t in ids:
            if t == tok.image_id:
                out += [tok.boi_id] + [tok.image_id] * n + [tok.eoi_id]
            else:
                out.append(t)
        return out

    def edit_prompt(self, instruction: str, n_images: int) -> list[int]:
        """Image-to-image prompt ids: like `generation_prompt` (empty system prompt, ends with
        <begin_of_image>), the user turn holding `n_images` source images (as in a chat: their slots are
        filled by the understanding encoder) and then the instruction; with `edit_source_slots` set, the
        instruction and then the sources as VQ tokens, so the last source ends a fixed number of tokens
        before the target starts (copying is a constant relative offset); with `edit_sources_last`, the
        instruction and then the understanding sources, for the same reason. Shared by training and sampling."""
        if n_images < 1:
            raise ValueError(f"an edit needs at least one source image, got {n_images}")
        if IMAGE_TOKEN in instruction:
            raise ValueError(f"the instruction must not contain {IMAGE_TOKEN}: the source images are given apart")
        if self.edit_source_slots is None and not self.edit_sources_last:
            turn = f"{IMAGE_TOKEN}\n" * n_images + instruction
        else:  # sources after the instruction: source slot i sits a fixed distance before target token i
            turn = instruction + f"\n{IMAGE_TOKEN}" * n_images
        text = self.render([Message("user", turn)], system_prompt="")
        return self._expand_images(self.tokenizer.encode(text), self.edit_source_slots) + [self.tokenizer.boi_id]

    @property
    def edit_source(self) -> str:
        """"understanding" or "vq": how edit prompts' source blocks are filled (checkpoint.official_config)."""
        return "understanding" if self.edit_source_slots is None else "vq"

    def user_turn(self, prompt: str, images: Sequence = ()) -> list[Message]:
        """One user message; images without markers in the text are placed before it (or after it, by the
        processor's image_placement), one per line."""
        images = list(images)
        if images and IMAGE_TOKEN not in prompt:
            marks = "".join(f"{IMAGE_TOKEN}\n" for _ in images)
            prompt = marks + prompt if self.image_placement == "before" else f"{prompt}\n{marks}".rstrip("\n")
        return [Message("user", prompt, images)]

    def batch(self, chats: Sequence[EncodedChat]) -> ChatBatch:
        T = max(len(c.ids) for c in chats)
        pad = self.pad_id
        ids = torch.full((len(chats), T), pad, dtype=torch.long)
        valid = torch.zeros((len(chats), T), dtype=torch.bool)
        for i, c in enumerate(chats):
            ids[i, T - len(c.ids):] = torch.tensor(c.ids)
            valid[i, T - len(c.ids):] = True
        image_mask = (ids == self.tokenizer.image_id) & valid
        pix = [p for c in chats for p in c.images]
        return ChatBatch(ids, valid, image_mask, torch.stack(pix) if pix else None)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_id if tok.has_token(PAD_TOKEN) else tok.eos_id
