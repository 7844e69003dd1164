"""One model, one worker thread, a bounded queue, and batches.

A request becomes a `Job`. The worker takes the oldest waiting job plus every later waiting job that
can share its forward passes (same kind, same sampling settings), up to the batch's row budget, and
runs them together:
  - images: one `pipe.generate_batch` over every request's images, so all their CFG rows run side by
    side (Janus: in chunks that fit `memory_budget_gb`), each image sampled from its own generator
    (seed, i) with its request's CFG weight, so a result equals the same request run alone;
  - edits (image-to-image by instruction): the same, with each request's source images and image
    guidance weight; edits batch only with edits (three guidance rows per image, not two);
  - training-free image-to-image (`strength`): one request at a time through `pipe.image_to_image`,
    whose kept tokens / start step and source latents belong to the request;
  - chats: one left-padded batch, each row with generator (seed, 0), streamed per row.
Results, text pieces and progress reach the caller through the job's `sink` (called on the worker
thread). Past `max_queue` waiting jobs `submit` raises `QueueFull`; a cancelled job leaves the queue
at once, and a running batch stops early once every job in it is cancelled.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from ..processing.chat import EncodedChat
from ..processing.image import MAX_IMAGE_PIXELS, load_image
from ..processing.tokenizer import StreamDecoder
from ..sampling.logits import row_generator
from ..sampling.text import generate_text

log = logging.getLogger("januskit.serving")

Sink = Callable[[str, Any], None]  # ("text", str) | ("progress", (done, total)) | ("done", dict) | ("error", Exception)


@dataclass(frozen=True)
class Limits:
    max_queue: int = 32  # jobs waiting to start; one more is refused (HTTP 429)
    max_batch_images: int = 8  # images decoded together (Janus: also capped by memory_budget_gb)
    max_batch_chats: int = 8  # conversations decoded together
    memory_budget_gb: float = 4.0  # Janus image batches: KV cache + activations
    max_n: int = 8  # images per request
    max_tokens: int = 512  # completion tokens per request (also the default)
    max_images_per_request: int = 4
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_prompt_chars: int = 131072  # text per request, checked before tokenising (~0.1 s of it)
    max_body_bytes: int = 16 * 2**20
    timeout_s: float = 600.0  # from submission to the last byte
    read_timeout_s: float = 30.0  # for a request's headers, and between pieces of its body
    batch_window_s: float = 0.025  # how long a fresh job waits for concurrent ones to join its batch
    retry_after_s: int = 2


class QueueFull(Exception):
    pass


class _AllCancelled(Exception):
    pass


@dataclass
class ChatSpec:
    encoded: EncodedChat
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int


@dataclass
class ImageSpec:
    prompt_ids: list[int]
    n: int
    seed: int
    cfg_weight: float
    options: dict[str, Any]  # the architecture's generation options, defaults filled (pipe.image_option_values)
    # An edit (prompt_ids from processor.edit_prompt): its source images, shared by its n images, and the
    # image guidance weight. None for text-to-image. The sources are kept encoded (checked, and decoded by
    # the worker): a decoded 4096x4096 image is 50 MB, its file often a few KB, and max_queue jobs may wait.
    sources: list[bytes] | None = None
    cfg_image: float | None = None


@dataclass
class ImageToImageSpec:
    """Training-free image-to-image (pipe.image_to_image): `image` (encoded, as ImageSpec.sources) kept in
    part, by `strength` in (0, 1]."""
    prompt: str
    image: bytes
    strength: float
    n: int
    seed: int
    cfg_weight: float
    options: dict[str, Any]  # the architecture's options as given (None: image_to_image's default)


ImageKind = Literal["image", "edit", "image-to-image"]


@dataclass(eq=False)
class Job:
    spec: ChatSpec | ImageSpec | ImageToImageSpec
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    @property
    def kind(self) -> Literal["chat"] | ImageKind:
        s = self.spec
        if isinstance(s, ChatSpec):
            return "chat"
        if isinstance(s, ImageToImageSpec):
            return "image-to-image"
        return "image" if s.sources is None else "edit"

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (per-row CFG weights, seeds and edit sources are free).
        An image-to-image job shares with none."""
        s = self.spec
        if isinstance(s, ChatSpec):
            return ("chat", s.temperature, s.top_p)
        if isinstance(s, ImageToImageSpec):
            return ("image-to-image", id(self))
        return (self.kind, *sorted(s.options.items()))

    @property
    def rows(self) -> int:
        return 1 if isinstance(self.spec, ChatSpec) else self.spec.n

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.sink(kind, payload)
        except RuntimeError:  # the receiver's event loop is gone (server shutting down)
            self.cancelled.set()


class Engine:
    """Owns the pipeline; `submit` from any thread, results through each job's sink."""

    def __init__(self, pipe, limits: Limits = Limits(), threads: int | None = None) -> None:
        self.pipe = pipe
        self.limits = limits
        self.threads = threads
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._holds = 0
        self._stop = False
        self.running = 0  # jobs in the batch being decoded
        self.batches: deque[tuple[str, int, int]] = deque(maxlen=256)  # (kind, jobs, rows) of recent batches
        self.completed = 0
        self._thread = threading.Thread(target=self._loop, name="januskit-engine", daemon=True)
        self._thread.start()

    # -- the caller's side --------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is shut down")
            if len(self._pending) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting (the limit is {self.limits.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Free the job's place: out of the queue if waiting, its rows ignored if running."""
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold new batches back (the running one finishes): for maintenance and for tests that need
        requests to pile up deterministically."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            pending, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in pending:
            job.emit("error", RuntimeError("the server is shutting down"))
        self._thread.join(timeout=30)

    # -- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stop and (self._holds or not self._pending):
                    self._cond.wait()
                if self._stop:
                    return
            time.sleep(self.limits.batch_window_s)  # let requests that arrive together share the batch
            with self._cond:
                if self._holds or not self._pending:
                    continue
                batch = self._take()
                self.running = len(batch)
            try:
                self.batches.append((batch[0].kind, len(batch), sum(j.rows for j in batch)))
                if batch[0].kind == "chat":
                    self._run_chats(batch)
                elif batch[0].kind == "image-to-image":
                    self._run_image_to_image(batch)
                else:
                    self._run_images(batch)
            except _AllCancelled:
                log.info("batch of %d dropped: every request in it was cancelled", len(batch))
            except Exception as e:  # a failed batch fails its requests, never the server
                log.exception("batch failed")
                for job in batch:
                    job.emit("error", e)
            finally:
                with self._cond:
                    self.running = 0
                    self.completed += len(batch)

    def _take(self) -> list[Job]:
        head = self._pending.popleft()
        cap = self.limits.max_batch_chats if head.kind == "chat" else self.limits.max_batch_images
        batch, rows = [head], head.rows
        for job in list(self._pending):
            if job.key == head.key and rows + job.rows <= cap:
                self._pending.remove(job)
                batch.append(job)
                rows += job.rows
        return batch

    def _run_chats(self, jobs: list[Job]) -> None:
        pipe = self.pipe
        tok = pipe.processor.tokenizer
        eos = tok.eos_id
        s0 = jobs[0].spec
        batch = pipe.processor.batch([j.spec.encoded for j in jobs])
        steps = generate_text(pipe.model, batch, max_new_tokens=max(j.spec.max_tokens for j in jobs), stop_ids=[eos],
                              temperature=s0.temperature, top_p=s0.top_p,
                              generators=[row_generator(j.spec.seed, 0) for j in jobs])
        decoders = [StreamDecoder(tok, lstrip=True) for _ in jobs]  # answers start at their text, as pipe.chat's
        counts = [0] * len(jobs)
        finish: list[str | None] = [None] * len(jobs)

        def end(r: int, reason: str) -> None:
            finish[r] = reason
            job = jobs[r]
            if reason == "cancelled":
                return
            tail = decoders[r].flush()
            if tail:
                job.emit("text", tail)
            job.emit("done", {"finish_reason": reason, "prompt_tokens": len(job.spec.encoded.ids),
                              "completion_tokens": counts[r]})

        try:
            for toks in steps:
                for r, (job, t) in enumerate(zip(jobs, toks.tolist())):
                    if finish[r] is not None:
                        continue
                    if job.cancelled.is_set():
                        end(r, "cancelled")
                    elif t < 0 or t == eos:
                        end(r, "stop")
                    else:
                        counts[r] += 1
                        piece = decoders[r].push(t)
                        if piece:
                            job.emit("text", piece)
                        if counts[r] >= job.spec.max_tokens:
                            end(r, "length")
                if all(f is not None for f in finish):
                    break
        finally:
            steps.close()
        for r in range(len(jobs)):
            if finish[r] is None:  # the context filled up before the row stopped
                end(r, "cancelled" if jobs[r].cancelled.is_set() else "length")

    @staticmethod
    def _progress(jobs: list[Job]) -> Callable[[int, int], None]:
        """The sampler's progress callback: percentages to every job; stops the batch (_AllCancelled)
        once every job in it is cancelled."""
        last = [-1]

        def progress(done: int, total: int) -> None:
            if all(j.cancelled.is_set() for j in jobs):
                raise _AllCancelled
            pct = int(100 * done / total)
            if pct != last[0]:  # at most ~100 progress events per batch
                last[0] = pct
                for j in jobs:
                    j.emit("progress", (pct, 100))

        return progress

    def _run_images(self, jobs: list[Job]) -> None:
        rows = [(job, i) for job in jobs for i in range(job.spec.n)]
        edit: dict[str, Any] = {}
        if jobs[0].kind == "edit":  # every job of the batch is (equal keys)
            sources = {id(job): self._decode(job.spec.sources) for job in jobs}  # once per job, not per image
            edit = dict(sources=[sources[id(job)] for job, _ in rows], cfg_image=[job.spec.cfg_image for job, _ in rows])
        out = self.pipe.generate_batch([job.spec.prompt_ids for job, _ in rows],
                                       generators=[row_generator(job.spec.seed, i) for job, i in rows],
                                       cfg_weight=[job.spec.cfg_weight for job, _ in rows],
                                       memory_budget_gb=self.limits.memory_budget_gb, progress=self._progress(jobs),
                                       **edit, **jobs[0].spec.options)
        self._deliver(jobs, out.pil())

    def _run_image_to_image(self, jobs: list[Job]) -> None:
        (job,) = jobs
        s = job.spec
        out = self.pipe.image_to_image(s.prompt, self._decode([s.image])[0], strength=s.strength, n=s.n, seed=s.seed,
                                       cfg_weight=s.cfg_weight, memory_budget_gb=self.limits.memory_budget_gb,
                                       progress=self._progress(jobs), **s.options)
        self._deliver(jobs, out.images)

    def _decode(self, images: list[bytes]) -> list[Image.Image]:
        """Checked when the job was made (specs.edit_spec), so within the server's limits."""
        return [load_image(b, max_pixels=self.limits.max_image_pixels) for b in images]

    @staticmethod
    def _deliver(jobs: list[Job], images: list[Image.Image]) -> None:
        """Each job its own n images, in order."""
        at = 0
        for job in jobs:
            part = images[at:at + job.spec.n]
            at += job.spec.n
            if not job.cancelled.is_set():
                job.emit("done", {"images": part, "seed": job.spec.seed})
