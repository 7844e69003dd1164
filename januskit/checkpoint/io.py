"""Read and write checkpoint folders: safetensors (single or sharded) and `pytorch_model*.bin`.

Tensors are read one at a time from memory-mapped files and assigned straight into a model built on
the meta device, so loading never holds a second full copy. Loading is strict: missing, unexpected and
wrong-shape keys are reported by name, except the entries a layout declares as known-unused.
Writing goes to a temporary folder renamed into place, so a crash never leaves a half-written
checkpoint where a complete one is expected.

A folder is untrusted input: every file read must resolve inside it (config.folder_file), and every
tensor must be floating point (no Janus checkpoint holds another kind; an integer tensor would only
fail later, or be copied on by a conversion).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import folder_file, read_json_object


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and key."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in the order the index (if any) lists them."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if not (folder / name).is_file():
            continue
        p = folder_file(folder, name, CheckpointError)
        if name.endswith(".index.json"):
            weight_map = read_json_object(p, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(s, str) for s in weight_map.values()):
                raise CheckpointError(f"{p}: weight_map must be a non-empty object of key -> shard file name")
            shards = sorted(set(weight_map.values()))
            suffix = ".safetensors" if name.startswith("model.") else ".bin"
            if bad := [s for s in shards if not s.endswith(suffix)]:
                raise CheckpointError(f"{p}: weight_map lists shard(s) that are not {suffix} files: {bad[:5]}")
            for s in shards:
                try:
                    folder_file(folder, s, CheckpointError)
                except CheckpointError as e:
                    raise CheckpointError(f"{p}: weight_map lists a shard outside the folder ({e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{p}: lists shard(s) that do not exist: {missing}")
            return [folder / s for s in shards]
        return [p]
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def iter_tensors(files: list[Path], integer: Callable[[str], bool] = lambda key: False) -> Iterator["Entry"]:
    """Yield (key, load_fn, shape, file) for every tensor, without reading any tensor data yet.

    Each load_fn maps its safetensors file afresh: the mapping (and the pages it made resident) goes
    away with the tensor, so a loader that converts tensor by tensor (januskit.quantization) never
    holds the whole file in memory. `integer(key)` names the keys that may be int8 / uint8 (a
    quantised folder's packed weights); every other tensor must be floating point."""
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as handle:
                    listing = [(k, handle.get_slice(k)) for k in handle.keys()]
                    listing = [(k, sl.get_dtype(), tuple(sl.get_shape())) for k, sl in listing]
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e}); is it truncated?") from e
            for k, dtype, shape in listing:
                _check_dtype(f, k, dtype, dtype.startswith(("F", "BF")), dtype in ("I8", "U8"), integer)  # F32, BF16, ...
                yield k, (lambda k=k, f=f: _get(f, k)), shape, f
        else:
            try:
                sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises several types for a corrupt or unsafe pickle
                raise CheckpointError(f"{f}: cannot load with weights_only=True ({e})") from e
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: expected a state dict, got {type(sd).__name__}")
            for k, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{f}: entry {k!r} is a {type(t).__name__}, not a tensor")
                _check_dtype(f, k, str(t.dtype).removeprefix("torch."), t.is_floating_point(),
                             t.dtype in (torch.int8, torch.uint8), integer)
                yield k, (lambda t=t: t), tuple(t.shape), f


def _check_dtype(f: Path, key: str, dtype: str, floating: bool, byte: bool, integer: Callable[[str], bool]) -> None:
    if floating or (byte and integer(key)):
        return
    raise CheckpointError(f"{f}: tensor {key!r} has dtype {dtype}; checkpoint weights must be floating point"
                          + (" (int8 / uint8 only where a quantised folder declares them)" if byte else ""))


def _get(f: Path, key: str) -> torch.Tensor:
    try:
        with safe_open(str(f), framework="pt") as handle:
            return handle.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from e


Entry = tuple[str, Callable[[], torch.Tensor], tuple[int, ...], Path]


def read_rows(entry: Entry, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop (first dimension) of an entry's tensor, reading only those bytes from a safetensors
    file (a .bin file is memory-mapped, so only the rows' pages are touched)."""
    key, load, _, f = entry
    if f.suffix != ".safetensors":
        return load()[start:stop].clone()
    try:
        with safe_open(str(f), framework="pt") as handle:
            return handle.get_slice(key)[start:stop]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{f}: cannot read rows {start}:{stop} of tensor {key!r} ({e})") from e


def load_into(model: nn.Module, entries: Iterable[Entry], dtype: torch.dtype, skip: Callable[[str], bool],
              where: str | Path) -> list[str]:
    """Strictly fill a meta-built `model` from (key, load_fn, shape, file) entries. Returns the skipped keys.

    `skip(key)` marks known-unused checkpoint entries; everything else must match a parameter or
    persistent buffer by name and shape, and every one of those must be present."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    plan, skipped = match_entries(shapes, entries, skip, where)
    for name, load, _, _ in plan:
        t = load()
        if t.is_floating_point():
            t = t.to(dtype)
        assign_tensor(model, name, t)
    return skipped


def match_entries(shapes: dict[str, tuple[int, ...]], entries: Iterable[Entry], skip: Callable[[str], bool],
                  where: str | Path) -> tuple[list[Entry], list[str]]:
    """The strict check of load_into against a key -> shape table: the entries to load (nothing read
    yet) and the skipped keys; missing, unexpected and wrong-shape keys raise, all of them named."""
    seen: set[str] = set()
    unexpected, wrong, skipped = [], [], []
    plan = []
    for e in entries:
        key, _, shape, f = e
        if skip(key):
            skipped.append(key)
        elif key not in shapes:
            unexpected.append(f"{key} ({f.name})")
        elif shape != shapes[key]:
            wrong.append(f"{key}: checkpoint {shape} vs model {shapes[key]} ({f.name})")
        else:
            seen.add(key)
            plan.append(e)
    missing = sorted(set(shapes) - seen)
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if wrong:
            lines.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:20]))
        raise CheckpointError(f"{where}: checkpoint does not match the model:\n  " + "\n  ".join(lines))
    return plan, skipped


def assign_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """Put `t` in place of the (meta) parameter or buffer `name`, keeping a parameter's requires_grad."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        mod._buffers[attr] = t


def materialize_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Non-persistent buffers (RoPE inverse frequencies) are not in checkpoints: (re)build them on
    `device`, whether they are still on meta or were left uninitialised by `to_empty`."""
    from ..models.llama import rope_inv_freq

    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if bname == "inv_freq":
                mod._buffers[bname] = rope_inv_freq(mod.config).to(device)
            elif buf is not None and buf.is_meta:
                raise CheckpointError(f"buffer {bname!r} of {type(mod).__name__} was not loaded")


# ---------------------------------------------------------------------------------------------
# Writing

MAX_SHARD_BYTES = 5 * 1024**3  # like transformers' default shard size for large models


# Staging folders are named .<dst>.staging-<host>-<pid>-<random>, beside the destination. The next
# write to the same destination removes those whose writer is gone: same host, and no process with
# that pid. A live writer's folder (here, or on another host sharing the filesystem) is never touched;
# a reused pid only delays the cleanup. Loaders refuse these names (is_staging): a staging folder may
# look complete without being so.
_STAGING = re.compile(r"^\.(?P<dst>.+)\.staging-(?P<host>\w*)-(?P<pid>\d+)-[a-z0-9_]+$")
_HOST = re.sub(r"\W", "_", socket.gethostname())[:32]  # \w only: the name must parse back


def is_staging(folder: str | Path) -> bool:
    """Whether `folder` is an atomic_folder staging folder (an unfinished or ongoing write)."""
    return _STAGING.match(Path(folder).resolve().name) is not None


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid we never write: keep both
        return True
    return True


def _remove_stale_staging(dst: Path) -> None:
    for d in dst.parent.iterdir():
        m = _STAGING.match(d.name)
        if (m and m["dst"] == dst.name and m["host"] == _HOST and d.is_dir() and not d.is_symlink()
                and not _writer_alive(int(m["pid"]))):
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def atomic_folder(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dst`; on success it replaces `dst` in one rename."""
    dst = Path(dst)
    if dst.exists() and not overwrite and any(dst.iterdir()):
        raise FileExistsError(f"{dst}: exists and is not empty (refusing to overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-{_HOST}-{os.getpid()}-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the result is an ordinary folder
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    write_shards(list(tensors), lambda k: tensors[k], folder, max_shard_bytes)


def write_shards(keys: list[str], produce: Callable[[str], torch.Tensor], folder: Path,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write tensors made one at a time by `produce(key)`: model.safetensors when one shard holds
    them all, else model-0000i-of-0000n.safetensors + model.safetensors.index.json. At most one
    shard is held in memory."""
    done: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
    buf: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        name = f".shard-{len(done):05d}.tmp"
        save_file(buf, str(folder / name), metadata={"format": "pt"})
        done.append((name, list(buf)))

    for k in keys:
        t = produce(k).detach().contiguous()
        n = t.numel() * t.element_size()
        if buf and size + n > max_shard_bytes:
            flush()
            buf, size = {}, 0
        buf[k] = t
        size += n
        total += n
    if not done:
        save_file(buf, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    flush()
    weight_map = {}
    for i, (tmp, ks) in enumerate(done, 1):
        final = f"model-{i:05d}-of-{len(done):05d}.safetensors"
        os.replace(folder / tmp, folder / final)
        weight_map.update({k: final for k in ks})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
