"""Closed-form learning-rate schedules, stepped once per epoch.

Each schedule is a LambdaLR over a callable factor object rather than a lambda: LambdaLR saves (and restores) the
``__dict__`` of callable objects in its state_dict, so a checkpoint carries the schedule's parameters. For that
the factor objects hold plain numbers only.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lead_in(epoch: int, lead_epochs: int) -> float:
    """The factor of a linear warm-up of ``lead_epochs`` epochs: 1/(n+1), 2/(n+1), ..., n/(n+1), then the
    schedule's own (which starts at 1)."""
    return (epoch + 1) / (lead_epochs + 1)


class PolyFactor:
    """nnU-Net's poly decay: (1 - epoch / total_epochs) ** power, 0 from total_epochs on."""

    def __init__(self, total_epochs: int, power: float = 0.9):
        if total_epochs < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
        self.total_epochs = int(total_epochs)
        self.power = float(power)
        self.lead_epochs = 0  # a fine-tuning warm-up before the schedule (add_warmup)

    def __call__(self, epoch: int) -> float:
        lead = getattr(self, "lead_epochs", 0)  # checkpoints from before the warm-up existed lack it
        if epoch < lead:
            return lead_in(epoch, lead)
        return max(0.0, 1.0 - (epoch - lead) / max(1, self.total_epochs - lead)) ** self.power


class WarmupCosineFactor:
    """Linear warm-up from 1 / (warmup_epochs + 1) to 1 over warmup_epochs, then cosine decay to min_factor at
    total_epochs (and min_factor after it)."""

    def __init__(self, total_epochs: int, warmup_epochs: int, min_factor: float = 0.0):
        if total_epochs < 1 or warmup_epochs < 0:
            raise ValueError(f"need total_epochs >= 1 and warmup_epochs >= 0, got {total_epochs}, {warmup_epochs}")
        self.total_epochs = int(total_epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.min_factor = float(min_factor)
        self.lead_epochs = 0  # a fine-tuning warm-up before the schedule (add_warmup)

    def __call__(self, epoch: int) -> float:
        lead = getattr(self, "lead_epochs", 0)  # checkpoints from before the warm-up existed lack it
        if epoch < lead:
            return lead_in(epoch, lead)
        epoch, total = epoch - lead, max(1, self.total_epochs - lead)
        if epoch >= total:
            return self.min_factor
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        progress = (epoch - self.warmup_epochs) / max(1, total - self.warmup_epochs)  # in [0, 1)
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
    _apply_current(scheduler)


def supports_warmup(scheduler: object) -> bool:
    """Whether ``add_warmup`` can put a warm-up before ``scheduler``: medseg's own schedules (poly,
    warmup_cosine), whose factor objects take a lead."""
    return isinstance(scheduler, LambdaLR) and all(isinstance(f, (PolyFactor, WarmupCosineFactor))
                                                   for f in scheduler.lr_lambdas)


def add_warmup(scheduler: LambdaLR, warmup_epochs: int) -> None:
    """A linear warm-up of ``warmup_epochs`` epochs (factor (e + 1) / (warmup_epochs + 1)) before the
    configured schedule, which then runs over the remaining epochs up to its horizon (finetune.warmup_epochs).
    Held as a plain number in each factor, so checkpoints carry and restore it."""
    if not supports_warmup(scheduler):
        raise ValueError(f"{type(scheduler).__name__}: a warm-up can only be added to medseg's schedules "
                         "(poly, warmup_cosine)")
    for factor in scheduler.lr_lambdas:
        assert isinstance(factor, (PolyFactor, WarmupCosineFactor))  # supports_warmup: medseg's factors
        factor.lead_epochs = int(warmup_epochs)
    _apply_current(scheduler)


def _apply_current(scheduler: LambdaLR) -> None:
    """Set the optimizer's lr for the scheduler's current epoch from its (changed) factors."""
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
