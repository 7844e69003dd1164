"""What the component pretrainers share: the checks and LR schedule of their run configs."""
from __future__ import annotations

from ..optim import lr_at


def check_grad_clip(owner: str, grad_clip: float | None) -> None:
    """The convention of every trainer here: a max global grad norm > 0, or None for no clipping."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"{owner}.grad_clip must be > 0, or None for no clipping; got {grad_clip}")


class WarmupCosine:
    """For a pretrainer's config dataclass with these fields: their checks, and the LR of each step
    (linear warm-up, then a cosine down to lr * min_lr_ratio at the last step)."""

    steps: int
    batch_size: int
    log_every: int
    lr: float
    warmup: int
    min_lr_ratio: float
    grad_clip: float | None

    def lr_at(self, step: int) -> float:
        """lr for 1-based `step`: linear warm-up, then cosine to lr * min_lr_ratio at `steps`."""
        return lr_at(step, peak=self.lr, warmup=self.warmup, horizon=self.steps, floor=self.min_lr_ratio)

    def check_run(self) -> None:
        """Raise ValueError naming the first field out of range (as `ClassName.field`)."""
        name = type(self).__name__
        for field in ("steps", "batch_size", "log_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        if not self.lr > 0:
            raise ValueError(f"{name}.lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"{name}.warmup must be >= 0, got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"{name}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_grad_clip(name, self.grad_clip)
