"""What `januskit.load` returns: a thin facade over the model, the processor and the samplers.
`Pipeline` is the understanding side every architecture shares (chat); `JanusPipeline` adds
autoregressive text-to-image and the VQ tokenizer both ways (JanusFlow's is in flow_pipeline.py)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .models.janus import JanusModel
from .processing.chat import Message, Processor
from .processing.image import to_gen_pixels, to_pil, to_uint8
from .processing.tokenizer import StreamDecoder
from .sampling.image_ar import generate_image_tokens, rows_per_chunk
from .sampling.logits import row_generator
from .sampling.text import generate_text

Conversation = Sequence[Message]


@dataclass
class ImageResult:
    images: list[Image.Image]
    tokens: torch.LongTensor | None = None  # (n, tokens_per_image) VQ ids (Janus)
    seed: int = 0
    info: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None  # (n, C, H, W) final latents (JanusFlow)


class Pipeline:
    """Understanding (chat) over any model with the shared interface: splice, llm, text_logits."""

    def __init__(self, model: torch.nn.Module, processor: Processor, source: str | Path = "") -> None:
        self.model = model
        self.processor = processor
        self.source = str(source)

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
        returns the number of layers packed (0 where the oneDNN ops are unavailable). Inference only."""
        from .models.cpu_pack import pack_linears

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
        (the reference's inference script); stream=True returns an iterator of text pieces."""
        pieces = self._chat_stream([self._conversation(prompt, images)], max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                   system_prompt=system_prompt)
        if stream:
            return (p[0] for p in pieces if p[0])
        return "".join(p[0] for p in pieces)

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

    def _steps(self, convs: list[list[Message]], *, max_new_tokens: int, temperature: float, top_p: float | None,
               top_k: int | None, seed: int, system_prompt: str) -> tuple[Iterator[torch.Tensor], int]:
        """Encode, batch and check everything now (so chat(stream=True) raises at the call); return the
        lazy per-step token stream (row i samples with generator (seed, i)) and the stop id."""
        proc = self.processor
        batch = proc.batch([proc.encode_chat(c, system_prompt) for c in convs])
        gens = [row_generator(seed, i) for i in range(len(convs))]
        eos = proc.tokenizer.eos_id
        return generate_text(self.model, batch, max_new_tokens=max_new_tokens, stop_ids=[eos],
                             temperature=temperature, top_k=top_k, top_p=top_p, generators=gens), eos

    def _chat_stream(self, convs: list[list[Message]], **kw) -> Iterator[list[str]]:
        """Per-step lists of new text pieces, one per conversation."""
        steps, eos = self._steps(convs, **kw)
        return self._pieces(steps, [StreamDecoder(self.processor.tokenizer) for _ in convs], eos)

    @staticmethod
    def _pieces(steps: Iterator[torch.Tensor], decoders: list[StreamDecoder], eos: int) -> Iterator[list[str]]:
        for tok in steps:
            yield [d.push(int(t)) if 0 <= int(t) != eos else "" for d, t in zip(decoders, tok)]
        yield [d.flush() for d in decoders]



class JanusPipeline(Pipeline):
    model: JanusModel
    default_cfg = 5.0  # the reference's CFG weight on the logits

    def _packable(self) -> tuple[torch.nn.Module, ...]:
        m = self.model
        return (m.language_model, m.aligner, m.gen_aligner, m.gen_head)

    # -- generation ---------------------------------------------------------------------------
    def generate_images(self, prompt: str, n: int = 1, cfg: float = 5.0, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None,
                        memory_budget_gb: float = 4.0) -> ImageResult:
        """n images for one prompt (reference algorithm, default CFG 5, temperature 1).
        Images are made in chunks that fit `memory_budget_gb`; image i depends only on (seed, i)."""
        if not 0 <= memory_budget_gb < float("inf"):  # also catches NaN
            raise ValueError(f"memory_budget_gb must be a finite number >= 0, got {memory_budget_gb!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        ids = self.processor.generation_prompt(prompt)
        chunk = min(n, rows_per_chunk(self.model, len(ids), int(memory_budget_gb * 1024**3)))
        n_tok = self.config.vq.n_tokens
        tokens = []
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cb = None if progress is None else (lambda i, t, s=start, m=m: progress(s * t + i * m, n * t))
            tokens.append(generate_image_tokens(
                self.model, [ids] * m, pad_id=self.processor.pad_id, cfg_weight=cfg, temperature=temperature,
                top_k=top_k, top_p=top_p, generators=[row_generator(seed, start + j) for j in range(m)], progress=cb))
        tokens = torch.cat(tokens)
        return ImageResult(images=self.decode_image_tokens(tokens), tokens=tokens, seed=seed,
                           info=dict(prompt_tokens=len(ids), tokens_per_image=n_tok, chunk=chunk))

    # -- VQ tokenizer -------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image_tokens(self, image: Image.Image | str | Path | bytes | Sequence) -> torch.LongTensor:
        """Image(s) -> (n, tokens_per_image) VQ ids (short side resized, centre crop, [-1, 1])."""
        imgs = list(image) if isinstance(image, (list, tuple)) else [image]
        size = self.config.vq.image_size
        x = torch.stack([to_gen_pixels(i, size) for i in imgs]).to(self.dtype)
        return self.model.gen_vision_model.encode(x)

    @torch.inference_mode()
    def decode_image_pixels(self, tokens: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """(n, tokens_per_image) ids -> (n, 3, S, S) float pixels in about [-1, 1]. One image per
        decoder call by default: conv results vary with batch size in the last bits, and uint8
        truncation would turn that into pixels that depend on the batch (decode is <1% of the time)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.ndim == 1:
            tokens = tokens[None]
        n_tok, size = self.config.vq.n_tokens, self.config.vq.codebook_size
        if tokens.ndim != 2:
            raise ValueError(f"image tokens: expected shape (n, {n_tok}), got {tuple(tokens.shape)}")
        if tokens.shape[1] != n_tok:
            raise ValueError(f"image tokens: expected {n_tok} per image, got {tokens.shape[1]}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= size):
            raise ValueError(f"image tokens: ids must be in [0, {size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        vq = self.model.gen_vision_model
        return torch.cat([vq.decode(tokens[i:i + batch]).float() for i in range(0, tokens.shape[0], batch)])

    def decode_image_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        return to_pil(self.decode_image_pixels(tokens))

    def decode_image_uint8(self, tokens: torch.Tensor):
        return to_uint8(self.decode_image_pixels(tokens))
