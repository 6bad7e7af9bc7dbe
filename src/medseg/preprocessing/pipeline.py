"""One case through transpose -> crop -> normalise -> resample (nnU-Net's order), and the way back."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.planning.crop import bounding_box, crop, crop_to_nonzero, nonzero_mask
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


def case_grid(image: np.ndarray, spacing, plan: Plan, config: ConfigurationPlan, case_id: str = "") -> CaseProperties:
    """The properties ``preprocess_image`` would give the case (transpose, crop box, shapes), without normalising
    or resampling the image: where a label map of the case lands on the configuration's preprocessed grid."""
    image_t = np.transpose(image, [0] + [a + 1 for a in plan.transpose])
    spacing_t = [float(spacing[a]) for a in plan.transpose]
    box = bounding_box(nonzero_mask(image_t))
    cropped_shape = [b - a for a, b in box]
    shape = new_shape(cropped_shape, spacing_t, case_target_spacing(config, spacing_t))
    return CaseProperties(case_id, list(image.shape[1:]), spacing_t, [list(b) for b in box], cropped_shape,
                          list(shape))


def label_to_grid(label: np.ndarray, props: CaseProperties, plan: Plan, config: ConfigurationPlan) -> np.ndarray:
    """A (z, y, x) label map on the case's input grid -> the configuration's preprocessed grid, as
    ``preprocess_image`` moves a case's label (transpose, crop to ``props.box``, resample): a previous stage's
    prediction then lies voxel for voxel on the cached image. ``props`` may come from any configuration of the
    plan (the crop box depends on the image alone)."""
    cropped = crop(np.transpose(label, plan.transpose), [tuple(b) for b in props.box])
    target = case_target_spacing(config, props.spacing)
    shape = new_shape(props.shape_after_crop, props.spacing, target)
    dtype = np.int8 if max(plan.labels) < 128 else np.int16
    return resample_label(cropped, shape, props.spacing, target, sorted(plan.labels)).astype(dtype)


def class_locations(label: np.ndarray, classes: list, seed: int = 1234, key: int | None = None,
                    ) -> dict[int, np.ndarray]:
    """Up to MAX_LOCATIONS_PER_CLASS voxel coordinates per foreground class, for foreground oversampling
    (stored under ``key`` instead of the class where given)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c in classes:
        coords = np.argwhere(label == c)
        if len(coords) > MAX_LOCATIONS_PER_CLASS:
            coords = coords[rng.choice(len(coords), MAX_LOCATIONS_PER_CLASS, replace=False)]
        out[int(c) if key is None else key] = coords.astype(np.int32)
    return out


# logit of every region outside the crop: no region there (a sigmoid of 2e-9, whatever the ensemble's mean)
OUTSIDE_REGION_LOGIT = -20.0


def outside_crop_logits(channels: int, shape, regions: bool) -> torch.Tensor:
    """Logits of the voxels cropping removed (nothing but background there): background wins the softmax, or
    every region's sigmoid is near 0."""
    if regions:
        return torch.full((channels, *shape), OUTSIDE_REGION_LOGIT, dtype=torch.float32)
    out = torch.zeros((channels, *shape), dtype=torch.float32)
    out[0] = 1.0
    return out


def logits_to_original(logits: torch.Tensor, props: CaseProperties, plan: Plan) -> torch.Tensor:
    """(classes, *preprocessed shape) logits -> (classes, z, y, x) on the input grid: resample back to the
    cropped shape, put the crop back (outside it only background is possible), undo the transpose."""
    logits = resample_logits(logits, props.shape_after_crop)
    transposed_shape = [props.original_shape[a] for a in plan.transpose]
    full = outside_crop_logits(logits.shape[0], transposed_shape, plan.label_scheme.has_regions).to(logits.dtype)
    full[(slice(None),) + tuple(slice(a, b) for a, b in props.box)] = logits
    return full.permute(0, *[a + 1 for a in plan.transpose_backward])
