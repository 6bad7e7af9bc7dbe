"""The cascade's extra input: a previous stage's label map on the preprocessed grid, one-hot per foreground label.

nnU-Net's 3d_cascade_fullres sees the image channels followed by ``convert_labelmap_to_one_hot`` of the 3d_lowres
prediction for the foreground labels (every label value but background and ignore; for region-based datasets the
label values the regions paint), so its network has image channels + foreground labels inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medseg.atomic import atomic_path
from medseg.datasets.labels import LabelScheme
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.pipeline import CaseProperties, label_to_grid


def foreground_labels(scheme: LabelScheme) -> list[int]:
    """nnU-Net's ``label_manager.foreground_labels``: the label values a prediction may hold, background left out."""
    return [v for v in scheme.values if v != 0]


def num_input_channels(plan: Plan, config: ConfigurationPlan) -> int:
    """The network's input channels: the image's, plus one per foreground label for a cascade stage."""
    extra = len(foreground_labels(plan.label_scheme)) if config.previous_stage else 0
    return len(plan.channel_names) + extra


def one_hot(seg: torch.Tensor, labels: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(*shape) label map -> (len(labels), *shape), channel i is 1 where ``seg == labels[i]`` (anything else,
    background, the ignore label or padding, is 0 in every channel)."""
    values = torch.as_tensor(labels, dtype=seg.dtype, device=seg.device).view(-1, *([1] * seg.ndim))
    return (seg[None] == values).to(dtype)


def with_previous_stage(data: torch.Tensor, previous: np.ndarray, props: CaseProperties, plan: Plan,
                        config: ConfigurationPlan) -> torch.Tensor:
    """(c, *grid) preprocessed image + the previous stage's label map on the input grid -> (c + foreground labels,
    *grid): the cascade's input, as nnU-Net's predictor builds it (the label map preprocessed as a segmentation)."""
    seg = torch.from_numpy(label_to_grid(previous, props, plan, config))
    return torch.cat([data, one_hot(seg, foreground_labels(plan.label_scheme), data.dtype)])


def write_previous_stage(path: Path, seg: np.ndarray) -> None:
    """One case's label map on the next stage's grid, atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, seg)


def read_previous_stage(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None)
