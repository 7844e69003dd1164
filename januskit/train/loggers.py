"""Optional loggers beside metrics.jsonl, which stays the source of truth: they receive the same lines.

    [train] tensorboard = true   ->  <out>/tensorboard/events.out.tfevents.*  (torch.utils.tensorboard's
                                     SummaryWriter; needs the `tensorboard` package: pip install 'januskit[tensorboard]')

Each numeric field of a metrics line becomes a scalar at the line's step, under a group by kind:
    loss/...        loss, loss_und, loss_text, loss_gen, loss_edit, loss_repa (and an RL stage's loss)
    optim/...       lr, grad_norm
    throughput/...  tok_per_s, time_s, tokens, loss_tokens, packing
    eval/...        eval_* and val_* fields (evaluation figures)
    rl/...          reward, reward_*, kl, clip and the other fields of an [rl] stage
Resume: the writer opens with purge_step = the first step the resumed run logs, so TensorBoard hides the events
a killed run wrote after its last checkpoint (as metrics.jsonl drops those lines): no step appears twice. A
fresh run (not resumed) removes the event files of an earlier run in the same folder, as it truncates
metrics.jsonl. Only rank 0 writes.
"""
from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("januskit.train.loggers")

TENSORBOARD_DIR = "tensorboard"
INSTALL_HINT = "pip install 'januskit[tensorboard]'"
OPTIM = ("lr", "grad_norm")
THROUGHPUT = ("tok_per_s", "time_s", "tokens", "loss_tokens", "packing")


def tag(key: str, rl: bool = False) -> str:
    """The TensorBoard tag of a metrics field (see the module docstring)."""
    if key.startswith("loss"):
        group = "loss"
    elif key in OPTIM:
        group = "optim"
    elif key in THROUGHPUT:
        group = "throughput"
    elif key.startswith(("eval_", "val_")):
        group = "eval"
    else:
        group = "rl" if rl else "metrics"
    return f"{group}/{key}"


def scalars(line: Mapping[str, Any], rl: bool = False) -> dict[str, float]:
    """{tag: value} for every finite number of a metrics line but `step` (None, bools and text are left out)."""
    out = {}
    for k, v in line.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[tag(k, rl)] = float(v)
    return out


def check_available(train: Any) -> None:
    """Raise ImportError with the install hint when a logger the [train] table asks for cannot be imported (call
    it before building the model: the run stops at once, not after loading)."""
    if getattr(train, "tensorboard", False):
        _summary_writer()


def _summary_writer() -> type:
    try:
        importlib.import_module("tensorboard")  # what torch.utils.tensorboard needs; the message names it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"[train] tensorboard = true needs the tensorboard package, which could not be imported "
                          f"({e}); install it with: {INSTALL_HINT}, or set tensorboard = false") from e
    return SummaryWriter


class TensorBoardLogger:
    """Scalars of each metrics line into `logdir`, flushed per line (a killed run keeps what it logged)."""

    def __init__(self, logdir: str | Path, start_step: int, rl: bool = False):
        self.logdir = Path(logdir)
        self.rl = rl
        SummaryWriter = _summary_writer()
        if start_step == 0 and self.logdir.is_dir():  # a fresh run replaces an earlier run's events
            for f in self.logdir.glob("events.out.tfevents.*"):
                f.unlink()
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.logdir), purge_step=start_step + 1)

    def log(self, line: Mapping[str, Any]) -> None:
        step = int(line["step"])
        for t, v in scalars(line, self.rl).items():
            self.writer.add_scalar(t, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Loggers:
    """The loggers a run's [train] table enables (none: every call is a no-op)."""

    def __init__(self, loggers: list[Any] | None = None):
        self.loggers = loggers or []

    def log(self, line: Mapping[str, Any]) -> None:
        for lg in self.loggers:
            lg.log(line)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
        self.loggers = []


def open_loggers(train: Any, out: str | Path, start_step: int, *, enabled: bool = True, rl: bool = False) -> Loggers:
    """The loggers of a run's [train] table (`train.tensorboard`), writing under `out`, continuing after
    `start_step` (0 for a fresh run). `enabled=False` (ranks other than 0): none."""
    if not enabled:
        return Loggers()
    found = []
    if getattr(train, "tensorboard", False):
        found.append(TensorBoardLogger(Path(out) / TENSORBOARD_DIR, start_step, rl=rl))
        log.info("tensorboard: events in %s (tensorboard --logdir %s)", found[-1].logdir, found[-1].logdir)
    return Loggers(found)
