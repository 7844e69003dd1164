"""A Sample -> the token sequence the model trains on, with what carries loss (official "deepseek" format).

Understanding / text conversations are rendered exactly as `Processor.render` does at inference;
only assistant answers are targets: the tokens the model would have to produce after the inference
prompt "...Assistant:", i.e. the answer and its closing EOS. A text document is BOS + text + EOS,
every token after BOS a target. Generation is `Processor.generation_prompt(caption)` (ends with
<begin_of_image>), the VQ ids in gen slots, then <end_of_image>; only the VQ ids are targets.
Classifier-free guidance: with probability `cfg_drop` the prompt becomes inference's unconditional
row (BOS and <begin_of_image> kept, everything between -> pad). Per-sample randomness is a hash of
(seed, epoch, sample key), so it does not depend on worker order and needs no state to resume.

JanusFlow generation (`flow` given) is the layout its sampler uses: the generation prompt without
<begin_of_image>, then 1 + n_gen slots (the timestep token, then the latent grid) whose inputs the
loss builds from the clean latent; a dropped prompt keeps BOS and hides the rest from attention, as the
sampler's unconditional rows do. The latent comes from the frozen VAE (`fill_latents`).

Edit (image-to-image) is a generation whose prompt is `Processor.edit_prompt(instruction, n)`: the source
images' slots take understanding features (und_mask + pixel_values, as in a chat), the target is learned
exactly as a generation image (VQ ids, or the flow latent). Its dropout is InstructPix2Pix's: one draw
per sample decides between dropping the text (`edit_drop_text`), the images (`edit_drop_image`), both
(`edit_drop_both`) or nothing, and drops exactly the positions the sampler's guidance rows drop
(`processing.edit.dropped_positions`): Janus replaces them by pad, JanusFlow hides them; a dropped
image's slots become pad and lose their features in both.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch.nn.functional as F

import torch
from PIL import Image

from ...config import VQConfig
from ...processing.chat import SYSTEM_PROMPT, Message, Processor
from ...processing.tokenizer import IMAGE_TOKEN
from ...processing.edit import dropped_positions
from ...processing.image import to_gen_pixels
from .batch import IGNORE
from .records import DataError, Sample


@dataclass
class EncodedSample:
    """One tokenised sample; per-token tensors have length L (labels are unshifted: see `labels`)."""

    kind: str
    key: str
    ids: torch.Tensor  # (L,) long; image_id at understanding and generation slots
    text_target: torch.Tensor  # (L,) bool: this token is predicted by the LM head (from the slot before)
    und_mask: torch.Tensor  # (L,) bool: understanding-feature slots
    gen_mask: torch.Tensor  # (L,) bool: VQ-token slots (gen-head targets, except gen_input ones)
    gen_ids: torch.Tensor | None  # (gen_mask.sum(),) long VQ ids, in slot order; None until fill_vq_ids
    pixel_values: torch.Tensor | None  # (n_images, 3, S, S) understanding images, in slot order
    gen_pixels: torch.Tensor | None = None  # (3, S, S) in [-1, 1], waiting for the VQ encoder (or the VAE)
    cfg_dropped: bool = False
    hidden: torch.Tensor | None = None  # (L,) bool: slots no other slot attends to (a dropped flow prompt)
    flow_mask: torch.Tensor | None = None  # (L,) bool: JanusFlow [t_emb, grid] slots
    flow_latent: torch.Tensor | None = None  # (C, H, W) clean scaled latent; None until fill_latents
    flow_seed: int = 0  # seed of this sample's noise and t (drawn in the loss)
    repa_pixels: torch.Tensor | None = None  # (3, S, S) understanding-encoder input of the same image (REPA)
    gen_input: torch.Tensor | None = None  # (L,) bool: VQ slots that are input only (an edit's VQ sources)
    source_pixels: torch.Tensor | None = None  # (k, 3, S, S) in [-1, 1]: VQ sources waiting for the encoder
    text_weight: torch.Tensor | None = None  # (L,) float: loss weight of each text_target slot; None = all 1

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted (text_labels, image_labels), each (L,): slot t's target is token t+1, IGNORE if none."""
        if bool(self.gen_mask.any()) and (self.gen_ids is None or self.source_pixels is not None):
            raise ValueError(f"{self.key}: VQ ids not computed yet; call fill_vq_ids() before packing")
        L = len(self)
        text = torch.full((L,), IGNORE, dtype=torch.long)
        text[:-1] = torch.where(self.text_target[1:], self.ids[1:], IGNORE)
        full = torch.zeros(L, dtype=torch.long)
        if self.gen_ids is not None:
            full[self.gen_mask] = self.gen_ids
        target = self.gen_mask if self.gen_input is None else self.gen_mask & ~self.gen_input
        image = torch.full((L,), IGNORE, dtype=torch.long)
        image[:-1] = torch.where(target[1:], full[1:], IGNORE)
        return text, image

    def text_weights(self) -> torch.Tensor:
        """Shifted like `labels`: slot t's weight is that of target t+1 (1 without text_weight; 0 at no target)."""
        w = torch.zeros(len(self))
        w[:-1] = torch.where(self.text_target[1:], 1.0 if self.text_weight is None else self.text_weight[1:], 0.0)
        return w

    def truncated(self, n: int, n_und_tokens: int) -> "EncodedSample":
        """The first n tokens. A cut inside an understanding image moves to before its <begin_of_image>
        (and drops the image); generation and edit samples are never cut (not even their <end_of_image>:
        their sources and target are one unit)."""
        if len(self) <= n:
            return self
        if bool(self.gen_mask.any()) or self.flow_mask is not None:
            raise DataError(self.key, f"{len(self)} tokens; {self.kind} samples cannot be truncated (to {n}): "
                                      f"their image would be cut", "length")
        und = self.und_mask.tolist()
        if n > 0 and und[n - 1]:  # cut inside an image's slots: back to its first slot...
            while n > 0 and und[n - 1]:
                n -= 1
            n -= 1  # ...and before the <begin_of_image> that opened it
        elif n > 0 and und[n]:  # cut right after a <begin_of_image>
            n -= 1
        keep = int(self.und_mask[:n].sum()) // n_und_tokens
        pix = self.pixel_values[:keep] if self.pixel_values is not None and keep else None
        return replace(self, ids=self.ids[:n], text_target=self.text_target[:n], und_mask=self.und_mask[:n],
                       gen_mask=self.gen_mask[:n], pixel_values=pix,
                       text_weight=None if self.text_weight is None else self.text_weight[:n])


ANSWER_WEIGHTINGS = ("token", "turn")


def turn_weights(target: torch.Tensor) -> torch.Tensor:
    """(L,) weights of a conversation's answer tokens (`target`, bool) that give every answer (a run of targets)
    the same share of the conversation's total, which stays its number of answer tokens: a one-word answer
    then counts as much as a 30-token description beside it, instead of 1/30 as much (answer_weighting = "turn")."""
    t = target.to(torch.long)
    run = torch.cumsum(torch.cat([t[:1], (t[1:] > t[:-1]).to(torch.long)]), 0) * t  # answer number, 0 elsewhere
    n_runs = int(run.max()) if len(run) else 0
    if n_runs == 0:
        return torch.zeros(len(t))
    sizes = torch.bincount(run, minlength=n_runs + 1).to(torch.float32)
    total = float(t.sum())
    w = total / (n_runs * sizes)  # per answer: its share / its length
    w[0] = 0.0
    return w[run]


def _unit(*parts: object) -> float:
    """A reproducible uniform number in [0, 1) from its arguments (Python's hash() is salted per process)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def stable_key(key: str) -> str:
    """A sample's key without the folders of its file ("/data/x/gen.jsonl:12" -> "gen.jsonl:12"), so
    per-sample random choices do not change when a dataset moves."""
    file, sep, rest = key.rpartition(":")
    return f"{file.replace(chr(92), '/').rsplit('/', 1)[-1]}:{rest}" if sep else key


def _probability(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {v!r}")
    return float(v)


def _extended(mask: torch.Tensor, n: int) -> torch.Tensor:
    """`mask` followed by n False (the target's slots)."""
    return torch.cat([mask, torch.zeros(n, dtype=torch.bool)])


def _target(s: Sample) -> Image.Image | None:
    """The image a generation or edit sample learns to produce (None when only its VQ ids are given)."""
    if s.kind == "edit":
        return s.target
    return s.images[0] if s.images else None


def first_sentence(text: str) -> str:
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1].isspace()):
            return text[:i + 1]
    return text


@dataclass(frozen=True)
class FlowLayout:
    """What a JanusFlow generation sample needs from the model config."""

    n_gen_tokens: int  # latent grid positions
    image_size: int  # generation images are cropped to this side before the VAE
    repa: bool = False  # also keep the image for the understanding encoder (REPA targets)


class SampleEncoder:
    """Callable Sample -> EncodedSample; pass it as a reader's `transform` so encoding errors (too long,
    bad cached ids) follow the reader's on_error policy and are counted like any bad sample."""

    def __init__(self, processor: Processor, vq: VQConfig | None, *, seed: int = 0, cfg_drop: float = 0.1,
                 short_caption_p: float = 0.0, max_len: int | None = None, too_long: str = "error",
                 system_prompt: str = SYSTEM_PROMPT, flow: FlowLayout | None = None, edit_drop_text: float = 0.05,
                 edit_drop_image: float = 0.05, edit_drop_both: float = 0.05, answer_weighting: str = "token") -> None:
        if answer_weighting not in ANSWER_WEIGHTINGS:
            raise ValueError(f"answer_weighting must be one of {', '.join(map(repr, ANSWER_WEIGHTINGS))}, got "
                             f"{answer_weighting!r}")
        self.answer_weighting = answer_weighting
        cfg_drop, short_caption_p = _probability("cfg_drop", cfg_drop), _probability("short_caption_p", short_caption_p)
        # InstructPix2Pix's 5% each; exclusive outcomes of one draw, so they must fit in [0, 1] together
        names = ("edit_drop_text", "edit_drop_image", "edit_drop_both")
        self.edit_drop = tuple(_probability(k, v) for k, v in zip(names, (edit_drop_text, edit_drop_image,
                                                                          edit_drop_both)))
        if sum(self.edit_drop) > 1 + 1e-9:
            raise ValueError(f"{' + '.join(names)} = {sum(self.edit_drop):g} > 1 (exclusive outcomes of one draw)")
        if too_long not in ("error", "truncate"):
            raise ValueError(f"too_long must be 'error' or 'truncate', got {too_long!r}")
        if (vq is None) == (flow is None):
            raise ValueError("SampleEncoder needs exactly one of vq (Janus) and flow (JanusFlow)")
        if flow is not None and processor.edit_source != "understanding":
            raise ValueError("edit_source 'vq' is for Janus models; JanusFlow takes edit sources through the "
                             "understanding encoder")
        self.proc, self.vq, self.flow = processor, vq, flow
        self.seed, self.cfg_drop, self.short_caption_p = seed, cfg_drop, short_caption_p
        self.max_len, self.too_long, self.system_prompt = max_len, too_long, system_prompt
        tok = processor.tokenizer
        self.bos, self.eos, self.pad = tok.bos_id, tok.eos_id, processor.pad_id
        self.image_id, self.boi, self.eoi = tok.image_id, tok.boi_id, tok.eoi_id

    @classmethod
    def for_model(cls, model: torch.nn.Module, processor: Processor, *, repa: bool = False, **kw) -> "SampleEncoder":
        """The encoder for `model`'s architecture; `repa`: JanusFlow trained with REPA (the loss has
        h_phi), so generation samples also keep their image for the understanding encoder."""
        c = model.config
        if c.arch == "janusflow":
            flow = FlowLayout(c.n_gen_tokens, c.vision.image_size, repa)
            return cls(processor, None, flow=flow, **kw)
        return cls(processor, c.vq, **kw)

    def __call__(self, s: Sample) -> EncodedSample:
        if s.kind == "generation":
            out = self.generation(s) if self.flow is None else self.flow_generation(s)
        elif s.kind == "edit":
            out = self.edit(s) if self.flow is None else self.flow_edit(s)
        elif s.messages is not None:
            out = self.conversation(s)
        else:
            out = self.document(s)
        if self.max_len is not None and len(out) > self.max_len:
            if self.too_long == "error":
                raise DataError(s.key, f"{len(out)} tokens, longer than the context ({self.max_len}); set "
                                       f"too_long='truncate' or on_error='skip' to handle it", "length")
            out = out.truncated(self.max_len, self.proc.n_image_tokens)
        return out

    # -- understanding and text ----------------------------------------------------------------
    def conversation_ids(self, messages: Sequence[Message], system: str) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation (images not yet expanded) and the answer-token flags.
        Each assistant turn i: its targets are the tokens after the inference prompt render(messages[:i]).
        Segments end at an EOS (a special token), so tokenising them one by one equals tokenising the whole."""
        tok, proc = self.proc.tokenizer, self.proc
        ids, target, done = [self.bos], [False], ""
        for i in range(1, len(messages), 2):
            prompt, full = proc.render(messages[:i], system), proc.render(messages[:i + 1], system)
            if not (prompt.startswith(done) and full.startswith(prompt)):  # render must grow by appending
                raise AssertionError("Processor.render is not prefix-stable; answer masking would be wrong")
            p = tok.encode(prompt[len(done):], add_bos=False)
            f = tok.encode(full[len(done):], add_bos=False)
            k = next((j for j, (a, b) in enumerate(zip(p, f)) if a != b), min(len(p), len(f)))
            ids += f
            target += [False] * k + [True] * (len(f) - k)
            done = full
        return ids, target

    def conversation(self, s: Sample) -> EncodedSample:
        system = self.system_prompt if s.system is None else s.system
        msgs = s.messages
        if s.placed and self.proc.image_placement != "before":  # unmarked images where this model reads them
            first = msgs[0].content.removeprefix("".join(f"{IMAGE_TOKEN}\n" for _ in s.images))
            msgs = self.proc.user_turn(first, s.images) + list(msgs[1:])
        ids, target = self.conversation_ids(msgs, system)
        n = self.proc.n_image_tokens
        out_ids, out_tgt, und = [], [], []
        for t, g in zip(ids, target):  # expand each marker to <begin_of_image> + n slots + <end_of_image>
            if t == self.image_id:
                out_ids += [self.boi] + [self.image_id] * n + [self.eoi]
                out_tgt += [False] * (n + 2)
                und += [False] + [True] * n + [False]
            else:
                out_ids.append(t), out_tgt.append(g), und.append(False)
        n_images = sum(und) // n if n else 0
        if n_images != len(s.images):
            raise DataError(s.key, f"{n_images} image slot(s) after tokenising but {len(s.images)} image(s)", "field")
        pix = torch.stack([self.proc.transform(im) for im in s.images]) if s.images else None
        L = len(out_ids)
        tgt = torch.tensor(out_tgt)
        return EncodedSample(s.kind, s.key, torch.tensor(out_ids), tgt, torch.tensor(und),
                             torch.zeros(L, dtype=torch.bool), None, pix,
                             text_weight=turn_weights(tgt) if self.answer_weighting == "turn" else None)

    def document(self, s: Sample) -> EncodedSample:
        ids = self.proc.tokenizer.encode(s.text) + [self.eos]  # EOS ends the document, as in pretraining
        L = len(ids)
        target = torch.ones(L, dtype=torch.bool)
        target[0] = False  # BOS is given, never predicted
        no = torch.zeros(L, dtype=torch.bool)
        return EncodedSample(s.kind, s.key, torch.tensor(ids), target, no, no.clone(), None, None)

    # -- generation ------------------------------------------------------------------------------
    def cfg_dropped(self, key: str, epoch: int) -> bool:
        return self.cfg_drop > 0 and _unit(self.seed, "cfg", epoch, stable_key(key)) < self.cfg_drop

    def generation_prompt(self, s: Sample) -> tuple[list[int], bool]:
        caption = s.caption
        if self.short_caption_p > 0 and _unit(self.seed, "short", s.epoch, stable_key(s.key)) < self.short_caption_p:
            caption = first_sentence(caption)  # Janus: sometimes only the first sentence, for short prompts
        ids = self.proc.generation_prompt(caption)
        dropped = self.cfg_dropped(s.key, s.epoch)
        if dropped:  # the unconditional row inference builds (sampling.image_ar.cfg_rows)
            ids = [ids[0]] + [self.pad] * (len(ids) - 2) + [ids[-1]]
        return ids, dropped

    def generation(self, s: Sample) -> EncodedSample:
        prompt, dropped = self.generation_prompt(s)
        no = torch.zeros(len(prompt), dtype=torch.bool)
        return self.vq_target(s, torch.tensor(prompt), no, None, dropped)

    def flow_generation(self, s: Sample) -> EncodedSample:
        prompt, dropped = self.generation_prompt(s)
        hidden = torch.zeros(len(prompt) - 1, dtype=torch.bool)
        if dropped:
            hidden[1:] = True  # the sampler's unconditional row: only BOS stays visible
        return self.flow_target(s, torch.tensor(prompt[:-1]), hidden, torch.zeros_like(hidden), None, dropped)

    def vq_target(self, s: Sample, prompt: torch.Tensor, und: torch.Tensor, pix: torch.Tensor | None,
                  dropped: bool) -> EncodedSample:
        """Janus: `prompt` (ending with <begin_of_image>; und: its understanding slots, pix: their images),
        then the target's n VQ ids in gen slots, then <end_of_image>. Loss only on the VQ ids."""
        n = self.vq.n_tokens
        gen_ids, pixels = None, None
        if s.vq_ids is not None:
            gen_ids = check_vq_ids(torch.tensor(s.vq_ids, dtype=torch.long), n, self.vq.codebook_size, s.key)
        else:
            pixels = to_gen_pixels(_target(s), self.vq.image_size)  # short side resize, centre crop, [-1, 1]
        P = len(prompt)
        ids = torch.cat([prompt, torch.tensor([self.image_id] * n + [self.eoi])])
        gen_mask = torch.zeros(P + n + 1, dtype=torch.bool)
        gen_mask[P:P + n] = True
        no = torch.zeros(P + n + 1, dtype=torch.bool)
        return EncodedSample(s.kind, s.key, ids, no, _extended(und, n + 1), gen_mask, gen_ids, pix, pixels, dropped)

    def flow_target(self, s: Sample, prompt: torch.Tensor, hidden: torch.Tensor, und: torch.Tensor,
                    pix: torch.Tensor | None, dropped: bool) -> EncodedSample:
        """JanusFlow: `prompt` without its <begin_of_image> (that slot takes the timestep token, as in the
        sampler; hidden: its slots no other slot sees), then 1 + n_gen flow slots for the target's latent."""
        f = self.flow
        target = _target(s)
        if target is None:
            raise DataError(s.key, f"a JanusFlow {s.kind} sample needs its image (vq_ids are for Janus)", "image")
        P, n = len(prompt), f.n_gen_tokens
        L = P + 1 + n
        ids = torch.cat([prompt, torch.full((1 + n,), self.image_id)])
        flow_mask = torch.zeros(L, dtype=torch.bool)
        flow_mask[P:] = True
        pixels = to_gen_pixels(target, f.image_size)
        repa = to_und_pixels(pixels, self.proc) if f.repa else None
        no = torch.zeros(L, dtype=torch.bool)
        seed = int(_unit(self.seed, "flow", s.epoch, stable_key(s.key)) * 2**62)
        return EncodedSample(s.kind, s.key, ids, no, _extended(und, 1 + n), no.clone(), None, pix, pixels, dropped,
                             hidden=_extended(hidden, 1 + n), flow_mask=flow_mask, flow_seed=seed, repa_pixels=repa)

    # -- edit ------------------------------------------------------------------------------------
    def edit_condition(self, key: str, epoch: int) -> tuple[bool, bool]:
        """(keep text, keep image) of an edit sample: one reproducible draw, exclusive outcomes."""
        u = _unit(self.seed, "edit", epoch, stable_key(key))
        p_text, p_image, p_both = self.edit_drop
        if u < p_text:
            return False, True
        if u < p_text + p_image:
            return True, False
        if u < p_text + p_image + p_both:
            return False, False
        return True, True

    def edit_prompt(self, s: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """The edit prompt's ids (ending with <begin_of_image>), the positions its draw drops, its
        understanding slots, their images, and whether anything was dropped. A dropped image's slots are
        already pad here (no features), as in the sampler's rows; the caller pads or hides the rest."""
        ids = self.proc.edit_prompt(s.instruction, len(s.images))
        keep_text, keep_image = self.edit_condition(s.key, s.epoch)
        drop = dropped_positions(ids, image_id=self.image_id, boi_id=self.boi, eoi_id=self.eoi, keep_text=keep_text,
                                 keep_image=keep_image)
        t = torch.tensor(ids)
        und = t == self.image_id
        if not keep_image:
            return torch.where(und, self.pad, t), drop, torch.zeros_like(und), None, True
        if self.proc.edit_source == "vq":  # the caller makes these slots VQ inputs (edit)
            pix = torch.stack([to_gen_pixels(im, self.vq.image_size) for im in s.images])
        else:
            pix = torch.stack([self.proc.transform(im) for im in s.images])
        return t, drop, und, pix, not keep_text

    def edit(self, s: Sample) -> EncodedSample:
        ids, drop, und, pix, dropped = self.edit_prompt(s)
        prompt = torch.where(drop, self.pad, ids)
        if self.proc.edit_source == "understanding" or pix is None:
            return self.vq_target(s, prompt, und, pix, dropped)
        out = self.vq_target(s, prompt, torch.zeros_like(und), None, dropped)  # sources as VQ inputs, no loss
        src = _extended(und, len(out) - len(und))
        return replace(out, gen_mask=out.gen_mask | src, gen_input=src, source_pixels=pix)

    def flow_edit(self, s: Sample) -> EncodedSample:
        ids, drop, und, pix, dropped = self.edit_prompt(s)
        return self.flow_target(s, ids[:-1], drop[:-1], und[:-1], pix, dropped)


def to_und_pixels(gen_pixels: torch.Tensor, proc: Processor) -> torch.Tensor:
    """A generation crop ([-1, 1], (3, S, S)) as the understanding encoder's input: resized to its side
    and normalised with its mean / std, so REPA's target sees exactly the pixels being generated."""
    t = proc.transform
    x = gen_pixels[None].float() * 0.5 + 0.5
    if x.shape[-1] != t.size:
        x = F.interpolate(x, size=(t.size, t.size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(t.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(t.std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def fill_latents(samples: Sequence[EncodedSample], encode_images: Callable[[torch.Tensor], torch.Tensor] | None,
                 shape: tuple[int, ...]) -> int:
    """Encode the pending JanusFlow generation images to latents in one batched call; returns how many."""
    todo = [s for s in samples if s.flow_mask is not None and s.flow_latent is None]
    if not todo:
        return 0
    if encode_images is None:
        raise ValueError(f"{todo[0].key}: JanusFlow {todo[0].kind} sample and no VAE to encode its image "
                         "(set [data] vae = DIR, or give the checkpoint a vae/ subfolder)")
    lat = torch.as_tensor(encode_images(torch.stack([s.gen_pixels for s in todo]))).to("cpu", torch.float32)
    if tuple(lat.shape[1:]) != tuple(shape):
        raise ValueError(f"the VAE gives latents of shape {tuple(lat.shape[1:])} for {todo[0].gen_pixels.shape[-1]} px "
                         f"images; the model expects {tuple(shape)} (latent_size, input_channels in its config)")
    for s, z in zip(todo, lat, strict=True):
        s.flow_latent, s.gen_pixels = z.clone(), None
    return len(todo)


def check_vq_ids(ids: torch.Tensor, n_tokens: int, codebook_size: int, where: str) -> torch.Tensor:
    if ids.ndim != 1 or ids.shape[0] != n_tokens:
        raise DataError(where, f"vq_ids: expected {n_tokens} ids per image, got {tuple(ids.shape)}", "vq_ids")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= codebook_size):
        raise DataError(where, f"vq_ids: ids must be in [0, {codebook_size}), got [{int(ids.min())}, "
                               f"{int(ids.max())}]", "vq_ids")
    return ids


def vq_tokenizer(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`tokenize_images` for the model's frozen VQ encoder: (N, 3, S, S) in [-1, 1] -> (N, n_tokens) ids."""
    vq = model.gen_vision_model

    @torch.no_grad()
    def tokenize(pixels: torch.Tensor) -> torch.Tensor:
        w = vq.quant_conv.weight
        return vq.encode(pixels.to(w.device, w.dtype))

    return tokenize


def fill_vq_ids(samples: Sequence[EncodedSample], tokenize_images: Callable[[torch.Tensor], torch.Tensor] | None,
                codebook_size: int | None = None) -> int:
    """Compute the missing VQ ids of generation samples (and of edits' VQ sources) in one batched call;
    returns how many images. A sample's ids are in slot order: its sources', then its target's."""
    todo = [s for s in samples if bool(s.gen_mask.any()) and (s.gen_ids is None or s.source_pixels is not None)]
    if not todo:
        return 0
    if tokenize_images is None:
        raise ValueError(f"{todo[0].key}: {todo[0].kind} sample without cached vq_ids and no tokenize_images given")
    images = []
    for s in todo:
        images += [] if s.source_pixels is None else list(s.source_pixels)
        images += [s.gen_pixels] if s.gen_ids is None else []
    ids = torch.as_tensor(tokenize_images(torch.stack(images))).to("cpu", torch.long).reshape(len(images), -1)
    i = 0
    for s in todo:
        k = (0 if s.source_pixels is None else len(s.source_pixels)) + (s.gen_ids is None)
        own = ids[i:i + k].reshape(-1)
        i += k
        if s.gen_ids is not None:  # cached target ids: the sources' come first
            own = torch.cat([own, s.gen_ids])
        s.gen_ids = check_vq_ids(own.clone(), int(s.gen_mask.sum()), codebook_size or 2**62, s.key)
        s.gen_pixels = s.source_pixels = None
    return len(images)
