"""Plan dataclasses: everything training and prediction need to know about a configuration, as JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medseg.atomic import write_json
from medseg.errors import ConfigError

PLAN_VERSION = 1
PREPROCESSING_VERSION = 2  # bump when preprocessing code changes what it writes: old caches are then redone


@dataclass
class ConfigurationPlan:
    name: str  # "3d_fullres", "2d"
    spatial_dims: int
    spacing: list[float]  # target spacing, voxel-index axis order
    median_shape: list[int]  # median shape after crop and resampling
    patch_size: list[int]
    batch_size: int
    strides: list[list[int]]  # per stage; the first is all ones
    kernel_sizes: list[list[int]]  # per stage
    features: list[int]  # per stage
    normalization: list[str]  # per channel: "zscore" or "ct"
    use_mask_for_norm: list[bool]  # per channel
    anisotropy_axis: int | None = None  # coarse axis resampled separately, if the data is anisotropic

    @property
    def num_stages(self) -> int:
        return len(self.features)

    def preprocessing_key(self, intensity: list[dict]) -> str:
        """Changes exactly when the preprocessed arrays of this configuration would change."""
        relevant = {"version": PREPROCESSING_VERSION, "spacing": self.spacing, "normalization": self.normalization,
                    "use_mask_for_norm": self.use_mask_for_norm, "anisotropy_axis": self.anisotropy_axis,
                    "intensity": intensity if "ct" in self.normalization else None}
        return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Plan:
    dataset: str
    channel_names: list[str]
    labels: dict[int, str]
    intensity_properties: list[dict]  # per channel, from the fingerprint (used by CT normalisation)
    configurations: dict[str, ConfigurationPlan]
    overridden: list[str] = field(default_factory=list)  # planner keys forced from the config
    explanations: dict[str, list[str]] = field(default_factory=dict)  # why each value was chosen
    fingerprint_key: str = ""
    version: int = PLAN_VERSION

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise ConfigError(f"configuration {name!r} is not in the plan of {self.dataset} "
                              f"(planned: {sorted(self.configurations)})")
        return self.configurations[name]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        configs = {k: ConfigurationPlan(**v) for k, v in d["configurations"].items()}
        return cls(d["dataset"], list(d["channel_names"]), {int(k): v for k, v in d["labels"].items()},
                   list(d["intensity_properties"]), configs, list(d.get("overridden", [])),
                   dict(d.get("explanations", {})), d.get("fingerprint_key", ""), d.get("version", PLAN_VERSION))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))
