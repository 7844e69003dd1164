"""A run's checkpoints and its export. A checkpoint is step-N/, written to a temporary folder, with
a DONE manifest (file names and sizes) written last, then renamed into place: a folder without a
readable manifest is incomplete and ignored, so a run killed at any moment resumes from the newest
complete one. The export is the trained model in the official layout (januskit.load reads it)."""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ..checkpoint.init import processor_files, synthetic_tokenizer
from ..checkpoint.io import atomic_folder, materialize_buffers
from ..checkpoint.official import OfficialExtras, official_state, save_janus
from ..checkpoint.official_config import to_official
from ..models import build_model as model_for_config
from ..models.janus import JanusModel
from . import parallel
from .config import ModelSection, RunConfig
from .lora import MergedView, checkpoint_has_adapters, has_lora, load_adapter, merged_state, save_adapter
from .losses import LossForward

MARKER = "DONE"  # a checkpoint folder without this file is incomplete and ignored
SHARDED = "dcp"  # an FSDP run's checkpoint: model and optimizer state as torch.distributed.checkpoint shards
PROVENANCE = "provenance.json"  # what a trained folder was trained from (written by export_model)
# Records of how the base model was made and how it scored: the trained folder is another model, so the
# export leaves them behind (its tokenizer, processor and generation configs and vae/ still come along).
BASE_RECORDS = ("eval.json", "recipe.json", "components.json", "finetune.json", PROVENANCE)
CKPT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_key(name: str) -> str:
    """A LossForward parameter / state name as checkpoint files spell it: the model's own key, and
    JanusFlow's REPA head under repa_head.* (the layout from when the head hung on the model, so
    the files are unchanged and older runs resume)."""
    return name.removeprefix("model.")


def _from_checkpoint_keys(loss: LossForward) -> Callable[[str], str]:
    """The inverse of checkpoint_key on `loss`'s names; an unknown key stays as it is (and fails a strict load)."""
    names = {checkpoint_key(k): k for k, _ in itertools.chain(loss.named_parameters(), loss.named_buffers())}
    return lambda k: names.get(k, k)


def _rename_optimizer_state(state: dict[str, Any], rename: Callable[[str], str]) -> dict[str, Any]:
    """A full optimizer state dict (keyed by parameter name) under other parameter names, order kept.
    A name is one string object wherever it occurs, as torch makes it: pickle then stores it once,
    and optimizer.pt stays byte for byte what it was. Ranks > 0 may hold an empty dict (kept so)."""
    if not state:
        return state
    names = {k: rename(k) for k in state["state"]}
    for g in state["param_groups"]:
        names.update((n, rename(n)) for n in g["params"] if n not in names)
    return {**state, "state": {names[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[n] for n in g["params"]]} for g in state["param_groups"]]}


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (named step-N with a readable DONE manifest), oldest first."""
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = CKPT_RE.match(d.name)
            if m and d.is_dir() and _manifest_ok(d):
                out.append((int(m.group(1)), d))
    return sorted(out)


def _manifest_ok(d: Path) -> bool:
    try:
        man = json.loads((d / MARKER).read_text())
        return all((d / f).is_file() and (d / f).stat().st_size == size for f, size in man["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def is_sharded_checkpoint(ckpt: Path) -> bool:
    """A checkpoint of an FSDP run: model and optimizer state as torch.distributed.checkpoint shards in dcp/."""
    return (ckpt / SHARDED).is_dir()


@contextmanager
def _shared_staging(dst: Path) -> Iterator[Path]:
    """atomic_folder(dst) made on rank 0, its staging folder known to every rank (each writes its shards
    there); rank 0 commits it once every rank is done."""
    if not parallel.is_main():
        yield Path(parallel.broadcast_object(None))
        parallel.barrier()
        return
    with atomic_folder(dst, overwrite=True) as tmp:
        parallel.broadcast_object(str(tmp))
        yield tmp
        parallel.barrier()


def save_checkpoint(root: Path, step: int, loss: LossForward, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, data, cfg: RunConfig) -> Path | None:
    """Collective; returns the folder on rank 0. The weights and the optimizer state are the model's and
    the REPA head's (checkpoint_key names). Under FSDP (without LoRA) every rank writes its own shards of
    both (torch.distributed.checkpoint, dcp/): nothing is gathered, and the checkpoint loads at any number
    of ranks. Otherwise rank 0 writes them whole (model.safetensors, or the LoRA adapters; optimizer.pt)."""
    model = loss.model
    sharded = parallel.is_sharded(loss) and not has_lora(model)
    if not sharded:  # with LoRA only the adapters (and a trainable REPA head) are gathered, not the frozen base
        weights = {checkpoint_key(k): v for k, v in parallel.model_state(loss, trainable_only=has_lora(model)).items()}
        optim = _rename_optimizer_state(parallel.optimizer_state(loss, optimizer), checkpoint_key)
    ranks = parallel.gather_objects({"rng": parallel.rng_state(), "data": data.state_dict()})
    path = root / f"step-{step:08d}"
    if not sharded and not parallel.is_main():
        parallel.barrier()
        return None
    with (_shared_staging(path) if sharded else atomic_folder(path, overwrite=True)) as tmp:
        if sharded:
            msd, osd = get_state_dict(loss, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / SHARDED))
        elif has_lora(model):  # the adapters are all that trains; the frozen base comes from [model]
            save_adapter(model, tmp, weights, base=cfg.model.source)
        else:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        if parallel.is_main():
            if not sharded:
                torch.save(optim, tmp / "optimizer.pt")
            _records(step, scheduler, ranks, cfg, model)(tmp)
    if parallel.is_main():
        prune_checkpoints(root, cfg.train.keep_last)
    parallel.barrier()
    return path if parallel.is_main() else None


def _records(step: int, scheduler: torch.optim.lr_scheduler.LRScheduler, ranks: list[Any], cfg: RunConfig,
             model: JanusModel) -> Callable[[Path], None]:
    """What rank 0 writes beside the weights (trainer.pt, run_config.json, config.json, then the DONE marker),
    taken now and written by the returned call into the staging folder once the weights are there."""
    trainer = {"step": step, "world": parallel.world(), "scheduler": scheduler.state_dict(), "ranks": ranks}
    run_config = json.dumps(cfg.to_dict(), indent=2) + "\n"
    config = json.dumps(to_official(model.config, "float32"), indent=2) + "\n"

    def write(tmp: Path) -> None:
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "run_config.json").write_text(run_config)
        (tmp / "config.json").write_text(config)
        # the commit marker, last: every file with its size (dcp/ shards included: they are complete on every
        # rank when this runs)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")

    return write


class BackgroundSave:
    """An FSDP checkpoint whose shards a background thread writes ([train] async_checkpoint, dcp.async_save):
    the state is copied to host memory first, then training goes on. `commit()` (after the first step at which
    `ready()`, or before the next checkpoint, at the latest at the end) waits for the shards, writes the small
    files and the DONE marker and renames the folder into place, as a blocking save does: until then the folder is
    a staging one, so a run killed mid-write resumes from the checkpoint before. Collective, like save_checkpoint."""

    def __init__(self, root: Path, step: int, loss: LossForward, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, data, cfg: RunConfig, group: Any) -> None:
        self.root, self.keep_last = root, cfg.train.keep_last
        ranks = parallel.gather_objects({"rng": parallel.rng_state(), "data": data.state_dict()})
        self.records = _records(step, scheduler, ranks, cfg, loss.model)
        self.stack = ExitStack()
        self.tmp = self.stack.enter_context(_shared_staging(root / f"step-{step:08d}"))
        msd, osd = get_state_dict(loss, optimizer)
        # `group`: a process group of its own, so the writer thread's collectives never interleave with the step's
        self.future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(self.tmp / SHARDED),
                                     process_group=group)

    def ready(self) -> bool:
        """Whether every rank's shards are written (collective: one small all-reduce on the step's group)."""
        return parallel.all_reduce_max(0 if self.future.done() else 1) == 0

    def commit(self) -> None:
        try:
            self.future.result()
            if parallel.is_main():
                self.records(self.tmp)
        except BaseException as e:  # the staging folder is removed, the run fails
            self.stack.__exit__(type(e), e, e.__traceback__)
            raise
        self.stack.close()  # every rank has written its shards (barrier), rank 0 renames
        if parallel.is_main():
            prune_checkpoints(self.root, self.keep_last)
        parallel.barrier()


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of crashed writes."""
    done = list_checkpoints(root)
    for _, d in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    keep = {d for _, d in done}
    for d in root.iterdir():
        if d.is_dir() and d not in keep and (d.name.startswith(".step-") or CKPT_RE.match(d.name)):
            shutil.rmtree(d, ignore_errors=True)


def load_weights(loss: LossForward, ckpt: Path) -> None:
    """The model's and the REPA head's weights (strict), or with [lora] the adapters (the frozen
    base and head are rebuilt from [model] and the seed)."""
    if checkpoint_has_adapters(ckpt, has_lora(loss.model)):
        load_adapter(loss.model, ckpt)
    else:
        key = _from_checkpoint_keys(loss)
        loss.load_state_dict({key(k): v for k, v in load_file(str(ckpt / "model.safetensors")).items()}, strict=True)


def restore_state(ckpt: Path, loss: LossForward, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler, data) -> int:
    """Optimizer, scheduler, data position and RNG of this rank from a checkpoint (and from a sharded one
    the weights too); returns its step. Another number of ranks than the checkpoint's: the weights and the
    optimizer state are re-split (a sharded checkpoint by torch.distributed.checkpoint, a whole one as it
    is), the data positions by the source's `reshard(states, rank, world)` (a source without it is refused),
    and each rank's RNG continues old rank `rank`'s, or its seed where the old run had fewer ranks."""
    st = torch.load(ckpt / "trainer.pt", weights_only=True)
    rank, world = parallel.rank(), parallel.world()
    states = [r["data"] for r in st["ranks"]]
    if st["world"] != world and not hasattr(data, "reshard"):
        raise ValueError(f"{ckpt}: saved by {st['world']} processes, resumed with {world}; the data source "
                         f"({type(data).__name__}) cannot re-split its per-rank positions (resume with "
                         f"{st['world']} processes)")
    if is_sharded_checkpoint(ckpt):
        msd, osd = get_state_dict(loss, optimizer)
        both = {"model": msd, "optim": osd}
        with warnings.catch_warnings():  # one process: torch warns that it loads as one, which is the intent
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(both, checkpoint_id=str(ckpt / SHARDED), no_dist=world == 1)
        set_state_dict(loss, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"])
    else:
        optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
        parallel.load_optimizer_state(loss, optimizer, _rename_optimizer_state(optim, _from_checkpoint_keys(loss)))
    scheduler.load_state_dict(st["scheduler"])
    data.load_state_dict(states[rank] if st["world"] == world else data.reshard(states, rank, world))
    if rank < len(st["ranks"]):
        parallel.set_rng_state(st["ranks"][rank]["rng"])
    return int(st["step"])


def export_model(model: JanusModel, out: Path, source: ModelSection, dtype: torch.dtype, extras: OfficialExtras,
                 adapter_only: bool = False) -> None:
    """Write the trained model into `out` in the official layout, with the source's tokenizer and
    processor files and unused official entries (`extras`, from build_model), so januskit.load(out)
    works; LoRA adapters are merged in first, or with `adapter_only` written alone (float32, PEFT's
    file layout). The source's BASE_RECORDS are not copied; provenance.json names the source instead
    (provenance()). Collective under FSDP: a sharded model without LoRA is streamed, each tensor gathered
    whole in turn and written by rank 0 into the shard files (so no rank holds more than one tensor and one
    output shard); with LoRA each adapted weight is merged as it is gathered (lora.MergedView), and an
    adapter-only export gathers the adapters alone on rank 0."""
    sharded = any(isinstance(t, DTensor) for t in model.state_dict().values())
    if sharded and not (has_lora(model) and adapter_only):
        _export_streamed(model, out, source, dtype, extras)
        return
    state = parallel.model_state(model, trainable_only=has_lora(model) and adapter_only)
    if not parallel.is_main():
        return
    if has_lora(model):
        if adapter_only:
            save_adapter(model, out, state, base=source.source)
            return
        state = merged_state(model, state)
    with torch.device("meta"):
        m = model_for_config(model.config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    m.load_state_dict(state, strict=True, assign=True)
    materialize_buffers(m)
    src = Path(source.source)
    files = {PROVENANCE: json.dumps(provenance(source), indent=1) + "\n"}
    if not src.is_dir():  # a preset: its synthetic tokenizer and processor configs
        files.update({"tokenizer.json": synthetic_tokenizer(source.source, model.config).to_json_str(),
                      **processor_files(model.config)})
    _replace_export(out, lambda tmp: save_janus(m, tmp, copy_from=src if src.is_dir() else None, extras=extras,
                                                files=files, overwrite=True, skip=BASE_RECORDS))


def _replace_export(out: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` the export into out/.export, then move it into `out` file by file, config.json last: a
    folder without it is not (yet) a loadable checkpoint."""
    tmp = out / ".export"
    write(tmp)
    for f in out.glob("model*.safetensors*"):  # a previous export's shards
        f.unlink()
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        if f.is_dir() and (out / f.name).is_dir():  # a previous export's vae/
            shutil.rmtree(out / f.name)
        os.replace(f, out / f.name)
    tmp.rmdir()


def _export_streamed(model: JanusModel, out: Path, source: ModelSection, dtype: torch.dtype,
                     extras: OfficialExtras) -> None:
    """export_model of a sharded model: rank 0 writes as save_janus does while every rank gathers the tensors
    in the order it writes them (official_state's)."""
    whole = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731 (collective for a DTensor)
    if has_lora(model):  # each adapted weight merged as it is gathered
        view = MergedView(model, whole)
        model, whole = view, view.materialize
    if not parallel.is_main():
        for t in official_state(model, extras=OfficialExtras()).values():  # the same keys, in the same order
            whole(t)
        return
    src = Path(source.source)
    files = {PROVENANCE: json.dumps(provenance(source), indent=1) + "\n"}
    if not src.is_dir():
        files.update({"tokenizer.json": synthetic_tokenizer(source.source, model.config).to_json_str(),
                      **processor_files(model.config)})
    _replace_export(out, lambda tmp: save_janus(model, tmp, copy_from=src if src.is_dir() else None, extras=extras,
                                                files=files, overwrite=True, skip=BASE_RECORDS, dtype=dtype,
                                                materialize=whole))


def provenance(source: ModelSection) -> dict[str, Any]:
    """provenance.json of a folder trained from `source` ([model]: a checkpoint folder or a preset): the
    source as the config spelled it, its absolute path (a relative one depends on the working directory),
    and the source's own provenance when it was trained itself, so a chain of fine-tunes stays traceable."""
    src = Path(source.source)
    if not src.is_dir():  # random weights of a preset
        return {"base_model": source.source, "preset": True, "seed": source.seed}
    out: dict[str, Any] = {"base_model": source.source, "base_model_path": str(src.resolve())}
    try:
        out["base_provenance"] = json.loads((src / PROVENANCE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # unreadable: say so rather than fail the export at the last step
        out["base_provenance"] = f"unreadable {src / PROVENANCE}: {e}"
    return out
