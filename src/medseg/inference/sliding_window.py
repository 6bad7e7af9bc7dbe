"""Sliding-window prediction of one preprocessed volume (MONAI's inferer, Gaussian weighting) with optional
mirroring test-time augmentation."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference


SLICES_PER_PASS = 32  # 2D models on volumes: slices predicted together (bounded memory on large volumes)


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, patch_size, overlap: float = 0.5,
                   mirror_axes: tuple[int, ...] | None = None, sw_batch_size: int = 4,
                   device: torch.device | None = None) -> torch.Tensor:
    """image (c, *spatial) -> logits (classes, *spatial), averaged over the mirrored copies. A 2D model on a
    3D volume predicts it slice by slice along the first axis."""
    if len(patch_size) == image.ndim - 2:
        slices = [_predict(model, image[:, z:z + SLICES_PER_PASS].transpose(0, 1), patch_size, overlap,
                           mirror_axes, sw_batch_size, device)
                  for z in range(0, image.shape[1], SLICES_PER_PASS)]
        return torch.cat(slices, dim=0).transpose(0, 1)
    return _predict(model, image[None], patch_size, overlap, mirror_axes, sw_batch_size, device)[0]


def _predict(model: nn.Module, x: torch.Tensor, patch_size, overlap, mirror_axes, sw_batch_size,
             device) -> torch.Tensor:
    """(batch, c, *spatial) -> (batch, classes, *spatial) float logits."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    x = x.to(device, torch.float32)

    def run(inp: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(inp, list(patch_size), sw_batch_size, model, overlap=overlap,
                                        mode="gaussian", padding_mode="constant", cval=0.0)

    logits = run(x)
    flips = []
    for axis in [a for a in (mirror_axes or ()) if a < len(patch_size)]:  # a 2D model mirrors its 2 axes
        flips = flips + [f + [axis + 2] for f in flips] + [[axis + 2]]
    for dims in flips:
        logits += torch.flip(run(torch.flip(x, dims)), dims)
    logits /= 1 + len(flips)
    model.train(was_training)
    return logits.float()
