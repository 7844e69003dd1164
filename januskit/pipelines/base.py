"""What `januskit.load` returns: a thin facade over the model, the processor and the samplers.
`Pipeline` is the understanding side every architecture shares (chat); janus.py adds autoregressive
text-to-image and the VQ tokenizer both ways, janusflow.py rectified-flow text-to-image."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..processing.chat import Message, Processor
from ..processing.tokenizer import StreamDecoder
from ..sampling.logits import row_generator
from ..sampling.text import generate_text

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
