"""Closed-form learning-rate schedules, stepped once per epoch.

Each schedule is a LambdaLR over a callable factor object rather than a lambda: LambdaLR saves (and restores) the
``__dict__`` of callable objects in its state_dict, so a checkpoint carries the schedule's parameters. For that
the factor objects hold plain numbers only.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class PolyFactor:
    """nnU-Net's poly decay: (1 - epoch / total_epochs) ** power, 0 from total_epochs on."""

    def __init__(self, total_epochs: int, power: float = 0.9):
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        self.total_epochs = int(total_epochs)
        self.power = float(power)

    def __call__(self, epoch: int) -> float:
        return max(0.0, 1.0 - epoch / self.total_epochs) ** self.power


class WarmupCosineFactor:
    """Linear warm-up from 1 / (warmup_epochs + 1) to 1 over warmup_epochs, then cosine decay to min_factor at
    total_epochs (and min_factor after it)."""

    def __init__(self, total_epochs: int, warmup_epochs: int, min_factor: float = 0.0):
        if total_epochs < 1 or warmup_epochs < 0:
            raise ValueError(f"need total_epochs >= 1 and warmup_epochs >= 0, got {total_epochs}, {warmup_epochs}")
        self.total_epochs = int(total_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.min_factor = float(min_factor)

    def __call__(self, epoch: int) -> float:
        if epoch >= self.total_epochs:
            return self.min_factor
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        progress = (epoch - self.warmup_epochs) / (self.total_epochs - self.warmup_epochs)  # in [0, 1)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly(optimizer: Optimizer, total_epochs: int, power: float = 0.9) -> LambdaLR:
    """lr * (1 - epoch / total_epochs) ** power, as nnU-Net (lr 1e-2 with SGD)."""
    return LambdaLR(optimizer, PolyFactor(total_epochs, power))


def default_warmup_epochs(total_epochs: int) -> int:
    """5% of the schedule, at least one epoch."""
    return max(1, round(0.05 * total_epochs))


def warmup_cosine(optimizer: Optimizer, total_epochs: int, warmup_epochs: int | None = None,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at total_epochs (warmup_epochs None: 5%)."""
    if warmup_epochs is None:
        warmup_epochs = default_warmup_epochs(total_epochs)
    return LambdaLR(optimizer, WarmupCosineFactor(total_epochs, warmup_epochs, min_lr_ratio))


def set_total_epochs(scheduler: LambdaLR, total_epochs: int) -> None:
    """Move the horizon of every factor of ``scheduler`` that has one to ``total_epochs``.

    For a finished run extended to more epochs: loading its checkpoint restores the scheduler's state_dict, and
    with it the old ``total_epochs`` of each factor object (LambdaLR restores their ``__dict__``), so the schedule
    would still end at the old horizon. Call this after the state is restored. The optimizer's current lr (also
    restored, and e.g. 0 at the end of a poly schedule) is recomputed for the current epoch under the new horizon,
    since it is used until the scheduler's next step.
    """
    for factor in scheduler.lr_lambdas:
        if hasattr(factor, "total_epochs"):
            factor.total_epochs = int(total_epochs)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
