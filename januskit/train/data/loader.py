"""The data side in one iterator: mixer -> VQ ids (Janus) or VAE latents (JanusFlow) -> packed
TrainBatch, with one resumable state.

`state_dict()` is the state after the last batch handed out, so a checkpoint taken after step s
resumes at step s+1 exactly, even with prefetching (a background thread reads, decodes and
tokenises the next steps; VQ encoding runs in the caller's thread, on the model's device).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ...checkpoint.official_config import EDIT_LAYOUTS, EDIT_SOURCES, read_edit_layout, read_edit_source
from ...processing.chat import Processor
from ...processing.image import ImageTransform
from .batch import TrainBatch
from .records import KINDS, _Source, open_source
from .encode import EncodedSample, FlowLayout, SampleEncoder, fill_latents, fill_vq_ids, vq_tokenizer
from .mixing import Mixer
from .packing import pack
from .workers import ParallelSource, SourceProcess


class TrainData:
    """Endless iterator of this rank's whole-step TrainBatch (`per_step`: the trainer splits the rows
    into micro-batches)."""

    per_step = True
    def __init__(self, mixer: Mixer, context_len: int, *, pad_id: int,
                 tokenize_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 codebook_size: int | None = None, prefetch: int = 0,
                 encode_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 latent_shape: tuple[int, ...] | None = None) -> None:
        self.mixer, self.context_len, self.pad_id = mixer, context_len, pad_id
        self.tokenize_images, self.codebook_size = tokenize_images, codebook_size
        self.encode_latents, self.latent_shape = encode_latents, latent_shape
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="januskit-data") if prefetch > 0 else None
        self._pending: list[Future] = []
        self._state = copy.deepcopy(mixer.state_dict())
        self.last: dict[str, Any] = {}  # stats of the last batch: samples per kind, rows, packing efficiency
        self.model_settings: dict[str, Any] = {}  # generation_config.json entries the trained model needs

    def _produce(self) -> tuple[list[EncodedSample], dict[str, Any]]:
        items = next(self.mixer)
        return items, copy.deepcopy(self.mixer.state_dict())

    def __iter__(self) -> "TrainData":
        return self

    def __next__(self) -> TrainBatch:
        if self._pool is None:
            items, state = self._produce()
        else:
            while len(self._pending) < self.prefetch + 1:
                self._pending.append(self._pool.submit(self._produce))
            items, state = self._pending.pop(0).result()
        fill_vq_ids(items, self.tokenize_images, self.codebook_size)
        fill_latents(items, self.encode_latents, self.latent_shape)
        batch = pack(items, self.context_len, pad_id=self.pad_id)
        self._state = state
        kinds = [s.kind for s in items]
        self.last = {"samples": {k: kinds.count(k) for k in dict.fromkeys(kinds)}, "rows": batch.input_ids.shape[0],
                     "packing_efficiency": batch.packing_efficiency,
                     "cfg_dropped": sum(s.cfg_dropped for s in items)}
        return batch

    def _drain(self) -> None:
        for f in self._pending:  # let in-flight reads finish before touching the sources
            f.exception()
        self._pending.clear()

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self._drain()
        self.mixer.load_state_dict(st)
        self._state = copy.deepcopy(st)

    def reshard(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """The mixer's reshard: this rank's state among `world` ranks, from a run with len(states) ranks."""
        return self.mixer.reshard(states, rank, world)

    def skipped(self) -> dict[str, dict[str, int]]:
        """Bad samples skipped so far, per source kind and reason (as of the last batch handed out)."""
        return {k: dict(s.get("skipped", {})) for k, s in self._state["sources"].items()}

    def close(self) -> None:
        self._drain()
        if self._pool is not None:
            self._pool.shutdown()
        for src in self.mixer.sources.values():  # worker processes (workers.SourceProcess)
            if hasattr(src, "close"):
                src.close()


def processor_for(source: str | Path, config: Any) -> Processor:
    """The processor of a model source: a checkpoint folder (its tokenizer.json) or a preset name."""
    if Path(source).is_dir():
        return Processor.from_folder(source, config.vision.image_size, config.vision.n_tokens)
    from ...checkpoint.init import synthetic_tokenizer  # presets carry a synthetic tokenizer

    return Processor(synthetic_tokenizer(str(source), config), ImageTransform(size=config.vision.image_size),
                     config.vision.n_tokens)


def build(ctx: Any, *, understanding: Any = None, text: Any = None, generation: Any = None, edit: Any = None,
          cfg_drop: float = 0.1, short_caption_p: float = 0.0, edit_drop_text: float = 0.05,
          edit_drop_image: float = 0.05, edit_drop_both: float = 0.05, on_error: str = "raise",
          too_long: str = "error", shuffle: bool = True, shuffle_buffer: int = 512, prefetch: int = 1,
          system_prompt: str | None = None, vae: str | None = None, edit_source: str | None = None,
          edit_layout: str | None = None,
          answer_weighting: str = "token", builtin: Mapping[str, Callable[..., Any]] | None = None,
          worker_processes: bool | int = False) -> TrainData:
    """Data builder for `[data] builder = "januskit.train.data.loader:build"` (ctx: train.config.DataContext).
    Each of understanding / text / generation / edit is a path or list of paths (JSONL manifests, tar shards
    or folders of either), or a table {paths = ..., root = "..."} when a manifest's images live elsewhere.
    cfg_drop, short_caption_p and edit_drop_*: the SampleEncoder's dropout probabilities.
    `answer_weighting`: "token" (every answer token weighs 1, the usual SFT loss) or "turn" (each answer of a
    conversation weighs the same, spread over its tokens; encode.turn_weights).
    `vae`: JanusFlow only, the VAE folder that encodes generation and edit target images (default: the source's vae/).
    `edit_source`: how edit samples' source images enter, "understanding" (SigLIP -> aligner, as in a chat) or
    "vq" (Janus: their VQ tokens through gen_embed -> gen_aligner, input only); default: the source folder's
    own (its generation_config.json), else "understanding". The trained folder records it in its
    generation_config.json so inference builds the same prompts (docs/editing.md).
    `edit_layout`: where understanding sources sit in an edit prompt, "sources_first" (before the instruction,
    as in a chat) or "sources_last" (after it: source slot i a fixed distance before target token i); default:
    the source folder's own, else "sources_first"; recorded the same way.
    `builtin` (for other builders, e.g. januskit.train.data.fresh): kind -> factory called with
    transform=, rank=, world_size=, on_error=, returning a resumable sample iterator used instead of files.
    `worker_processes`: each kind's source reads, decodes and tokenises in a process of its own (workers.py),
    the same samples in the same order; an integer N > 1: each file source in N processes (every one reads
    the records, each decodes every N-th)."""
    c = ctx.model_config
    proc = processor_for(ctx.source, c)
    folder_source = read_edit_source(ctx.source) if Path(ctx.source).is_dir() else EDIT_SOURCES[0]
    edit_source = folder_source if edit_source is None else edit_source
    if edit_source not in EDIT_SOURCES:
        raise ValueError(f"[data] edit_source must be one of {', '.join(EDIT_SOURCES)}, got {edit_source!r}")
    if edit_source == "vq" and c.arch == "janusflow":
        raise ValueError("[data] edit_source 'vq' is for Janus models; JanusFlow takes edit sources through the "
                         "understanding encoder")
    if edit_source == "vq":
        proc.edit_source_slots = c.vq.n_tokens
    folder_layout = read_edit_layout(ctx.source) if Path(ctx.source).is_dir() else EDIT_LAYOUTS[0]
    edit_layout = folder_layout if edit_layout is None else edit_layout
    if edit_layout not in EDIT_LAYOUTS:
        raise ValueError(f"[data] edit_layout must be one of {', '.join(EDIT_LAYOUTS)}, got {edit_layout!r}")
    proc.edit_sources_last = edit_layout == "sources_last"
    model = getattr(ctx, "model", None)
    flow = encode_latents = None
    if c.arch == "janusflow":
        flow = FlowLayout(c.n_gen_tokens, c.vision.image_size, ctx.repa)
        encode_latents = vae_encoder(vae, ctx.source)
    elif vae is not None:
        raise ValueError("[data] vae is for JanusFlow models")
    try:
        enc = SampleEncoder(proc, None if flow else c.vq, seed=ctx.seed, cfg_drop=cfg_drop,
                            short_caption_p=short_caption_p, max_len=ctx.seq_len, too_long=too_long, flow=flow,
                            edit_drop_text=edit_drop_text, edit_drop_image=edit_drop_image,
                            edit_drop_both=edit_drop_both, answer_weighting=answer_weighting,
                            system_prompt=proc.system_prompt if system_prompt is None else system_prompt)
    except ValueError as e:  # a bad option of the [data] table: say where it is set
        raise ValueError(f"[data] {e}") from None
    sources = {}
    for k, (kind, spec) in enumerate(zip(KINDS, (understanding, text, generation, edit))):
        if (make := (builtin or {}).get(kind)) is not None:
            if spec is not None:
                raise ValueError(f"[data] {kind}: given both as files and as a built-in source")
            sources[kind] = make(transform=enc, rank=ctx.rank, world_size=ctx.world, on_error=on_error)
            continue
        if spec is None:
            continue
        opts = dict(spec) if isinstance(spec, dict) else {"paths": spec}
        paths = opts.pop("paths", None)
        if paths is None:
            raise ValueError(f"[data] {kind}: a table needs 'paths' (and optionally 'root')")
        # stride 3, the number of kinds before edit: the older kinds keep their orders (and old runs resume)
        kw = dict(kind=kind, seed=ctx.seed * 3 + k, shuffle=shuffle, rank=ctx.rank, world_size=ctx.world,
                  on_error=on_error, transform=enc)
        sources[kind] = open_source(paths, **{"shuffle_buffer": shuffle_buffer, **kw, **opts})
    n_proc = _process_count(worker_processes)
    if n_proc == 1:
        sources = {k: SourceProcess(src) for k, src in sources.items()}
    elif n_proc > 1:
        sources = {k: ParallelSource(src, n_proc) if isinstance(src, _Source) else SourceProcess(src)
                   for k, src in sources.items()}
    mixer = Mixer(sources, ctx.ratio, ctx.batch_size, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world)
    if flow is not None:
        data = TrainData(mixer, ctx.seq_len, pad_id=proc.pad_id, prefetch=prefetch, encode_latents=encode_latents,
                         latent_shape=c.latent_shape)
    else:
        data = TrainData(mixer, ctx.seq_len, pad_id=proc.pad_id, prefetch=prefetch, codebook_size=c.vq.codebook_size,
                         tokenize_images=vq_tokenizer(model) if model is not None else None)
    settings = {}  # the export copies the source's generation_config.json: say how edit prompts are built
    if edit_source != EDIT_SOURCES[0] or folder_source != EDIT_SOURCES[0]:
        settings["edit_source"] = edit_source
    if edit_layout != EDIT_LAYOUTS[0] or folder_layout != EDIT_LAYOUTS[0]:
        settings["edit_layout"] = edit_layout
    if settings:
        data.model_settings = settings
    return data


def _process_count(worker_processes: bool | int) -> int:
    """[data] worker_processes as a number of processes per source (false: 0, in the trainer; true: 1)."""
    if isinstance(worker_processes, bool):
        return int(worker_processes)
    if not isinstance(worker_processes, int) or worker_processes < 0:
        raise ValueError(f"[data] worker_processes must be true, false or a number of processes >= 0, "
                         f"got {worker_processes!r}")
    return worker_processes


def vae_encoder(vae: str | None, source: str | Path) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Frozen VAE encoder (posterior mean, scaled): the named folder, else the source's vae/, else None."""
    folder = Path(vae) if vae is not None else Path(source) / "vae"
    if vae is None and not folder.is_dir():
        return None
    from ...checkpoint.vae import load_vae

    model = load_vae(folder)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode(pixels)

    return encode
