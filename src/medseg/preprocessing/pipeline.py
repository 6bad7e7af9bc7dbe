"""One case through crop -> normalise -> resample, and the way back for predictions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.crop import crop, crop_to_nonzero
from medseg.preprocessing.normalize import normalize
from medseg.preprocessing.resample import resample_image, resample_label, resample_logits, resampled_shape

MAX_LOCATIONS_PER_CLASS = 10_000


@dataclass
class CaseProperties:
    """What preprocessing did to a case, so the result can be mapped back onto the input grid."""

    case_id: str
    original_shape: list[int]
    original_spacing: list[float]
    box: list[list[int]]  # crop box in the original grid, [start, stop) per axis
    shape_after_crop: list[int]
    shape_after_resample: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def preprocess_image(image: np.ndarray, spacing, plan: Plan, config: ConfigurationPlan, case_id: str = "",
                     label: np.ndarray | None = None):
    """Return (data float32 (c, *shape), label int8 or None, CaseProperties)."""
    cropped, cropped_label, mask, box = crop_to_nonzero(image, label)
    data = normalize(cropped, config.normalization, config.use_mask_for_norm, mask, plan.intensity_properties)
    new_shape = resampled_shape(cropped.shape[1:], spacing, config.spacing)
    data = resample_image(data, new_shape)
    if cropped_label is not None:
        cropped_label = resample_label(cropped_label, new_shape, sorted(plan.labels)).astype(np.int8)
    props = CaseProperties(case_id, list(image.shape[1:]), [float(s) for s in spacing],
                           [list(b) for b in box], list(cropped.shape[1:]), list(new_shape))
    return data.astype(np.float32), cropped_label, props


def class_locations(label: np.ndarray, classes: list[int], seed: int = 1234) -> dict[int, np.ndarray]:
    """Up to MAX_LOCATIONS_PER_CLASS voxel coordinates per foreground class, for foreground oversampling."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in classes:
        coords = np.argwhere(label == c)
        if len(coords) > MAX_LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), MAX_LOCATIONS_PER_CLASS, replace=False)]
        out[c] = coords.astype(np.int32)
    return out


def logits_to_original(logits: torch.Tensor, props: CaseProperties) -> torch.Tensor:
    """(classes, *preprocessed shape) logits -> (classes, *original shape) on the input grid: resample back
    to the cropped shape, then put the crop back; outside the crop is background."""
    logits = resample_logits(logits, props.shape_after_crop)
    full = torch.zeros((logits.shape[0], *props.original_shape), dtype=logits.dtype)
    full[0] = 1.0  # outside the nonzero box only background is possible
    full[(slice(None),) + tuple(slice(a, b) for a, b in props.box)] = logits
    return full


def crop_like(array: np.ndarray, props: CaseProperties) -> np.ndarray:
    return crop(array, [tuple(b) for b in props.box])
