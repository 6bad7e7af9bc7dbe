"""Experiment planning from a dataset fingerprint, giving the same plans as nnU-Net v2.8.1.

The rules (see scripts/nnunet_reference/RULES.md for the measured reference and worked traces):

* target spacing: per-axis median; a coarse axis with > 3x the spacing and < 1/3 the voxels of the others
  takes its 10th-percentile spacing (never below the next-coarsest axis);
* transpose: the coarsest axis first (it becomes the 2d configuration's slicing axis);
* patch: aspect 1/spacing at 256^3 voxels (2d: 2048^2), clipped to the median shape;
* topology: pool an axis while its feature map is >= 8 and its spacing within 2x of the finest poolable axis;
  kernel 3 once an axis's spacing is within 2x of the finest; bottleneck 3; patch rounded up to the total stride;
* memory: shrink the patch along its largest patch/median ratio until the network's feature-map count fits the
  preset's reference budget; batch from the remaining budget, capped to a share of the dataset, floor 2;
* 3d_lowres: only when the fullres patch covers < 25% of the median image, spacing grown by 3% steps;
* normalisation: CT by channel name, else z-score, inside the nonzero mask when cropping removed > 25%.

nnU-Net builds each candidate network to count its feature maps; medseg counts them in closed form
(``feature_map_elements``), which is what makes planning fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.config_keys import check_keys
from medseg.datasets.labels import LabelScheme
from medseg.errors import ConfigError
from medseg.planning.fingerprint import DatasetFingerprint
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.planning.plan_like import plan_like, read_source_plan

ANISOTROPY_RATIO = 3.0
MIN_FEATURE_MAP = 4
MIN_BATCH = 2
REFERENCE_BATCH = {2: 12, 3: 2}
LOWRES_COVERAGE = 0.25  # plan 3d_lowres when the fullres patch covers less of the median image
LOWRES_STEP = 1.03
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
NORMALIZATION_BY_CHANNEL_NAME = {"ct": "ct", "nonorm": "none", "zscore": "zscore", "rescale_to_0_1": "rescale_0_1",
                                 "rgb_to_0_1": "rgb_0_1"}
MASKABLE_SCHEMES = {"zscore"}  # schemes that can normalise inside the nonzero mask only


@dataclass(frozen=True)
class PlannerPreset:
    """nnU-Net's planners differ only in these numbers (ExperimentPlanner, ResEnc M/L/XL)."""

    network: str  # "plain" (2 convs per stage) or "resenc" (residual blocks RESENC_BLOCKS)
    reference_3d: float  # feature-map elements that fit the reference memory at the reference batch
    reference_2d: float
    reference_gb: float
    default_gb: float
    max_dataset_fraction: float  # of the dataset's voxels one batch may cover
    budget_per_sample: bool  # plain planner compares E / ref_batch * 2 with the budget, ResEnc compares E

    def reference(self, dims: int, gpu_gb: float) -> float:
        return (self.reference_3d if dims == 3 else self.reference_2d) * gpu_gb / self.reference_gb

    def fits(self, elements: float, reference: float, dims: int) -> bool:
        if self.budget_per_sample:
            return elements / REFERENCE_BATCH[dims] * 2 <= reference
        return elements <= reference


PRESETS = {
    "default": PlannerPreset("plain", 560e6, 85e6, 8, 8, 0.05, True),
    "resenc": PlannerPreset("resenc", 680e6, 135e6, 8, 8, 0.05, False),
    "resenc_m": PlannerPreset("resenc", 680e6, 135e6, 8, 8, 1.0, False),
    "resenc_l": PlannerPreset("resenc", 2100e6, 380e6, 24, 24, 1.0, False),
    "resenc_xl": PlannerPreset("resenc", 3600e6, 560e6, 40, 40, 1.0, False),
}


@dataclass
class PlannerSettings:
    preset: str = "default"
    gpu_memory_gb: float | None = None  # None: the preset's own (8 GB default, 24 ResEnc L, 40 XL)
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    # forced values for 3d_fullres (target_spacing also shapes 2d and 3d_lowres), in array (z, y, x) order
    target_spacing: list[float] | None = None
    patch_size: list[int] | None = None
    batch_size: int | None = None
    # a trained run (or fold folder, plan.json, checkpoint) whose network every configuration it has takes
    # (medseg.planning.plan_like), so that its weights fit (init_from)
    plan_like: str | None = None

    @classmethod
    def from_config(cls, cfg) -> "PlannerSettings":
        """The settings of a planner config; a key that is not a setting is a ConfigError naming it."""
        known = set(cls.__dataclass_fields__)
        given = dict(cfg)
        check_keys(given, known, "planner settings", "planner")
        d: dict[str, Any] = {k: (list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else v)
                             for k, v in given.items()}
        settings = cls(**d)
        if settings.preset not in PRESETS:
            raise ConfigError(f"planner.preset={settings.preset!r} is unknown; choose from {sorted(PRESETS)}")
        return settings

    @property
    def gpu_gb(self) -> float:
        return float(self.gpu_memory_gb if self.gpu_memory_gb is not None else PRESETS[self.preset].default_gb)

    def overridden(self) -> list[str]:
        """Settings that differ from nnU-Net's defaults, recorded in the plan."""
        default = PlannerSettings()
        return [k for k in self.__dataclass_fields__ if getattr(self, k) != getattr(default, k)]


@dataclass
class Topology:
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]

    @property
    def divisor(self) -> list[int]:
        return [int(np.prod([s[a] for s in self.strides])) for a in range(len(self.patch_size))]


def target_spacing(spacings: np.ndarray, shapes: np.ndarray, why: list[str]) -> np.ndarray:
    target = np.median(spacings, axis=0)
    why.append(f"spacing: per-axis median of {len(spacings)} cases = {np.round(target, 4).tolist()}")
    size = np.median(shapes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != coarse]
    if (target[coarse] > ANISOTROPY_RATIO * max(target[others])
            and size[coarse] * ANISOTROPY_RATIO < min(size[others])):
        p10 = float(np.percentile(spacings[:, coarse], 10))
        floor = float(max(target[others]))
        target[coarse] = p10 if p10 >= floor else floor + 1e-5
        why.append(f"spacing: axis {coarse} is anisotropic (> {ANISOTROPY_RATIO:g}x the others' spacing, < 1/"
                   f"{ANISOTROPY_RATIO:g} of their voxels): its 10th percentile {p10:.4g}, not below {floor:.4g} "
                   f"-> {target[coarse]:.4g}")
    return target


def topology(spacing, patch_size) -> Topology:
    """Strides and kernels per stage for a patch; the patch rounded up to a multiple of the total stride."""
    dims = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    kernels = [1] * dims
    strides, kernel_list, pools = [[1] * dims], [], [0] * dims
    while True:
        poolable = [a for a in range(dims) if cur_size[a] >= 2 * MIN_FEATURE_MAP]
        if poolable:
            finest = min(cur_spacing[a] for a in poolable)
            poolable = [a for a in poolable if cur_spacing[a] / finest < 2]
        # pooling a single axis needs room for one more level on it
        if not poolable or (len(poolable) == 1 and cur_size[poolable[0]] < 3 * MIN_FEATURE_MAP):
            break
        finest_all = min(cur_spacing)
        kernels = [3 if k == 3 or cur_spacing[a] / finest_all < 2 else 1 for a, k in enumerate(kernels)]
        kernel_list.append(list(kernels))
        strides.append([2 if a in poolable else 1 for a in range(dims)])
        for a in poolable:
            pools[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = float(np.ceil(cur_size[a] / 2))
    kernel_list.append([3] * dims)  # bottleneck
    divisor = [2 ** p for p in pools]
    padded = [int(np.ceil(s / d) * d) for s, d in zip(patch_size, divisor)]
    return Topology(strides, kernel_list, padded)


def encoder_blocks(network: str, num_stages: int) -> list[int]:
    """Convs per stage (plain) or residual blocks per stage (resenc)."""
    return [2] * num_stages if network == "plain" else list(RESENC_BLOCKS[:num_stages])


def decoder_convs(network: str, num_stages: int) -> list[int]:
    return [2 if network == "plain" else 1] * (num_stages - 1)


def feature_map_elements(patch, topo: Topology, features: list[int], network: str, num_classes: int) -> float:
    """Output elements of every convolution at batch 1: nnU-Net's activation-memory proxy, in closed form.

    Encoder stage i holds n_i convs of F_i maps of P_i voxels (a residual block has two convs, plus a 1x1
    skip conv where the stage is strided, plus the stem); each decoder stage a transposed conv and its convs;
    then the 1x1 segmentation head at full resolution.
    """
    sizes, size = [], np.asarray(patch, dtype=np.int64)
    for stride in topo.strides:
        size = size // np.asarray(stride)
        sizes.append(float(np.prod(size)))
    n = len(features)
    blocks = encoder_blocks(network, n)
    if network == "plain":
        total = sum(b * f * p for b, f, p in zip(blocks, features, sizes))
    else:
        total = features[0] * float(np.prod(patch))
        total += sum((2 * b + (i > 0)) * f * p for i, (b, f, p) in enumerate(zip(blocks, features, sizes)))
    dec = decoder_convs(network, n)
    for t in range(n - 1):
        level = n - 2 - t
        total += (dec[t] + 1) * features[level] * sizes[level]
    if n >= 2:
        total += num_classes * sizes[0]
    return float(total)


def _features(settings: PlannerSettings, dims: int, num_stages: int) -> list[int]:
    cap = settings.max_features_3d if dims == 3 else settings.max_features_2d
    return [min(settings.base_features * 2 ** i, cap) for i in range(num_stages)]


def plan_configuration(name: str, spacing, median_shape, approx_voxels: float, settings: PlannerSettings,
                       num_classes: int, why: list[str], patch_override=None, batch_override=None) -> dict:
    """Topology, patch and batch of one configuration (spacing/median in planning axis order)."""
    dims = len(spacing)
    preset = PRESETS[settings.preset]
    spacing = np.asarray(spacing, dtype=np.float64)
    median_shape = np.asarray(median_shape, dtype=np.float64)
    reference = preset.reference(dims, settings.gpu_gb)
    if patch_override is not None:
        patch = [int(p) for p in patch_override]
        topo = topology(spacing, patch)
        if topo.patch_size != patch:
            raise ConfigError(f"planner.patch_size={patch} is not divisible by the network's total stride "
                              f"(nearest valid: {topo.patch_size})")
        why.append(f"{name} patch: {patch} (overridden)")
    else:
        inv = 1.0 / spacing
        voxels = 256.0 ** 3 if dims == 3 else 2048.0 ** 2
        initial = np.round(inv * (voxels / np.prod(inv)) ** (1 / dims))
        clipped = np.minimum(initial, median_shape)
        topo = topology(spacing, clipped.tolist())
        why.append(f"{name} patch: {int(round(voxels)):,} voxels shaped by 1/spacing = {initial.astype(int).tolist()}, "
                   f"clipped to the median {median_shape.tolist()}, rounded up to the total stride -> "
                   f"{topo.patch_size}")
        patch = list(topo.patch_size)
        features = _features(settings, dims, len(topo.strides))
        elements = feature_map_elements(patch, topo, features, preset.network, num_classes)
        while not preset.fits(elements, reference, dims):
            ratios = np.asarray(patch, dtype=np.float64) / median_shape
            axis = int(len(ratios) - 1 - np.argmax(ratios[::-1]))  # largest ratio; ties: the last axis
            trial = list(patch)
            trial[axis] -= topo.divisor[axis]
            patch[axis] -= topology(spacing, trial).divisor[axis]
            topo = topology(spacing, patch)
            patch = list(topo.patch_size)
            features = _features(settings, dims, len(topo.strides))
            previous, elements = elements, feature_map_elements(patch, topo, features, preset.network, num_classes)
            why.append(f"{name} patch: {previous / 1e6:.1f}M feature-map elements exceed the {settings.gpu_gb:g} GB "
                       f"budget; shrink axis {axis} -> {patch} ({elements / 1e6:.1f}M)")
    features = _features(settings, dims, len(topo.strides))
    elements = feature_map_elements(patch, topo, features, preset.network, num_classes)
    if batch_override is not None:
        batch = int(batch_override)
        why.append(f"{name} batch: {batch} (overridden)")
    else:
        from_budget = int(round(reference / elements * REFERENCE_BATCH[dims]))
        cap = int(round(approx_voxels * preset.max_dataset_fraction / float(np.prod(patch))))
        batch = max(min(from_budget, cap), MIN_BATCH)
        why.append(f"{name} batch: {from_budget} fit the budget, {preset.max_dataset_fraction:.0%} of the dataset's "
                   f"voxels allow {cap}, floor {MIN_BATCH} -> {batch}")
    why.append(f"{name} topology: {len(topo.strides)} stages, strides {topo.strides}, kernels {topo.kernel_sizes}, "
               f"features {features}")
    return {"patch_size": [int(p) for p in patch], "batch_size": batch, "strides": topo.strides,
            "kernel_sizes": topo.kernel_sizes, "features": features}


def _normalization(channel_names: list[str], median_relative_size: float, why: list[str]):
    schemes = [NORMALIZATION_BY_CHANNEL_NAME.get(n.strip().casefold(), "zscore") for n in channel_names]
    use_mask = [s in MASKABLE_SCHEMES and median_relative_size < 0.75 for s in schemes]
    why.append(f"normalisation: {schemes} from channel names {channel_names}; cropping kept "
               f"{median_relative_size:.1%} of the median volume -> inside the nonzero mask: {use_mask}")
    return schemes, use_mask


def plan_dataset(fp: DatasetFingerprint, channel_names: list[str], scheme: LabelScheme,
                 settings: PlannerSettings) -> Plan:
    """Plans 2d, 3d_fullres and, where the rules call for it, 3d_lowres (+ cascade)."""
    why: list[str] = []
    preset = PRESETS[settings.preset]
    num_classes = scheme.num_outputs  # the output channels the memory estimate counts
    spacings, shapes = fp.spacings, fp.shapes_after_crop
    if settings.target_spacing is not None:
        target = np.asarray(settings.target_spacing, dtype=np.float64)
        if target.shape != (3,) or np.any(target <= 0):
            raise ConfigError(f"planner.target_spacing={settings.target_spacing} must be 3 positive numbers")
        why.append(f"spacing: {target.tolist()} (overridden)")
    else:
        target = target_spacing(spacings, shapes, why)
    coarse = int(np.argmax(target))
    transpose = [coarse] + [a for a in range(3) if a != coarse]
    why.append(f"axis order: coarsest axis {coarse} first -> transpose {transpose} (2d slices along it)")
    new_shapes = np.array([[int(round(float(sp / t * s))) for sp, t, s in zip(case_sp, target, case_sh)]
                           for case_sp, case_sh in zip(spacings, shapes)])
    median = np.median(new_shapes, axis=0)
    spacing_t, median_t = target[transpose], median[transpose]
    approx_voxels = float(np.prod(median_t)) * len(fp.cases)
    why.append(f"median shape after resampling (transposed): {median_t.tolist()}")
    schemes, use_mask = _normalization(channel_names, float(np.median([c.relative_size_after_crop
                                                                      for c in fp.cases])), why)

    def config(name, spacing, median_shape, approx, notes=why, **overrides) -> ConfigurationPlan:
        p = plan_configuration(name, spacing, median_shape, approx, settings, num_classes, notes, **overrides)
        blocks = encoder_blocks(preset.network, len(p["features"]))
        return ConfigurationPlan(name=name, spatial_dims=len(spacing), spacing=[float(s) for s in spacing],
                                 median_shape=[float(m) for m in median_shape], network=preset.network,
                                 encoder_blocks=blocks, decoder_convs=decoder_convs(preset.network, len(blocks)),
                                 normalization=schemes, use_mask_for_norm=use_mask, **p)

    configurations = {"2d": config("2d", spacing_t[1:], median_t[1:], approx_voxels)}
    if median_t[0] == 1:  # single-slice images: only the 2d configuration makes sense
        why.append("3d_fullres: not planned, the median image has a single slice")
    else:
        patch_override = [settings.patch_size[a] for a in transpose] if settings.patch_size is not None else None
        fullres = config("3d_fullres", spacing_t, median_t, approx_voxels, patch_override=patch_override,
                         batch_override=settings.batch_size)
        lowres = _plan_lowres(spacing_t, median_t, fullres, len(fp.cases), config, why)
        fullres.batch_dice = lowres is not None  # nnU-Net: batch Dice for fullres only within a cascade
        if lowres is not None:
            lowres.batch_dice = False
            lowres.next_stage = "3d_cascade_fullres"
            configurations["3d_lowres"] = lowres
        configurations["3d_fullres"] = fullres
        if lowres is not None:
            configurations["3d_cascade_fullres"] = ConfigurationPlan(
                **{**vars(fullres), "name": "3d_cascade_fullres", "previous_stage": "3d_lowres"})
    plan = Plan(fp.dataset, list(channel_names), dict(scheme.labels), [vars(c) for c in fp.intensity],
                configurations, transpose=transpose, planner=settings.preset, gpu_memory_gb=settings.gpu_gb,
                overridden=settings.overridden(), explanations=why, fingerprint_key=fp.source_key,
                regions=list(scheme.regions), regions_class_order=list(scheme.regions_class_order))
    if settings.plan_like:
        source, source_file = read_source_plan(settings.plan_like)
        plan = plan_like(plan, source, source_file, settings.batch_size)
    return plan


def _plan_lowres(spacing_t, median_t, fullres: ConfigurationPlan, num_cases: int, config, why):
    median_voxels = float(np.prod(median_t))
    coverage = float(np.prod(fullres.patch_size)) / median_voxels
    if coverage >= LOWRES_COVERAGE:
        why.append(f"3d_lowres: not needed, the fullres patch covers {coverage:.0%} of the median image")
        return None
    low_spacing = np.array(spacing_t, dtype=np.float64)
    lowres: ConfigurationPlan | None = None
    steps = 0
    notes: list[str] = []
    while coverage < LOWRES_COVERAGE:
        ratio = low_spacing.max() / low_spacing
        if np.any(ratio > 2):  # the fine axes catch up with the coarse one first
            low_spacing[ratio > 2] *= LOWRES_STEP
        else:
            low_spacing *= LOWRES_STEP
        steps += 1
        scaled = spacing_t / low_spacing * median_t
        median_voxels = float(np.prod(scaled))
        low_median = [float(round(v)) for v in scaled]
        notes = []  # only the last step's reasoning is kept
        lowres = config("3d_lowres", low_spacing.copy(), low_median, median_voxels * num_cases, notes=notes)
        coverage = float(np.prod(lowres.patch_size)) / median_voxels
    assert lowres is not None  # the loop ran at least once: coverage started below LOWRES_COVERAGE
    if float(np.prod(median_t)) / median_voxels < 2:
        why.append("3d_lowres: dropped, its resolution differs from 3d_fullres by less than 2x in voxels")
        return None
    why.append(f"3d_lowres: the fullres patch covers < {LOWRES_COVERAGE:.0%} of the median image; spacing grown "
               f"{steps} x {LOWRES_STEP} -> {np.round(low_spacing, 4).tolist()}, patch {lowres.patch_size}")
    why.extend(notes)
    return lowres
