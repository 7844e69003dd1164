"""Training data on disk: the sample format (docs/data-format.md), its validation, and two readers.

JSONL manifests are read by line offset (random access, so an epoch is one global permutation);
WebDataset-style tar shards are read sequentially (shards permuted per epoch, samples shuffled in a
bounded buffer). Both readers are endless, seeded iterators for one (rank, world_size) whose
position `state_dict()` / `load_state_dict()` save and restore exactly: a resumed run yields the
samples an uninterrupted run would. A bad sample raises `DataError` naming file:line or
shard:member; with on_error="skip" it is logged and counted instead (`source.skipped`).
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import re
import reprlib
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from ...processing.chat import Message
from ...processing.image import MAX_IMAGE_PIXELS, ImageError, ImageTooLarge, load_image
from ...processing.tokenizer import IMAGE_TOKEN

log = logging.getLogger(__name__)

KINDS = ("understanding", "text", "generation", "edit")
KIND_CODE = {k: i for i, k in enumerate(KINDS)}  # TrainBatch.kinds values (and the loss's metric buckets)
SHORT = dict(zip(KINDS, ("und", "text", "gen", "edit")))  # in metric names: loss_und, loss_text, loss_gen, ...
IMAGE_KINDS = ("generation", "edit")  # kinds whose loss is on a generated image (VQ ids or a flow latent)
_FIELDS = {  # known fields each kind may carry; other known fields are an error, unknown ones are ignored
    "understanding": {"messages", "images", "system"},
    "text": {"messages", "text", "system"},
    "generation": {"caption", "image", "vq_ids"},
    "edit": {"instruction", "images", "target", "vq_ids"},
}
_KNOWN = set().union(*_FIELDS.values())
# The extensions of load_image's default formats (PNG, JPEG, WEBP, GIF, BMP). TIFF is left out on purpose:
# load_image refuses it (multi-page, many codecs, a less exercised decoder), so a .tif member is not an image.
_IMAGE_MEMBER = re.compile(r"^(\d+)\.(png|jpe?g|webp|bmp|gif)$", re.IGNORECASE)
_TARGET_MEMBER = re.compile(r"^target\.(png|jpe?g|webp|bmp|gif)$", re.IGNORECASE)  # an edit's default target
_SINGLE = ("image", "target")  # image fields holding one reference (the others hold a list)
_MAX_VQ_ID = 2**31  # far above any codebook (16384); bounds ids before they become int64 tensors
_LOG_FIRST, _LOG_EVERY = 20, 1000  # skip logging: every one of the first 20, then every 1000th


class DataError(ValueError):
    """A bad sample. `where` is "file.jsonl:LINE" or "shard.tar:MEMBER"; `reason` is the skip counter key
    (json, kind, field, path, image, vq_ids, length, shard, empty)."""

    def __init__(self, where: str, message: str, reason: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message, self.reason = where, message, reason

    def __reduce__(self) -> tuple:  # picklable (a worker process sends it to the trainer)
        return DataError, (self.where, self.message, self.reason)


_REPR = reprlib.Repr()  # values from the data go into error messages and logs: keep them short
_REPR.maxstring, _REPR.maxother = 80, 80


def _show(v: Any) -> str:
    """repr of a value from the data, for an error message: bounded in size and depth, surrogates escaped."""
    try:
        return _REPR.repr(v)
    except (ValueError, RecursionError):  # an int past Python's 4300-digit str() limit; depth is capped already
        return f"<{type(v).__name__}>"


def _text(v: str, what: str, where: str, reason: str = "field") -> str:
    """`v` if it is valid Unicode. JSON's "\\ud800" decodes to a lone surrogate, which no encoder (tokenizer,
    file system, log) accepts; caught here, it is a DataError naming the field instead of a crash later."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(where, f"{what} is not valid Unicode: lone surrogate {v[e.start]!r} at character "
                               f"{e.start}", reason) from None
    return v


def _loads(raw: bytes, where: str) -> Any:
    """One JSON document (a manifest line, a shard's .json member) -> its value, or DataError naming `where`."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(where, f"not UTF-8 ({e})", "json") from None
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise DataError(where, f"malformed JSON: {e.msg} at {at}", "json") from None
    except RecursionError:  # the C decoder recurses per bracket: "[" * 200000 overflows the stack
        raise DataError(where, "malformed JSON: nested too deeply", "json") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int-from-str limit)
        raise DataError(where, f"malformed JSON: {e}", "json") from None


@dataclass
class Sample:
    """One validated sample as read from disk (images decoded, not yet tokenised)."""

    kind: str
    key: str  # where it came from, "file.jsonl:LINE" or "shard.tar:KEY"; names the sample in errors
    epoch: int = 0  # the pass over the data that produced it (seeds per-sample randomness such as CFG drop)
    messages: list[Message] | None = None  # understanding / text conversation (roles user, assistant)
    system: str | None = None  # system prompt override; None = the default
    text: str | None = None  # text document
    caption: str | None = None  # generation prompt
    images: list[Image.Image] = field(default_factory=list)  # RGB, in <image_placeholder> order (edit: sources)
    vq_ids: list[int] | None = None  # cached VQ ids of the generation image (edit: of the target)
    instruction: str | None = None  # edit instruction
    target: Image.Image | None = None  # edit: the image to produce (None when vq_ids are given)
    placed: bool = False  # understanding: the record had no markers, so its images were put first (see parse_record)


# ----------------------------------------------------------------------------------- record validation
ImageFetch = Callable[[list[str] | None, str], list[Image.Image]]  # (refs or None, field name) -> images


def parse_record(obj: Any, where: str, fetch: ImageFetch, expect_kind: str | None = None, epoch: int = 0) -> Sample:
    """A decoded JSON object -> Sample, or DataError naming `where`. `fetch` loads the image references."""
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {type(obj).__name__}", "json")
    if "kind" not in obj:
        raise DataError(where, f"missing field 'kind' ({', '.join(KINDS)})", "field")
    kind = obj["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise DataError(where, f"unknown kind {_show(kind)}; expected one of {', '.join(KINDS)}", "kind")
    if expect_kind is not None and kind != expect_kind:
        raise DataError(where, f"kind {kind!r} in a source of {expect_kind!r} samples", "kind")
    extra = sorted((_KNOWN - _FIELDS[kind]) & obj.keys())
    if extra:  # e.g. "image" on an understanding sample: almost surely a typo for "images"
        raise DataError(where, f"field(s) {', '.join(extra)} are not used by {kind} samples "
                               f"(allowed: {', '.join(sorted(_FIELDS[kind]))})", "field")
    system = obj.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(where, f"'system' must be a string, got {type(system).__name__}", "field")
        _text(system, "'system'", where)
        if IMAGE_TOKEN in system:
            raise DataError(where, f"'system' contains {IMAGE_TOKEN}, which only user messages may use", "field")
    if kind == "understanding":
        refs = _str_list(obj, "images", where)
        msgs = _messages(obj, where, allow_images=True)
        images = fetch(refs, "images")
        n_marks = sum(m.content.count(IMAGE_TOKEN) for m in msgs)
        placed = n_marks == 0 and bool(images)
        if placed:  # no markers: images go first in the first user turn, one per line (the encoder moves them
            # after the text for a model whose processor places them there)
            msgs[0] = Message("user", "".join(f"{IMAGE_TOKEN}\n" for _ in images) + msgs[0].content)
        elif n_marks != len(images):
            raise DataError(where, f"{n_marks} {IMAGE_TOKEN} marker(s) but {len(images)} image(s)", "field")
        return Sample(kind, where, epoch, messages=msgs, system=system, images=images, placed=placed)
    if kind == "text":
        if ("text" in obj) == ("messages" in obj):
            raise DataError(where, "a text sample needs exactly one of 'text' (document) or 'messages' (conversation)",
                            "field")
        if "messages" in obj:
            return Sample(kind, where, epoch, messages=_messages(obj, where, allow_images=False), system=system)
        return Sample(kind, where, epoch, text=_plain(obj, "text", where))
    if kind == "edit":
        instruction = _plain(obj, "instruction", where)
        sources = fetch(_str_list(obj, "images", where), "images")
        if not sources:
            raise DataError(where, "an edit sample needs at least one source image in 'images'", "field")
        vq = _vq_ids(obj, where)
        need = "an edit sample needs a 'target' image"
        target = None if vq is not None else _one_image(obj, "target", where, fetch, need)  # ids: image not needed
        return Sample(kind, where, epoch, instruction=instruction, images=sources, vq_ids=vq, target=target)
    caption = _plain(obj, "caption", where)
    vq = _vq_ids(obj, where)
    if vq is not None:
        return Sample(kind, where, epoch, caption=caption, vq_ids=vq)  # cached ids: the image is not needed
    image = _one_image(obj, "image", where, fetch, "a generation sample needs one image")
    return Sample(kind, where, epoch, caption=caption, images=[image])


def _vq_ids(obj: dict, where: str) -> list[int] | None:
    """The cached 'vq_ids' of a generated image, or None; the codebook size is checked when encoding."""
    vq = obj.get("vq_ids")
    if vq is None:
        return None
    if not isinstance(vq, list):
        raise DataError(where, f"'vq_ids' must be a list of integers, got {type(vq).__name__}", "vq_ids")
    for i, v in enumerate(vq):
        if not isinstance(v, int) or isinstance(v, bool):
            raise DataError(where, f"'vq_ids' must be a list of integers; item {i} is {_show(v)}", "vq_ids")
        if not 0 <= v < _MAX_VQ_ID:
            raise DataError(where, f"'vq_ids' are codebook indices in [0, 2**31); item {i} is {_show(v)}", "vq_ids")
    return vq


def _one_image(obj: dict, name: str, where: str, fetch: ImageFetch, need: str) -> Image.Image:
    """The single image of field `name` (a generation's 'image', an edit's 'target'), fetched; `need`
    says what is missing when there is none."""
    ref = obj.get(name)
    if ref is not None:
        if not isinstance(ref, str):
            raise DataError(where, f"{name!r} must be a string (a path relative to the dataset root)", "field")
        _text(ref, repr(name), where, "path")
    images = fetch(None if ref is None else [ref], name)
    if len(images) != 1:
        raise DataError(where, f"{need} (or 'vq_ids'), found {len(images)}", "field")
    return images[0]


def _plain(obj: dict, name: str, where: str) -> str:
    v = obj.get(name)
    if v is None:
        raise DataError(where, f"missing field {name!r}", "field")
    if not isinstance(v, str) or not v.strip():
        raise DataError(where, f"{name!r} must be a non-empty string", "field")
    _text(v, repr(name), where)
    if IMAGE_TOKEN in v:
        raise DataError(where, f"{name!r} contains {IMAGE_TOKEN}, which only understanding messages may use", "field")
    return v


def _str_list(obj: dict, name: str, where: str) -> list[str] | None:
    v = obj.get(name)
    if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
        raise DataError(where, f"{name!r} must be a list of strings", "field")
    for i, x in enumerate(v or []):
        _text(x, f"{name!r} item {i}", where, "path")
    return v


def _messages(obj: dict, where: str, allow_images: bool) -> list[Message]:
    raw = obj.get("messages")
    if raw is None:
        raise DataError(where, "missing field 'messages'", "field")
    if not isinstance(raw, list) or not raw:
        raise DataError(where, "'messages' must be a non-empty list", "field")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(where, f"message {i}: expected {{\"role\": ..., \"content\": \"...\"}}", "field")
        role, content = m.get("role"), m["content"]
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise DataError(where, f"message {i}: role {_show(role)}, expected {want!r} (turns alternate, user "
                                   f"first)", "field")
        if not content.strip():
            raise DataError(where, f"message {i}: empty content", "field")
        _text(content, f"message {i}: content", where)
        if IMAGE_TOKEN in content and (role == "assistant" or not allow_images):
            where_ok = "user turns of understanding samples" if allow_images else "understanding samples"
            raise DataError(where, f"message {i}: {IMAGE_TOKEN} is only allowed in {where_ok}", "field")
        out.append(Message(role, content))
    if out[-1].role != "assistant":
        raise DataError(where, "the last message must be the assistant's (only answers carry loss)", "field")
    return out


def _decode(data: bytes, where: str, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image bytes -> RGB, or DataError. load_image checks format and size from the header before decoding,
    so a tiny file that would decode to gigabytes costs nothing."""
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as e:
        detail = str(e).removeprefix("image <bytes>: ")  # load_image names its source; `where` does here
        if not data:
            msg = "empty file (0 bytes)"
        else:  # load_image says what is wrong: "not a readable image ...", or the size and the limit
            msg = f"too large: {detail}" if isinstance(e, ImageTooLarge) else detail
        raise DataError(where, f"image {_show(name)}: {msg}", "image") from None


def resolve_image_path(root: Path, ref: str, where: str) -> Path:
    """`ref` relative to the dataset root -> its path; DataError for absolute paths, '..', symlinks out and
    strings that are no path at all (NUL bytes, lone surrogates, symlink loops)."""
    if not ref:
        raise DataError(where, "empty image path", "path")
    if "\0" in ref:  # the OS cannot even look it up: os.stat raises ValueError("embedded null byte")
        raise DataError(where, f"image path {_show(ref)} contains a NUL byte", "path")
    _text(ref, f"image path {_show(ref)}", where, "path")
    if PurePosixPath(ref).is_absolute() or PureWindowsPath(ref).is_absolute() or PureWindowsPath(ref).drive:
        raise DataError(where, f"image path {_show(ref)} is absolute; paths must be relative to the dataset root",
                        "path")
    if ".." in PurePosixPath(ref.replace("\\", "/")).parts:
        raise DataError(where, f"image path {_show(ref)} contains '..'; paths must stay inside the dataset root",
                        "path")
    path = root / ref
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (pathlib before Python 3.13)
        raise DataError(where, f"image path {_show(ref)} cannot be resolved ({e})", "path") from None
    if not real.is_relative_to(root.resolve()):
        raise DataError(where, f"image path {_show(ref)} leads outside the dataset root (symlink to {real})", "path")
    return path


def read_image_file(root: Path, ref: str, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    path = resolve_image_path(root, ref, where)
    try:
        if not path.is_file():
            raise DataError(where, f"image {_show(ref)} not found (looked for {path})", "image")
        data = path.read_bytes()
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # a name the file system cannot hold: a bad path, not a bad file
            raise DataError(where, f"image path {_show(ref)} is too long ({e.strerror})", "path") from None
        raise DataError(where, f"image {_show(ref)} cannot be read ({e.strerror or e})", "image") from None
    return _decode(data, where, ref, max_pixels)


def file_fetch(root: Path, where: str, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFetch:
    """The ImageFetch of a manifest line at `where`: references are image files under the dataset root."""
    def fetch(refs: list[str] | None, name: str) -> list[Image.Image]:
        if refs is None and name in _SINGLE:
            raise DataError(where, f"missing field {name!r} (or 'vq_ids')", "field")
        return [read_image_file(root, r, where, max_pixels) for r in refs or []]

    return fetch


# ------------------------------------------------------------------------------------------- readers
class _Source:
    """Shared by both readers: error policy, per-sample transform, epochs, counters, common state."""

    def __init__(self, *, kind: str | None, seed: int, shuffle: bool, rank: int, world_size: int, on_error: str,
                 transform: Callable[[Sample], Any] | None, epochs: int | None, max_image_pixels: int) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)} or None, got {kind!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive integer, got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels  # images are refused from their header above this
        self.kind, self.seed, self.shuffle, self.rank, self.world_size = kind, seed, shuffle, rank, world_size
        self.on_error, self.transform, self.epochs = on_error, transform, epochs
        self.epoch = 0
        self.skipped: Counter[str] = Counter()  # reason -> bad samples skipped so far (on_error="skip")
        self._good = 0  # samples yielded in the current epoch (an epoch with none would loop forever)
        self._check_empty = True  # off in a parallel worker's copy (workers.py): the trainer's side checks
        self._log_skips = True  # off in all but one parallel worker (they all see the same unreadable shards)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        while True:
            item = self._advance()
            try:
                sample = self._parse(item)
                out = self.transform(sample) if self.transform is not None else sample
            except DataError as e:
                if self.on_error == "raise":
                    raise
                self._skip(e)
                continue
            self._good += 1
            return out

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def _skip(self, e: DataError) -> None:
        self.skipped[e.reason] += 1
        n = self.n_skipped
        if self._log_skips and (n <= _LOG_FIRST or n % _LOG_EVERY == 0):
            log.warning("skipping bad sample (%d skipped so far: %s): %s", n, dict(self.skipped), e)

    def _end_epoch(self) -> None:
        if self._good == 0 and self._check_empty:
            raise DataError(self._name(), f"epoch {self.epoch} of rank {self.rank}/{self.world_size} yielded no "
                                          f"usable sample (skipped: {dict(self.skipped)})", "empty")
        self.epoch += 1
        self._good = 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration

    def _common_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "good": self._good, "skipped": dict(self.skipped), "seed": self.seed,
                "shuffle": self.shuffle, "rank": self.rank, "world_size": self.world_size,
                "fingerprint": self._fingerprint()}

    def _load_common(self, st: dict[str, Any]) -> None:
        for k in ("seed", "shuffle", "rank", "world_size", "fingerprint"):
            if st[k] != self._common_state()[k]:
                raise ValueError(f"{self._name()}: cannot resume: {k} was {st[k]!r} in the checkpoint, "
                                 f"now {self._common_state()[k]!r} (the order would differ)")
        self.epoch, self._good, self.skipped = st["epoch"], st["good"], Counter(st["skipped"])

    def _reshard(self, states: list[dict[str, Any]], rank: int, world: int,
                 used: Callable[[dict[str, Any]], int]) -> tuple[dict[str, Any], int]:
        """What ManifestSource.reshard and TarSource.reshard share: the common state of this rank among `world`
        ranks (the furthest epoch any old rank is in, the skip counts to rank 0) and the new ranks' offset in that
        epoch's permutation: one past the furthest position an old rank used (`used(state)`: how many of its own
        positions, lines or shards, it has started), old rank r having used offset + r, offset + r + W, ..."""
        w = len(states)
        epoch = max(int(st["epoch"]) for st in states)
        current = [r for r, st in enumerate(states) if int(st["epoch"]) == epoch]
        offset = [int(states[r].get("offset", 0)) for r in current]  # the same for every rank in an epoch
        ends = [o + r + w * (used(states[r]) - 1) + 1 for o, r in zip(offset, current) if used(states[r])]
        skipped = sum((Counter(st["skipped"]) for st in states), Counter()) if rank == 0 else Counter()
        good = sum(int(states[r]["good"]) for r in current)
        return {**states[0], "epoch": epoch, "good": good, "skipped": dict(skipped), "rank": rank,
                "world_size": world}, max(ends, default=max(offset))

    # subclass hooks
    def _advance(self) -> Any: ...
    def _parse(self, item: Any) -> Sample: ...
    def _fingerprint(self) -> Any: ...
    def _name(self) -> str: ...


def _files(paths: str | Path | Sequence[str | Path], suffix: str, what: str) -> list[Path]:
    """Named files, plus every `*{suffix}` in named folders (sorted); anything missing is an error."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob(f"*{suffix}"))
            if not found:
                raise FileNotFoundError(f"{p}: no *{suffix} {what} in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:  # a relative path: say where it was looked for (configs' paths are not relative to their file)
            where = "" if p.is_absolute() else f" (relative paths resolve against the working directory {Path.cwd()})"
            raise FileNotFoundError(f"{p}: no such {what} file or folder{where}")
    return out


def jsonl_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:LINE", parsed value) for every non-blank line of a JSON-lines file, read as it goes; a line
    that is not UTF-8 JSON is a DataError naming it. Lines are split at b"\\n" only, as ManifestSource counts them."""
    with open(path, "rb") as fh:  # decoded per line, so a bad byte is reported with its line
        for n, line in enumerate(fh, start=1):
            if line.strip():
                where = f"{path}:{n}"
                yield where, _loads(line, where)


def _jsonl_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    return _files(paths, ".jsonl", "manifest")


class ManifestSource(_Source):
    """Samples from JSONL manifests. `paths`: manifest files and/or folders (every *.jsonl in a folder,
    sorted). Image paths are relative to `root`, by default the folder holding each manifest.
    An epoch is a seeded permutation of all lines; rank r takes every world_size-th from position r."""

    def __init__(self, paths: str | Path | Sequence[str | Path], *, root: str | Path | None = None,
                 kind: str | None = None, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 on_error: str = "raise", transform: Callable[[Sample], Any] | None = None,
                 epochs: int | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        super().__init__(kind=kind, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size, on_error=on_error,
                         transform=transform, epochs=epochs, max_image_pixels=max_image_pixels)
        self.files = _jsonl_files(paths)
        self.roots = [Path(root) if root is not None else f.parent for f in self.files]
        file_idx, offsets, lines = [], [], []
        for i, f in enumerate(self.files):  # index non-blank lines by byte offset: random access, small memory
            off = 0
            with open(f, "rb") as fh:
                for n, line in enumerate(fh, start=1):
                    if line.strip():
                        file_idx.append(i), offsets.append(off), lines.append(n)
                    off += len(line)
        self._file = np.asarray(file_idx, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._line = np.asarray(lines, dtype=np.int64)
        if len(self) < world_size:
            raise ValueError(f"{self._name()}: {len(self)} samples cannot be split over {world_size} ranks")
        self.pos = 0  # index into this rank's order for the current epoch
        self.offset = 0  # where this rank's stride starts in the current epoch's permutation (0 but after a reshard)
        self._order_key, self._order = None, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Samples in the manifest(s), all ranks together."""
        return len(self._offset)

    def _name(self) -> str:
        return str(self.files[0]) + (f" (+{len(self.files) - 1} more)" if len(self.files) > 1 else "")

    def _fingerprint(self) -> Any:
        return [len(self), [f.name for f in self.files]]

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch` (the same permutation on every rank, split by stride, from
        `offset` in the epoch a reshard continued)."""
        if self._order_key != (epoch, self.offset):
            n = len(self)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_key, self._order = (epoch, self.offset), perm[self.offset + self.rank::self.world_size]
        return self._order

    def _advance(self) -> int:
        while self.pos >= len(self.order(self.epoch)):  # (a resharded epoch may have nothing left for this rank)
            self._end_epoch()
            self.pos = self.offset = 0
        i = int(self.order(self.epoch)[self.pos])
        self.pos += 1
        return i

    def where(self, i: int) -> str:
        return f"{self.files[self._file[i]]}:{self._line[i]}"

    def _parse(self, i: int) -> Sample:
        where, root = self.where(i), self.roots[self._file[i]]
        with open(self.files[self._file[i]], "rb") as fh:
            fh.seek(int(self._offset[i]))
            raw = fh.readline()
        obj = _loads(raw, where)
        return parse_record(obj, where, file_fetch(root, where, self.max_image_pixels), self.kind, self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**self._common_state(), "pos": self.pos, "offset": self.offset}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self._load_common(st)
        self.pos, self.offset = st["pos"], st.get("offset", 0)  # (no offset: a checkpoint from before reshard)

    def reshard(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's position among `world` ranks from the states of a run with len(states) ranks: the new
        ranks go on in the furthest epoch any old rank is in, striding from one past the furthest line taken in
        it. No line is taken twice in the epoch; the lines a lagging old rank had not reached yet are passed over
        for this epoch."""
        out, offset = self._reshard(states, rank, world, lambda st: int(st["pos"]))
        return {**out, "pos": 0, "offset": offset}


def _tar_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    return _files(paths, ".tar", "shard")


_Group = tuple[str, dict[str, tuple[str, bytes | None]]]  # (key, {suffix: (member name, data or None)})


def _tar_groups(path: Path) -> Iterator[_Group]:
    """Consecutive members sharing a key ("dir/000012.json", "dir/000012.0.png" -> key "dir/000012")."""
    key, members = None, {}
    with tarfile.open(path, "r|*") as tf:  # stream mode: one sequential pass, works on pipes too
        for m in tf:
            if m.isdir():
                continue
            # tarfile decodes names with surrogateescape; a non-UTF-8 name would carry lone surrogates into
            # the sample key (hashed as UTF-8 for CFG drop) and the logs, so show those bytes escaped instead
            mname = m.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            folder, _, base = mname.rpartition("/")
            stem, _, suffix = base.partition(".")
            k = f"{folder}/{stem}" if folder else stem
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            f = tf.extractfile(m) if m.isfile() else None
            members[suffix] = (mname, f.read() if f is not None else None)
    if key is not None:
        yield key, members


def _buffer_shuffle(items: Iterator, rng: np.random.Generator, size: int) -> Iterator:
    """Seeded shuffle with a bounded buffer: replaying it with the same rng gives the same order."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = it
    for j in rng.permutation(len(buf)):
        yield buf[j]


class TarSource(_Source):
    """Samples from WebDataset-style tar shards (`paths`: .tar files and/or folders of them). Each epoch
    permutes the shards and rank r reads every world_size-th; within a shard, samples pass through a
    seeded shuffle buffer. The position (shard, samples taken) is replayed on resume without decoding."""

    def __init__(self, paths: str | Path | Sequence[str | Path], *, kind: str | None = None, seed: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 512, rank: int = 0, world_size: int = 1,
                 on_error: str = "raise", transform: Callable[[Sample], Any] | None = None,
                 epochs: int | None = None, max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        super().__init__(kind=kind, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size, on_error=on_error,
                         transform=transform, epochs=epochs, max_image_pixels=max_image_pixels)
        self.shards = _tar_files(paths)
        if len(self.shards) < world_size:  # shard-level split: each rank needs at least one shard
            raise ValueError(f"{len(self.shards)} tar shard(s) cannot be split over {world_size} ranks; "
                             f"write at least {world_size} shards (or use a JSONL manifest)")
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.shard_pos, self.taken = 0, 0  # index into this rank's shard list; samples taken from that shard
        self.offset = 0  # where this rank's stride starts in the current epoch's shard permutation (see reshard)
        self._stream: Iterator[_Group] | None = None
        self._order_key, self._order = None, []

    def _name(self) -> str:
        return str(self.shards[0].parent)

    def _fingerprint(self) -> Any:
        return [[s.name for s in self.shards], self.shuffle_buffer]

    def shard_order(self, epoch: int) -> list[int]:
        """This rank's shards for `epoch` (the same permutation on every rank, split by stride, from `offset` in
        the epoch a reshard continued)."""
        if self._order_key != (epoch, self.offset):
            n = len(self.shards)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_key = (epoch, self.offset)
            self._order = [int(i) for i in perm[self.offset + self.rank::self.world_size]]
        return self._order

    def _open(self, shard: int, skip: int) -> Iterator[_Group]:
        rng = np.random.default_rng([self.seed, self.epoch, shard, 1])
        return itertools.islice(_buffer_shuffle(_tar_groups(self.shards[shard]), rng, self.shuffle_buffer), skip, None)

    def _advance(self) -> tuple[Path, _Group]:
        while True:
            order = self.shard_order(self.epoch)
            if self._stream is None:
                if self.shard_pos >= len(order):
                    self._end_epoch()
                    self.shard_pos = self.taken = self.offset = 0
                    continue
                self._stream = self._open(order[self.shard_pos], self.taken)
            shard = self.shards[order[self.shard_pos]]
            try:
                g = next(self._stream)
            except StopIteration:
                g = None
            except (tarfile.TarError, OSError, EOFError) as e:  # a truncated or corrupt shard
                err = DataError(str(shard), f"unreadable tar shard after {self.taken} sample(s) ({e})", "shard")
                if self.on_error == "raise":
                    raise err from e
                self._skip(err)
                g = None
            if g is None:
                self._stream, self.shard_pos, self.taken = None, self.shard_pos + 1, 0
                continue
            self.taken += 1
            return shard, g

    def _parse(self, item: tuple[Path, _Group]) -> Sample:
        shard, (key, members) = item
        where = f"{shard}:{key}"
        if "json" not in members:
            raise DataError(where, f"no {key}.json member (members: {', '.join(sorted(members))})", "field")
        name, data = members["json"]
        jwhere = f"{shard}:{name}"
        obj = _loads(data or b"", jwhere)

        def member(suffix: str) -> Image.Image:
            if suffix not in members:
                raise DataError(where, f"image member {_show(f'{key}.{suffix}')} not found in the shard", "image")
            mname, mdata = members[suffix]
            if mdata is None:
                raise DataError(f"{shard}:{mname}", "not a regular file", "image")
            return _decode(mdata, f"{shard}:{mname}", mname, self.max_image_pixels)

        def fetch(refs: list[str] | None, name: str) -> list[Image.Image]:
            if refs is not None:  # given as member suffixes, e.g. ["0.png", "1.jpg"]
                return [member(r) for r in refs]
            if name == "target":  # an edit's target: the key.target.<ext> member (its sources are numbered)
                found = sorted(s for s in members if _TARGET_MEMBER.match(s))
                if len(found) != 1:
                    raise DataError(where, f"missing 'target': expected one {key}.target.<png|jpg|...> member, "
                                           f"found {len(found)}", "field")
                return [member(found[0])]
            idx = {int(m.group(1)): s for s in members if (m := _IMAGE_MEMBER.match(s))}
            for i in range(len(idx)):
                if i not in idx:
                    raise DataError(where, f"image members are not numbered 0..{len(idx) - 1}: {key}.{i}.* missing",
                                    "image")
            return [member(idx[i]) for i in range(len(idx))]

        return parse_record(obj, jwhere, fetch, self.kind, self.epoch)

    def __getstate__(self) -> dict[str, Any]:
        """For a worker process (workers.SourceProcess): the open shard stream stays behind; it reopens at its
        position (shard_pos, taken)."""
        return {**self.__dict__, "_stream": None}

    def state_dict(self) -> dict[str, Any]:
        return {**self._common_state(), "shard_pos": self.shard_pos, "taken": self.taken, "offset": self.offset}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self._load_common(st)
        self.shard_pos, self.taken, self._stream = st["shard_pos"], st["taken"], None
        self.offset = st.get("offset", 0)  # (none: a checkpoint from before reshard)

    def reshard(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's position among `world` ranks from the states of a run with len(states) ranks, as
        ManifestSource.reshard does with shards for samples: the new ranks stride from one past the furthest
        shard any old rank opened in the furthest epoch; the rest of the shards the old ranks were reading, and
        the shards below that one they had not reached, are passed over for this epoch."""
        out, offset = self._reshard(states, rank, world, lambda st: int(st["shard_pos"]) + bool(int(st["taken"])))
        return {**out, "shard_pos": 0, "taken": 0, "offset": offset}


def open_source(paths: str | Path | Sequence[str | Path], *, root: str | Path | None = None,
                shuffle_buffer: int = 512, **kw: Any) -> ManifestSource | TarSource:
    """A reader for `paths`: tar shards (*.tar, or a folder of them) or JSONL manifests (*.jsonl, or a
    folder of them); `root` applies to manifests, `shuffle_buffer` to shards. A folder holding both
    kinds is ambiguous and refused."""
    ps = [paths] if isinstance(paths, (str, Path)) else list(paths)
    tar = jsonl = False
    for p in map(Path, ps):
        if p.is_dir():
            t, j = any(p.glob("*.tar")), any(p.glob("*.jsonl"))
            if t and j:
                raise ValueError(f"{p}: holds both *.tar shards and *.jsonl manifests; pass the files you mean")
            tar, jsonl = tar or t, jsonl or j
        else:
            tar, jsonl = tar or p.suffix == ".tar", jsonl or p.suffix != ".tar"
    if tar and jsonl:
        raise ValueError("mixing tar shards and JSONL manifests in one source is not supported; make two sources")
    if tar:
        if root is not None:
            raise ValueError("root= applies to JSONL manifests; tar shards carry their images")
        return TarSource(ps, shuffle_buffer=shuffle_buffer, **kw)
    return ManifestSource(ps, root=root, **kw)
