"""What `januskit.load` returns: a thin facade over the model, the processor and the samplers.
`Pipeline` is what every architecture shares: chat, and text-to-image as `generate_images` (per prompt)
over `generate_batch` (any rows, one signature for every architecture). janus.py samples the images
autoregressively and adds the VQ tokenizer both ways; janusflow.py integrates a rectified flow."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..processing.chat import Message, Processor
from ..processing.edit import DEFAULT_CFG_IMAGE, EditInputs
from ..processing.image import load_image, to_gen_pixels, to_pil, to_uint8
from ..processing.tokenizer import StreamDecoder
from ..sampling.logits import row_generator
from ..sampling.text import generate_text, next_token_probs

Conversation = Sequence[Message]
Progress = Callable[[int, int], None]


def check_strength(strength: float) -> float:
    """Image-to-image strength: in (0, 1], how much of the source is replaced (1: none of it kept)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    return float(strength)


@dataclass
class ImageResult:
    images: list[Image.Image]
    tokens: torch.LongTensor | None = None  # (n, tokens_per_image) VQ ids (Janus)
    seed: int = 0
    info: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (n, C, H, W) final latents (JanusFlow)


@dataclass
class ImageBatch:
    """What `generate_batch` returns; row i of each tensor belongs to prompt i."""
    pixels: torch.Tensor  # (n, 3, S, S) float pixels in about [-1, 1]
    tokens: torch.LongTensor | None = None  # (n, tokens_per_image) VQ ids (Janus)
    latents: torch.Tensor | None = None  # (n, C, H, W) final latents (JanusFlow)
    info: dict = field(default_factory=dict)

    def pil(self) -> list[Image.Image]:
        return to_pil(self.pixels)

    def uint8(self) -> np.ndarray:
        """(n, S, S, 3) uint8, truncated like the reference."""
        return to_uint8(self.pixels)


class UnsupportedOption(ValueError):
    """A generation option this architecture does not have; `option` names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class Pipeline:
    """Chat over any model with the shared interface (splice, llm, text_logits), and text-to-image
    through the subclass's `_generate`."""

    default_cfg_weight: ClassVar[float]  # the reference's CFG weight, the one place each architecture states it
    # The architecture's own generation options and their defaults; generate_batch takes every option
    # of every architecture and refuses (UnsupportedOption) a value for one not listed here.
    image_options: ClassVar[dict[str, Any]] = {}
    unsupported_option: ClassVar[str] = "not an option of {arch}"  # UnsupportedOption's reason
    progress_unit: ClassVar[tuple[str, str]] = ("", "")  # what generate_batch's progress counts: (unit, description)

    def __init__(self, model: torch.nn.Module, processor: Processor, source: str | Path = "") -> None:
        self.model = model
        self.processor = processor
        self.source = str(source)
        self.compile_decode = False  # run each decode step as one compiled graph (sampling.compile)

    @property
    def config(self):
        return self.model.config

    @property
    def arch(self) -> str:
        return self.model.config.arch

    @property
    def dtype(self) -> torch.dtype:
        return self.model.llm.embed_tokens.weight.dtype

    def _packable(self) -> tuple[torch.nn.Module, ...]:
        return (self.model.language_model,)

    def pack_for_cpu(self, rows_hint: int = 2) -> int:
        """Prepack the LLM, aligners and gen head for faster CPU inference (januskit.models.cpu_pack);
        returns the number of layers packed (0 where the oneDNN ops are unavailable). Inference only.
        Only float nn.Linear layers are packed: quantised ones (januskit.quantization.QuantLinear, not
        Linear subclasses) keep their own kernels, and the float layers beside them are packed."""
        from ..models.cpu_pack import pack_linears

        return sum(pack_linears(part, rows_hint) for part in self._packable())

    # -- understanding ------------------------------------------------------------------------
    def _conversation(self, prompt: str | Conversation, images: Sequence) -> list[Message]:
        if isinstance(prompt, str):
            return self.processor.user_turn(prompt, images)
        if images:
            raise ValueError("pass images inside the messages when giving a conversation")
        return list(prompt)

    def chat(self, prompt: str | Conversation, images: Sequence = (), *, max_new_tokens: int = 512,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             stream: bool = False, system_prompt: str | None = None) -> str | Iterator[str]:
        """Answer one prompt (with optional images) or one conversation. temperature 0 = greedy
        (the reference's inference script). stream=True is an alias of chat_stream (an iterator)."""
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                  system_prompt=system_prompt)
        if stream:
            return self.chat_stream(prompt, images, **kw)
        return "".join(p[0] for p in self._chat_stream([self._conversation(prompt, images)], **kw))

    def chat_stream(self, prompt: str | Conversation, images: Sequence = (), *, max_new_tokens: int = 512,
                    temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                    system_prompt: str | None = None) -> Iterator[str]:
        """Like chat(), but an iterator of the answer's text pieces as they are decoded. Bad arguments
        raise here, at the call, not at the first next()."""
        pieces = self._chat_stream([self._conversation(prompt, images)], max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                   system_prompt=system_prompt)
        return (p[0] for p in pieces if p[0])

    def chat_ids(self, prompt: str | Conversation, images: Sequence = (), *, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                 system_prompt: str | None = None) -> list[int]:
        """Like chat(), but the generated token ids (the stop token excluded)."""
        steps, eos = self._steps([self._conversation(prompt, images)], max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                 system_prompt=system_prompt)
        return [int(t[0]) for t in steps if 0 <= int(t[0]) != eos]

    def chat_batch(self, prompts: Sequence[str | Conversation], images: Sequence[Sequence] | None = None, *,
                   max_new_tokens: int = 512, temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, seed: int = 0, system_prompt: str | None = None) -> list[str]:
        """Answer several prompts in one left-padded batch; row i samples with its own generator."""
        if len(prompts) == 0:
            return []
        images = images if images is not None else [()] * len(prompts)
        convs = [self._conversation(p, im) for p, im in zip(prompts, images, strict=True)]
        out = [""] * len(convs)
        for pieces in self._chat_stream(convs, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, top_k=top_k, seed=seed, system_prompt=system_prompt):
            for i, p in enumerate(pieces):
                out[i] += p
        return out

    def answer_probabilities(self, prompt: str | Conversation, images: Sequence = (), token_ids: Sequence[int] = (),
                             system_prompt: str | None = None) -> torch.Tensor:
        """Probabilities of `token_ids` as the first token of the answer (one forward, no sampling), e.g. of
        "yes" and "no" after a yes/no question: a VQA judge (januskit.train.rl.rewards.vqa)."""
        vocab = self.config.llm.vocab_size
        bad = [t for t in token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"token_ids {bad} are not in this model's vocabulary [0, {vocab})")
        proc = self.processor
        batch = proc.batch([proc.encode_chat(self._conversation(prompt, images), system_prompt)])
        return next_token_probs(self.model, batch)[0, list(token_ids)]

    def _steps(self, convs: list[list[Message]], *, max_new_tokens: int, temperature: float, top_p: float | None,
               top_k: int | None, seed: int, system_prompt: str) -> tuple[Iterator[torch.Tensor], int]:
        """Encode, batch and check everything now (so chat_stream raises at the call); return the
        lazy per-step token stream (row i samples with generator (seed, i)) and the stop id."""
        proc = self.processor
        batch = proc.batch([proc.encode_chat(c, system_prompt) for c in convs])
        gens = [row_generator(seed, i) for i in range(len(convs))]
        eos = proc.tokenizer.eos_id
        return generate_text(self.model, batch, max_new_tokens=max_new_tokens, stop_ids=[eos],
                             temperature=temperature, top_k=top_k, top_p=top_p, generators=gens,
                             compile=self.compile_decode), eos

    def _chat_stream(self, convs: list[list[Message]], **kw) -> Iterator[list[str]]:
        """Per-step lists of new text pieces, one per conversation."""
        steps, eos = self._steps(convs, **kw)
        # lstrip: the answer's first token carries the space after "Assistant:"; answers start at their text
        return self._pieces(steps, [StreamDecoder(self.processor.tokenizer, lstrip=True) for _ in convs], eos)

    @staticmethod
    def _pieces(steps: Iterator[torch.Tensor], decoders: list[StreamDecoder], eos: int) -> Iterator[list[str]]:
        for tok in steps:
            yield [d.push(int(t)) if 0 <= int(t) != eos else "" for d, t in zip(decoders, tok)]
        yield [d.flush() for d in decoders]

    # -- generation ---------------------------------------------------------------------------
    @property
    def image_size(self) -> int | None:
        """The side of the images this pipeline makes; None when it cannot decode any (JanusFlow
        loaded without its VAE)."""
        raise NotImplementedError

    @property
    def image_positions(self) -> int:
        """Context positions an image takes after its generation prompt."""
        raise NotImplementedError

    def reconstruct_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images through the generation side's image tokenizer and back (Janus: VQ, JanusFlow: VAE):
        (n, 3, S, S) float pixels, the ceiling of what a generated image can look like."""
        raise NotImplementedError

    def image_option_values(self, **given: Any) -> dict[str, Any]:
        """Every option in `image_options`, the given value where not None, else the default. A value
        for an option of another architecture raises UnsupportedOption."""
        for option, value in given.items():
            if option not in self.image_options and value is not None:
                raise UnsupportedOption(option, self.unsupported_option.format(option=option, arch=self.arch))
        return {k: d if given.get(k) is None else given[k] for k, d in self.image_options.items()}

    def own_options(self, **options: Any) -> dict[str, Any]:
        """The given options that are this architecture's: for callers holding settings for every
        architecture (the CLI's flags, EvalSettings), whose other settings do not apply here."""
        return {k: v for k, v in options.items() if k in self.image_options}

    def generate_batch(self, prompt_ids: Sequence[Sequence[int]], *, generators: Sequence[torch.Generator],
                       cfg_weight: float | Sequence[float] | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, steps: int | None = None,
                       latents: torch.Tensor | None = None, reuse_prompt_kv: bool | None = None,
                       speculative: str | None = None, window: int | None = None,
                       sources: Sequence[Sequence] | None = None, cfg_image: float | Sequence[float] | None = None,
                       memory_budget_gb: float = 4.0, progress: Progress | None = None) -> ImageBatch:
        """One image per generation prompt (repeat a prompt for several images); image i is sampled with
        generators[i] alone, so it does not depend on the other rows or on how they are chunked.
        `cfg_weight`: one weight, or one per row (None: `default_cfg_weight`).
        Janus: `temperature` (default 1, 0 = argmax), `top_k`, `top_p`; `speculative` ("sjd" or "mc-sjd":
        speculative Jacobi decoding, the same distribution in fewer LLM forwards, `window` tokens verified
        per forward; sampling/speculative.py); the rows run in chunks that fit
        `memory_budget_gb` (KV cache and activations). JanusFlow: `steps` (default 30 Euler steps),
        `latents` (the initial noise (n, C, H, W); default: drawn from the generators), `reuse_prompt_kv`
        (default True; False recomputes the prompt at every step, as the reference); all rows run in
        one batch, `memory_budget_gb` is not used. A value for the other architecture's option raises
        UnsupportedOption (a ValueError). `progress(done, total)` counts `progress_unit`.
        Image-to-image: `sources[i]` holds prompt i's source images (PIL, paths or bytes), and prompt i is an
        edit prompt (Processor.edit_prompt) with as many image blocks; guidance then has two conditions,
        `cfg_weight` on the text and `cfg_image` on the sources (default 1.5; processing/edit.py)."""
        return self._sample(prompt_ids, generators, {"edit": self._edit_inputs(prompt_ids, sources, cfg_image)},
                            cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p, steps=steps,
                            latents=latents, reuse_prompt_kv=reuse_prompt_kv, speculative=speculative,
                            window=window, memory_budget_gb=memory_budget_gb, progress=progress)

    def _sample(self, prompt_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
                inputs: dict[str, Any], *, cfg_weight: float | Sequence[float] | None = None,
                memory_budget_gb: float = 4.0, progress: Progress | None = None, **given: Any) -> ImageBatch:
        """generate_batch with the architecture's own extra `inputs` (edit sources, a token prefix,
        img2img's start step) beside the checked options."""
        if len(prompt_ids) == 0:
            raise ValueError("generate_batch needs at least one prompt")
        if len(generators) != len(prompt_ids):
            raise ValueError(f"generators: {len(generators)} for {len(prompt_ids)} prompts")
        options = self.image_option_values(**given) | inputs
        w = self._cfg_weight(cfg_weight)
        out = self._generate(prompt_ids, generators, w, options, memory_budget_gb, progress)
        out.info = {"cfg_weight": w} | out.info
        return out

    def _edit_inputs(self, prompt_ids: Sequence[Sequence[int]], sources: Sequence[Sequence] | None,
                     cfg_image: float | Sequence[float] | None) -> EditInputs | None:
        """Check the sources against the prompts' image blocks and transform them for the understanding
        encoder; None for text-to-image."""
        if sources is None:
            if cfg_image is not None:
                raise ValueError("cfg_image guides towards source images: pass sources (or use edit_image)")
            return None
        if len(sources) != len(prompt_ids):
            raise ValueError(f"sources: {len(sources)} lists for {len(prompt_ids)} prompts")
        tok = self.processor.tokenizer
        pix, seen = [], {}  # rows sharing one list of sources share its tensor: the sampler encodes it once
        for i, (ids, srcs) in enumerate(zip(prompt_ids, sources)):
            blocks = sum(1 for a, b in zip(ids, ids[1:]) if a == tok.boi_id and b == tok.image_id)
            if blocks != len(srcs) or not srcs:
                raise ValueError(f"prompt {i}: {blocks} image block(s) but {len(srcs)} source image(s); build it "
                                 "with processor.edit_prompt(instruction, n_images)")
            if id(srcs) not in seen:
                seen[id(srcs)] = torch.stack([self.source_pixels(load_image(im)) for im in srcs])
            pix.append(seen[id(srcs)])
        return EditInputs(pix, DEFAULT_CFG_IMAGE if cfg_image is None else cfg_image, tok.image_id, tok.boi_id,
                          tok.eoi_id, via=self.processor.edit_source)

    def source_pixels(self, image: Image.Image) -> torch.Tensor:
        """A source image as its encoder takes it: the understanding transform, or (edit_source "vq",
        Janus only) the VQ tokenizer's crop in [-1, 1]."""
        if self.processor.edit_source == "understanding":
            return self.processor.transform(image)
        if self.arch == "janusflow":
            raise ValueError("edit_source 'vq' is for Janus models; JanusFlow takes sources through the "
                             "understanding encoder")
        return to_gen_pixels(image, self.config.vq.image_size)

    def edit_image(self, instruction: str, images: Sequence, *, n: int = 1, seed: int = 0,
                   cfg_text: float | None = None, cfg_image: float | None = None, **options: Any) -> ImageResult:
        """n images made from the source `images` as `instruction` says: the sources enter through the
        understanding encoder, as in a chat (or as VQ tokens, for a model trained with edit_source "vq"), and guidance has two conditions (InstructPix2Pix's):
        `cfg_text` (default: default_cfg_weight) and `cfg_image` (default 1.5). Image i from generator
        (seed, i). A model learns this from `edit` training samples (docs/editing.md); the released
        checkpoints were not trained for it. `options`: generate_batch's sampling options."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("edit_image needs at least one source image")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ids = self.processor.edit_prompt(instruction, len(images))
        srcs = [load_image(im) for im in images]  # decoded once, shared by the n rows
        out = self.generate_batch([ids] * n, generators=[row_generator(seed, i) for i in range(n)], cfg_weight=cfg_text,
                                  sources=[srcs] * n, cfg_image=cfg_image, **options)
        return ImageResult(images=out.pil(), tokens=out.tokens, seed=seed, latents=out.latents,
                           info={"prompt_tokens": len(ids), "cfg_image": DEFAULT_CFG_IMAGE if cfg_image is None
                                 else cfg_image} | out.info)

    def _cfg_weight(self, cfg_weight: float | Sequence[float] | None) -> float | Sequence[float]:
        return self.default_cfg_weight if cfg_weight is None else cfg_weight

    def _generate(self, prompt_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator],
                  cfg_weight: float | Sequence[float], options: dict[str, Any], memory_budget_gb: float,
                  progress: Progress | None) -> ImageBatch:
        """The architecture's sampler and decoder; `options` holds every key of `image_options`."""
        raise NotImplementedError

    def generate_images(self, prompt: str, *, n: int = 1, seed: int = 0, **options: Any) -> ImageResult:
        """n images for one prompt, image i from generator (seed, i) whatever n is. `options`: the
        keyword arguments of generate_batch (cfg_weight, the architecture's sampling options,
        memory_budget_gb, progress); the defaults are the reference's."""
        ids = self._generation_prompt(prompt, n)
        out = self.generate_batch([ids] * n, generators=[row_generator(seed, i) for i in range(n)], **options)
        return ImageResult(images=out.pil(), tokens=out.tokens, seed=seed, latents=out.latents,
                           info={"prompt_tokens": len(ids)} | out.info)

    def _generation_prompt(self, prompt: str, n: int) -> list[int]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self.processor.generation_prompt(prompt)
