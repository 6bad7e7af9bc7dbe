"""Dice and cross-entropy on a label scheme's targets: sigmoid regions (nnU-Net's region-based training) and an
ignore label whose voxels count in neither term.

Written here rather than taken from MONAI: MONAI's DiceCELoss has no ignore index, and its MaskedDiceLoss masks
the logits before the softmax, so masked voxels still spread probability over every class. Here the
activation comes first and MONAI's DiceLoss then sees masked probabilities and masked one-hot targets, as
nnU-Net's loss with a loss mask does."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss

from medseg.datasets.labels import LabelScheme


class LabelSchemeLoss(nn.Module):
    """lambda_dice * soft Dice + lambda_ce * cross-entropy for (logits (B, C, ...), label map (B, 1, ...)).
    Regions: one sigmoid channel per region, binary cross-entropy, Dice over every region. Labels: softmax,
    cross-entropy, Dice without background. Voxels holding the ignore label are left out of both terms."""

    def __init__(self, scheme: LabelScheme, lambda_dice: float = 1.0, lambda_ce: float = 1.0, smooth: float = 1e-5,
                 batch_dice: bool = True):
        super().__init__()
        self.scheme = scheme
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.dice = DiceLoss(include_background=scheme.has_regions, to_onehot_y=False, softmax=False,
                             sigmoid=False, batch=batch_dice, smooth_nr=smooth, smooth_dr=smooth)
        # softmax channels hold label values in ascending order; a lookup turns values into channel indices
        values = scheme.values
        table = torch.zeros(scheme.value_bound, dtype=torch.long)
        table[torch.tensor(values)] = torch.arange(len(values))
        self.register_buffer("channel_of_value", table, persistent=False)
        self.register_buffer("regions_of_value", scheme.region_table(), persistent=False)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label.long()
        if label.ndim == logits.ndim - 1:
            label = label.unsqueeze(1)
        valid = self.scheme.valid_mask(label)
        weight = valid.to(logits.dtype) if valid is not None else None
        if self.scheme.has_regions:
            target = self.scheme.region_masks(label, self.regions_of_value).to(logits.dtype)
            probabilities = torch.sigmoid(logits)
            ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            if weight is not None:
                ce = ce * weight
            count = (weight.sum() * logits.shape[1]) if weight is not None else torch.tensor(ce.numel())
        else:
            index = self.channel_of_value[label.clamp_max(self.scheme.value_bound - 1)]
            if valid is not None:
                index = torch.where(valid, index, torch.zeros_like(index))
            target = F.one_hot(index[:, 0], logits.shape[1]).movedim(-1, 1).to(logits.dtype)
            probabilities = torch.softmax(logits, 1)
            ce = F.cross_entropy(logits, index[:, 0], reduction="none").unsqueeze(1)
            if weight is not None:
                ce = ce * weight
            count = weight.sum() if weight is not None else torch.tensor(ce.numel())
        if weight is not None:
            probabilities, target = probabilities * weight, target * weight
        # a batch without an annotated voxel adds nothing (no host read to find out: a division by at least 1)
        ce_term = ce.sum() / count.to(ce.dtype).clamp_min(1)
        loss = ce_term * self.lambda_ce if self.lambda_ce else ce_term.new_zeros(())
        if self.lambda_dice:
            loss = loss + self.lambda_dice * self.dice(probabilities, target)
        return loss
