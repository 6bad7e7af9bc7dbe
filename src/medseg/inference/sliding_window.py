"""Sliding-window prediction of one preprocessed volume (MONAI's inferer, Gaussian weighting) with optional
mirroring test-time augmentation."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, patch_size, overlap: float = 0.5,
                   mirror_axes: tuple[int, ...] | None = None, sw_batch_size: int = 4,
                   device: torch.device | None = None) -> torch.Tensor:
    """image (c, *spatial) -> logits (classes, *spatial), averaged over the mirrored copies."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    x = image[None].to(device, torch.float32)

    def run(inp: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(inp, list(patch_size), sw_batch_size, model, overlap=overlap,
                                        mode="gaussian", padding_mode="constant", cval=0.0)

    logits = run(x)
    flips = []
    for axis in mirror_axes or ():
        flips = flips + [f + [axis + 2] for f in flips] + [[axis + 2]]
    for dims in flips:
        logits += torch.flip(run(torch.flip(x, dims)), dims)
    logits /= 1 + len(flips)
    model.train(was_training)
    return logits[0].float()
