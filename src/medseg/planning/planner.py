"""Experiment planning from a dataset fingerprint, following nnU-Net v2's rules:

* target spacing: per-axis median; an anisotropic coarse axis takes its 10th-percentile spacing;
* patch: aspect proportional to 1/spacing at 256^3 voxels, clipped to the median shape, shrunk to the
  memory budget;
* topology: an axis is pooled (stride 2) while its feature map is >= 8 and its spacing is within 2x of the
  finest; kernel 3 once an axis's spacing is within 2x of the finest; bottleneck 3; patch divisible by
  2^pools per axis; features 32 * 2^stage, capped;
* batch: from the remaining budget, at most 5% of the dataset's voxels per batch, at least 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medseg.errors import ConfigError
from medseg.planning.fingerprint import DatasetFingerprint
from medseg.planning.plan import ConfigurationPlan, Plan

ANISOTROPY_RATIO = 3.0
MIN_FEATURE_MAP = 4
# Memory reference: nnU-Net fits ~ batch 2 of a 3D patch of this many voxels in 8 GB with 32 base features.
REFERENCE_VOXELS_3D = 128 ** 3
REFERENCE_BATCH_3D = 2
MIN_BATCH = 2
MAX_DATASET_FRACTION_PER_BATCH = 0.05


@dataclass
class PlannerSettings:
    gpu_memory_gb: float = 8.0
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    target_spacing: list[float] | None = None
    patch_size: list[int] | None = None
    batch_size: int | None = None

    @classmethod
    def from_config(cls, cfg) -> "PlannerSettings":
        known = set(cls.__dataclass_fields__)
        d = {k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else v)
             for k, v in dict(cfg).items() if k in known}
        return cls(**d)

    def overridden(self) -> list[str]:
        return [k for k in ("target_spacing", "patch_size", "batch_size") if getattr(self, k) is not None]


@dataclass
class Topology:
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]
    notes: list[str] = field(default_factory=list)


def target_spacing(fp: DatasetFingerprint, why: list[str]) -> tuple[list[float], int | None]:
    spacings = fp.spacings
    shapes = fp.shapes_after_crop
    target = np.median(spacings, axis=0)
    why.append(f"spacing: per-axis median of {len(spacings)} cases = {target.round(4).tolist()}")
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    median_shape = np.median(shapes, axis=0)
    if (target[coarse] > ANISOTROPY_RATIO * min(target[others])
            and median_shape[coarse] * ANISOTROPY_RATIO < min(median_shape[others])):
        p10 = float(np.percentile(spacings[:, coarse], 10))
        target[coarse] = max(p10, max(target[others]))
        why.append(f"spacing: axis {coarse} is anisotropic (> {ANISOTROPY_RATIO}x finer axes, few slices): "
                   f"its 10th percentile {p10:.4g} is used, not below the next-coarsest axis -> {target[coarse]:.4g}")
        return target.tolist(), coarse
    anisotropic = target[coarse] > ANISOTROPY_RATIO * min(target[others])
    return target.tolist(), (coarse if anisotropic else None)


def topology(spacing: list[float], patch_size: list[int]) -> Topology:
    """Strides and kernels per stage for a patch, and the patch grown to be divisible by the total stride."""
    dims = len(spacing)
    cur_spacing = list(map(float, spacing))
    cur_size = list(map(float, patch_size))
    kernels = [1] * dims
    strides = [[1] * dims]
    kernel_list = []
    pools = [0] * dims
    while True:
        finest = min(cur_spacing)
        for a in range(dims):  # kernel 3 once an axis's spacing is within 2x of the finest
            if cur_spacing[a] / finest < 2:
                kernels[a] = 3
        poolable = [a for a in range(dims) if cur_size[a] >= 2 * MIN_FEATURE_MAP]
        if poolable:
            finest_poolable = min(cur_spacing[a] for a in poolable)
            poolable = [a for a in poolable if cur_spacing[a] / finest_poolable < 2]
        # pooling a single axis alone needs room for one more level
        if len(poolable) == 1 and cur_size[poolable[0]] < 3 * MIN_FEATURE_MAP:
            poolable = []
        if not poolable:
            break
        kernel_list.append(list(kernels))
        stride = [2 if a in poolable else 1 for a in range(dims)]
        for a in poolable:
            pools[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = np.ceil(cur_size[a] / 2)
        strides.append(stride)
    kernel_list.append([3] * dims)  # bottleneck
    divisor = [2 ** p for p in pools]
    padded = [int(np.ceil(s / d) * d) for s, d in zip(patch_size, divisor)]
    return Topology(strides, kernel_list, padded)


def plan_3d_fullres(fp: DatasetFingerprint, settings: PlannerSettings, channel_names: list[str],
                    why: list[str]) -> ConfigurationPlan:
    if settings.target_spacing is not None:
        spacing = [float(s) for s in settings.target_spacing]
        anis_axis = None
        why.append(f"spacing: {spacing} (overridden)")
    else:
        spacing, anis_axis = target_spacing(fp, why)
    spacing_arr = np.asarray(spacing)
    shapes = np.array([np.asarray(c.shape_after_crop) * np.asarray(c.spacing) / spacing_arr for c in fp.cases])
    median_shape = np.round(np.median(shapes, axis=0)).astype(int)
    why.append(f"median shape after crop and resampling: {median_shape.tolist()}")

    budget_voxels = REFERENCE_VOXELS_3D * settings.gpu_memory_gb / 8.0 * (32 / settings.base_features)
    if settings.patch_size is not None:
        patch = [int(p) for p in settings.patch_size]
        topo = topology(spacing, patch)
        if topo.patch_size != patch:
            raise ConfigError(f"planner.patch_size={patch} is not divisible by the network's total stride "
                              f"(nearest valid: {topo.patch_size})")
        why.append(f"patch: {patch} (overridden)")
    else:
        inv = 1.0 / spacing_arr
        initial = np.round(inv * (256 ** 3 / np.prod(inv)) ** (1 / 3)).astype(int)
        patch = np.minimum(initial, median_shape).tolist()
        why.append(f"patch: 256^3 voxels shaped by 1/spacing = {initial.tolist()}, clipped to the median "
                   f"shape -> {patch}")
        topo = topology(spacing, patch)
        while np.prod(topo.patch_size) > budget_voxels:
            ratio = np.asarray(topo.patch_size) / median_shape
            axis = int(np.argmax(ratio))
            divisor = int(np.prod([s[axis] for s in topo.strides]))
            patch[axis] = max(divisor, topo.patch_size[axis] - divisor)
            topo = topology(spacing, patch)
            why.append(f"patch: over the {settings.gpu_memory_gb} GB budget, shrink axis {axis} -> {topo.patch_size}")
        why.append(f"patch: made divisible by the total stride per axis -> {topo.patch_size}")
    n_stages = len(topo.strides)
    features = [min(settings.base_features * 2 ** i, settings.max_features_3d) for i in range(n_stages)]
    why.append(f"topology: {n_stages} stages, strides {topo.strides}, kernels {topo.kernel_sizes}, "
               f"features {features}")

    patch_voxels = float(np.prod(topo.patch_size))
    if settings.batch_size is not None:
        batch = int(settings.batch_size)
        why.append(f"batch: {batch} (overridden)")
    else:
        from_budget = int(np.floor(REFERENCE_BATCH_3D * budget_voxels / patch_voxels))
        dataset_voxels = float(np.prod(median_shape)) * len(fp.cases)
        cap = int(round(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels / patch_voxels))
        batch = max(MIN_BATCH, min(from_budget, cap))
        why.append(f"batch: {from_budget} fit the budget, 5% of the dataset's voxels allow {cap}, floor "
                   f"{MIN_BATCH} -> {batch}")

    normalization = ["ct" if n.strip().upper() == "CT" else "zscore" for n in channel_names]
    median_rel = float(np.median([c.relative_size_after_crop for c in fp.cases]))
    use_mask = [scheme == "zscore" and median_rel < 0.75 for scheme in normalization]
    why.append(f"normalisation: {normalization} by channel name {channel_names}; cropping kept "
               f"{median_rel:.0%} of the median volume -> z-score inside the nonzero mask: {use_mask}")
    return ConfigurationPlan("3d_fullres", 3, [float(s) for s in spacing], median_shape.tolist(),
                             [int(p) for p in topo.patch_size], batch, topo.strides, topo.kernel_sizes, features,
                             normalization, use_mask, anis_axis)


def plan_dataset(fp: DatasetFingerprint, channel_names: list[str], labels: dict[int, str],
                 settings: PlannerSettings) -> Plan:
    why: list[str] = []
    fullres = plan_3d_fullres(fp, settings, channel_names, why)
    intensity = [vars(c) for c in fp.intensity]
    return Plan(fp.dataset, list(channel_names), dict(labels), intensity, {"3d_fullres": fullres},
                overridden=settings.overridden(), explanations={"3d_fullres": why}, fingerprint_key=fp.source_key)
