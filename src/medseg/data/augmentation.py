"""Batch augmentation on tensors (runs wherever the batch is: loader worker on CPU, or the GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AugmentationSettings:
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes, each flipped with p 0.5
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def augment_batch(image: torch.Tensor, label: torch.Tensor, s: AugmentationSettings, g: torch.Generator):
    """image (B, C, *spatial) float, label (B, 1, *spatial); per-sample random mirroring and intensity
    transforms with nnU-Net's probabilities."""
    image = image.clone()
    label = label.clone()
    for b in range(image.shape[0]):
        dims = [a + 1 for a in s.mirror_axes if float(torch.rand((), generator=g)) < 0.5]
        if dims:
            image[b] = torch.flip(image[b], dims)
            label[b] = torch.flip(label[b], dims)
        x = image[b]
        if float(torch.rand((), generator=g)) < s.p_noise:
            std = _uniform(g, *s.noise_variance) ** 0.5
            x += torch.randn(x.shape, generator=g) * std
        if float(torch.rand((), generator=g)) < s.p_brightness:
            x *= _uniform(g, *s.brightness_range)
        if float(torch.rand((), generator=g)) < s.p_contrast:
            mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            lo, hi = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True), x.amax(dim=tuple(range(1, x.ndim)), keepdim=True)
            x.copy_(((x - mean) * _uniform(g, *s.contrast_range) + mean).clamp(lo, hi))
        if float(torch.rand((), generator=g)) < s.p_gamma:
            # gamma on the [0, 1]-rescaled intensities, then back to the original range
            gamma = _uniform(g, *s.gamma_range)
            lo = x.amin(dim=tuple(range(1, x.ndim)), keepdim=True)
            rng = (x.amax(dim=tuple(range(1, x.ndim)), keepdim=True) - lo).clamp_min(1e-7)
            x.copy_(((x - lo) / rng).pow(gamma) * rng + lo)
    return image, label
