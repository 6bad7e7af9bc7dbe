"""One case through transpose -> crop -> normalise -> resample (nnU-Net's order), and the way back."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.planning.crop import crop_to_nonzero
from medseg.preprocessing.normalize import normalize
from medseg.preprocessing.resample import new_shape, resample_image, resample_label, resample_logits

MAX_LOCATIONS_PER_CLASS = 10_000


@dataclass
class CaseProperties:
    """What preprocessing did to a case, so the result can be mapped back onto the input grid."""

    case_id: str
    original_shape: list[int]  # array (z, y, x) order
    spacing: list[float]  # planning axis order (transposed), the case's own
    box: list[list[int]]  # crop box in the transposed grid, [start, stop) per axis
    shape_after_crop: list[int]
    shape_after_resample: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def case_target_spacing(config: ConfigurationPlan, spacing_t) -> list[float]:
    """2d keeps each case's own spacing along the slicing axis; 3d resamples every axis."""
    return list(config.spacing) if config.spatial_dims == 3 else [float(spacing_t[0])] + list(config.spacing)


def preprocess_image(image: np.ndarray, spacing, plan: Plan, config: ConfigurationPlan, case_id: str = "",
                     label: np.ndarray | None = None):
    """(c, z, y, x) image (+ label) -> (data float32, label int8 or None, CaseProperties)."""
    order = plan.transpose
    image = np.transpose(image, [0] + [a + 1 for a in order])
    label = np.transpose(label, order) if label is not None else None
    spacing_t = [float(spacing[a]) for a in order]
    cropped, cropped_label, mask, box = crop_to_nonzero(image, label)
    if cropped_label is not None:
        mask = mask | (cropped_label > 0)  # labelled voxels always count as inside
    data = normalize(cropped, config.normalization, config.use_mask_for_norm, mask, plan.intensity_properties)
    target = case_target_spacing(config, spacing_t)
    shape = new_shape(cropped.shape[1:], spacing_t, target)
    data = resample_image(data, shape, spacing_t, target)
    if cropped_label is not None:
        cropped_label = resample_label(cropped_label, shape, spacing_t, target, sorted(plan.labels)).astype(np.int8)
    props = CaseProperties(case_id, list(image.shape[1:][i] for i in plan.transpose_backward), spacing_t,
                           [list(b) for b in box], list(cropped.shape[1:]), list(shape))
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


def logits_to_original(logits: torch.Tensor, props: CaseProperties, plan: Plan) -> torch.Tensor:
    """(classes, *preprocessed shape) logits -> (classes, z, y, x) on the input grid: resample back to the
    cropped shape, put the crop back (outside it only background is possible), undo the transpose."""
    logits = resample_logits(logits, props.shape_after_crop)
    transposed_shape = [props.original_shape[a] for a in plan.transpose]
    full = torch.zeros((logits.shape[0], *transposed_shape), dtype=logits.dtype)
    full[0] = 1.0
    full[(slice(None),) + tuple(slice(a, b) for a, b in props.box)] = logits
    return full.permute(0, *[a + 1 for a in plan.transpose_backward])
