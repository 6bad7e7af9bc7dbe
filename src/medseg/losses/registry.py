"""Loss registry. Losses take (logits, integer labels (B, 1, ...)); deep supervision wraps any of them.

``create_loss`` refuses a key the loss's factory does not take (ConfigError naming it and the accepted keys),
so a misspelled key in a loss config never silently trains the defaults. Each loss's name is its config's file
name (configs/loss/<name>.yaml) and the second part of the run folder's name."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss, FocalLoss, TverskyLoss

from medseg.config_keys import accepted_keys, check_keys
from medseg.datasets.labels import LabelScheme
from medseg.errors import ConfigError
from medseg.losses.label_scheme import LabelSchemeLoss

_LOSSES: dict[str, Callable[..., nn.Module]] = {}


def register_loss(name: str):
    def wrap(factory):
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        accepted_keys(factory)  # refuses a factory taking **kwargs: its keys could not be checked
        _LOSSES[name] = factory
        return factory
    return wrap


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def loss_keys(name: str) -> tuple[str, ...]:
    """The config keys loss ``name`` takes (besides ``name``)."""
    if name not in _LOSSES:
        raise ConfigError(f"unknown loss {name!r}; available: {list_losses()}")
    return accepted_keys(_LOSSES[name])


def check_loss_keys(name: str, kwargs) -> None:
    """ConfigError for an unknown loss or a config key (``kwargs``, without ``name``) it does not take; nothing
    is built (a config can be checked before data is read)."""
    check_keys(kwargs, loss_keys(name), f"loss {name!r}", "loss", name)


def create_loss(name: str, label_scheme: LabelScheme | None = None, **kwargs) -> nn.Module:
    """Build loss ``name``; ``kwargs`` are its config's keys (without ``name``). A key the loss does not take is a
    ConfigError naming it and the accepted keys. With a ``label_scheme`` that has regions or an ignore label, the
    loss is built for it (see ``check_loss_for_scheme`` for which losses can be)."""
    check_loss_keys(name, kwargs)
    if label_scheme is not None and (label_scheme.has_regions or label_scheme.needs_mask):
        check_loss_for_scheme(name, label_scheme)
        return _SCHEME_LOSSES[name](label_scheme, **kwargs)
    return _LOSSES[name](**kwargs)


# Losses that train region-based labels (sigmoid per region) and ignore labels (masked voxels). The others are
# refused for such datasets rather than trained wrongly: focal and Tversky are softmax-only here, and a masked
# or sigmoid version of them is not written yet.
_SCHEME_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "dice_ce": lambda scheme, **kw: LabelSchemeLoss(scheme, **kw),
    "dice": lambda scheme, **kw: LabelSchemeLoss(scheme, lambda_ce=0.0, **kw),
    "ce": lambda scheme: LabelSchemeLoss(scheme, lambda_dice=0.0),
}


def check_loss_for_scheme(name: str, label_scheme: LabelScheme) -> None:
    """ConfigError when loss ``name`` cannot train the dataset's labels (regions, an ignore label)."""
    if (label_scheme.has_regions or label_scheme.needs_mask) and name not in _SCHEME_LOSSES:
        what = "region-based labels" if label_scheme.has_regions else "an ignore label"
        raise ConfigError(f"loss={name} cannot train a dataset with {what}; use one of {sorted(_SCHEME_LOSSES)}")


@register_loss("dice_ce")
def dice_ce(lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1e-5, batch_dice: bool = True,
) -> nn.Module:
    # background excluded from Dice (not from CE), as nnU-Net
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                      smooth_nr=smooth, smooth_dr=smooth, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


@register_loss("dice")
def dice(smooth: float = 1e-5, batch_dice: bool = True) -> nn.Module:
    return DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
                    smooth_nr=smooth, smooth_dr=smooth)


class CrossEntropy(nn.CrossEntropyLoss):
    """torch's cross-entropy on integer labels shaped (B, 1, ...), as the other losses take them."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == input.ndim:
            target = target.squeeze(1)
        # long again: deep supervision hands the target over as float (resized by nearest neighbour)
        return super().forward(input, target.long())


@register_loss("ce")
def ce() -> nn.Module:
    return CrossEntropy()


@register_loss("focal")
def focal(gamma: float = 2.0) -> nn.Module:
    # a cross-entropy-type term: background included, as the CE in dice_ce
    return FocalLoss(include_background=True, to_onehot_y=True, gamma=gamma, use_softmax=True)


@register_loss("tversky")
def tversky(alpha: float = 0.3, beta: float = 0.7, smooth: float = 1e-5, batch_dice: bool = True) -> nn.Module:
    # alpha weighs false positives, beta false negatives: beta > alpha favours recall on small structures
    return TverskyLoss(include_background=False, to_onehot_y=True, softmax=True, alpha=alpha, beta=beta,
                       batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth)


class DiceFocal(nn.Module):
    """lambda_dice * Dice (background excluded) + lambda_focal * softmax focal loss (background included).

    Not MONAI's DiceFocalLoss: its focal term is the sigmoid one (it passes no use_softmax) and shares the Dice
    term's include_background."""

    def __init__(self, dice: nn.Module, focal: nn.Module, lambda_dice: float = 1.0, lambda_focal: float = 1.0):
        super().__init__()
        self.dice, self.focal = dice, focal
        self.lambda_dice, self.lambda_focal = lambda_dice, lambda_focal

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lambda_dice * self.dice(input, target) + self.lambda_focal * self.focal(input, target)


@register_loss("dice_focal")
def dice_focal(lambda_dice: float = 1.0, lambda_focal: float = 1.0, gamma: float = 2.0, smooth: float = 1e-5,
               batch_dice: bool = True) -> nn.Module:
    return DiceFocal(dice(smooth=smooth, batch_dice=batch_dice), focal(gamma=gamma), lambda_dice, lambda_focal)


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """1/2^i per output from the finest, normalised (the lowest decoder level is already left out)."""
    w = [0.5 ** i for i in range(num_outputs)]
    return [x / sum(w) for x in w]


class _DeepSupervision(DeepSupervisionLoss):
    def forward(self, input, target: torch.Tensor) -> torch.Tensor:
        # MONAI resizes the target to each lower output (nearest-exact, as nnU-Net's DownsampleSegForDSTransform),
        # which torch has for floats only
        return super().forward(input, target.float())


def with_deep_supervision(loss: nn.Module, num_outputs: int) -> nn.Module:
    """MONAI's wrapper: weighted sum over a list of outputs, finest first, each at its own resolution (the
    target resized to each by nearest-exact, as nnU-Net downsamples its deep-supervision targets); a single
    tensor passes through."""
    return _DeepSupervision(loss, weights=deep_supervision_weights(num_outputs))
