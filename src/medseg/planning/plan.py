"""Plan dataclasses: everything training and prediction need to know about a configuration, as JSON.

Shapes, spacings and patch sizes of a configuration are in planning axis order: the array (z, y, x) axes
permuted by ``Plan.transpose`` (the coarsest axis first). Preprocessing transposes each case the same way and
prediction transposes back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medseg.atomic import write_json
from medseg.datasets.labels import LabelScheme, Region
from medseg.errors import ConfigError

PLAN_VERSION = 2
PREPROCESSING_VERSION = 4  # bump when preprocessing code changes what it writes: old caches are then redone


@dataclass
class ConfigurationPlan:
    name: str  # "2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"
    spatial_dims: int
    spacing: list[float]  # target spacing (2d: in-plane only; the slice axis keeps each case's own)
    median_shape: list[float]  # median shape after crop and resampling
    patch_size: list[int]
    batch_size: int
    strides: list[list[int]]  # per stage; the first is all ones
    kernel_sizes: list[list[int]]  # per stage
    features: list[int]  # per stage
    normalization: list[str]  # per channel: "zscore", "ct", "none", "rescale_0_1", "rgb_0_1"
    use_mask_for_norm: list[bool]  # per channel
    network: str = "plain"  # "plain" or "resenc": the planner preset's network the budget was sized for
    encoder_blocks: list[int] = field(default_factory=list)  # convs (plain) or residual blocks (resenc) per stage
    decoder_convs: list[int] = field(default_factory=list)
    batch_dice: bool = True
    next_stage: str | None = None
    previous_stage: str | None = None

    @property
    def num_stages(self) -> int:
        return len(self.features)

    @property
    def data_identifier(self) -> str:
        """Which preprocessed data the configuration trains on (the cascade's fullres stage shares 3d_fullres's)."""
        return "3d_fullres" if self.name == "3d_cascade_fullres" else self.name


@dataclass
class Plan:
    dataset: str
    channel_names: list[str]
    labels: dict[int, str]
    intensity_properties: list[dict]  # per channel, from the fingerprint (used by CT normalisation)
    configurations: dict[str, ConfigurationPlan]
    transpose: list[int] = field(default_factory=lambda: [0, 1, 2])  # array axes -> planning axes
    planner: str = "default"
    gpu_memory_gb: float = 8.0
    overridden: list[str] = field(default_factory=list)  # planner keys forced from the config
    explanations: list[str] = field(default_factory=list)  # why each value was chosen
    fingerprint_key: str = ""
    version: int = PLAN_VERSION
    regions: list[Region] = field(default_factory=list)  # nnU-Net's region-based labels (datasets/labels.py)
    regions_class_order: list[int] = field(default_factory=list)

    @property
    def label_scheme(self) -> LabelScheme:
        return LabelScheme(self.labels, tuple(self.regions), tuple(self.regions_class_order))

    @property
    def transpose_backward(self) -> list[int]:
        return [self.transpose.index(a) for a in range(len(self.transpose))]

    @property
    def main_configuration(self) -> str:
        """3d_fullres where planned; 2d for datasets that plan only 2d (pictures, one-slice images)."""
        return "3d_fullres" if "3d_fullres" in self.configurations else "2d"

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            hint = "; single-slice images (2D pictures) plan 2d only: configuration=2d, medseg-plan " \
                "preprocess=[2d]" if list(self.configurations) == ["2d"] else ""
            raise ConfigError(f"configuration {name!r} is not in the plan of {self.dataset} "
                              f"(planned: {sorted(self.configurations)}){hint}")
        return self.configurations[name]

    def preprocessing_key(self, name: str) -> str:
        """Changes exactly when the preprocessed arrays of a configuration would change."""
        c = self.configuration(name)
        relevant = {"version": PREPROCESSING_VERSION, "transpose": self.transpose, "dims": c.spatial_dims,
                    "spacing": c.spacing, "normalization": c.normalization, "use_mask": c.use_mask_for_norm,
                    "intensity": self.intensity_properties if "ct" in c.normalization else None,
                    "labels": self.label_scheme.to_dict()}  # which class locations are kept
        return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        d["regions"] = [r.to_dict() for r in self.regions]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ConfigError(f"plan version {d.get('version')} is not {PLAN_VERSION}: re-run medseg-plan")
        configs = {k: ConfigurationPlan(**v) for k, v in d["configurations"].items()}
        fields = {k: v for k, v in d.items() if k not in ("labels", "configurations", "regions")}
        return cls(labels={int(k): v for k, v in d["labels"].items()}, configurations=configs,
                   regions=[Region.from_dict(r) for r in d.get("regions", [])], **fields)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))
