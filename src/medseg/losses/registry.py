"""Loss registry. Losses take (logits, integer labels (B, 1, ...)); deep supervision wraps any of them."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss, DiceCELoss

from medseg.errors import ConfigError

_LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str):
    def wrap(factory):
        _LOSSES[name] = factory
        return factory
    return wrap


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, **kwargs) -> nn.Module:
    if name not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; available: {list_losses()}")
    return _LOSSES[name](**kwargs)


@register_loss("dice_ce")
def dice_ce(lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1e-5, batch_dice: bool = True,
            **_) -> nn.Module:
    # background excluded from Dice (not from CE), as nnU-Net
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                      smooth_nr=smooth, smooth_dr=smooth, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """1/2^i per output from the finest, normalised (the lowest decoder level is already left out)."""
    w = [0.5 ** i for i in range(num_outputs)]
    return [x / sum(w) for x in w]


class _DeepSupervision(DeepSupervisionLoss):
    def forward(self, input, target: torch.Tensor) -> torch.Tensor:
        # MONAI resizes the target to lower outputs with nearest interpolation, which torch has for floats only
        return super().forward(input, target.float())


def with_deep_supervision(loss: nn.Module, num_outputs: int) -> nn.Module:
    """MONAI's wrapper: weighted sum over a list of outputs (the target resized to each by nearest neighbour);
    a single tensor passes through."""
    return _DeepSupervision(loss, weights=deep_supervision_weights(num_outputs))
