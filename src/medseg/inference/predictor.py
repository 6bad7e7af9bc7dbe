"""Predict label maps for images on their own grid, from one checkpoint or an ensemble of fold checkpoints."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from medseg.data.io import image_suffix, read_image, strip_suffix, write_label
from medseg.errors import MedsegError
from medseg.models import create_model
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.preprocessing.pipeline import logits_to_original, preprocess_image
from medseg.inference.sliding_window import predict_logits

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    model: nn.Module
    plan: Plan
    config: ConfigurationPlan
    source: str


def load_checkpoint(path: str | Path, device: torch.device) -> TrainedModel:
    """Rebuild a model from a medseg checkpoint; tensors and plain data only (``weights_only``)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is reported, never executed
        raise MedsegError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None
    if "medseg" not in ckpt or "state_dict" not in ckpt:
        raise MedsegError(f"{path}: not a medseg checkpoint (no plan inside)")
    extras = ckpt["medseg"]
    plan = Plan.from_dict(extras["plan"])
    config = plan.configuration(extras["configuration"])
    spec = extras["model"]
    model = create_model(spec["name"], config.spatial_dims, len(plan.channel_names), len(plan.labels),
                         plan=config, **spec.get("kwargs", {}))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.to(device).eval()
    return TrainedModel(model, plan, config, str(path))


def find_checkpoints(ckpt_dir: str | Path, which: str = "best") -> list[Path]:
    """A fold dir gives its checkpoint; a run dir gives one per fold_* below it (the fold ensemble)."""
    ckpt_dir = Path(ckpt_dir)
    fold_dirs = [ckpt_dir] if (ckpt_dir / "checkpoints").is_dir() else sorted(ckpt_dir.glob("fold_*"))
    found = []
    for d in fold_dirs:
        for name in (f"{which}.ckpt", "last.ckpt"):
            if (d / "checkpoints" / name).is_file():
                found.append(d / "checkpoints" / name)
                break
    if not found:
        raise MedsegError(f"{ckpt_dir}: no checkpoints found (expected checkpoints/{which}.ckpt in it or in fold_*/)")
    return found


@dataclass
class Predictor:
    models: list[TrainedModel]
    overlap: float = 0.5
    mirror_axes: tuple[int, ...] | None = None
    sw_batch_size: int = 4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        first = self.models[0].plan
        for m in self.models[1:]:
            if m.plan.labels != first.labels or m.plan.channel_names != first.channel_names:
                raise MedsegError(f"{m.source}: labels or channels differ from {self.models[0].source}; "
                                  "an ensemble must share them")

    @property
    def plan(self) -> Plan:
        return self.models[0].plan

    def predict_logits(self, image: np.ndarray, spacing) -> torch.Tensor:
        """(c, *shape) image on its own grid -> (classes, *shape) mean logits on the same grid."""
        if image.shape[0] != len(self.plan.channel_names):
            raise MedsegError(f"image has {image.shape[0]} channel(s), the model expects "
                              f"{len(self.plan.channel_names)} ({self.plan.channel_names})")
        groups: dict[str, list[TrainedModel]] = {}
        for m in self.models:  # models sharing preprocessing share one preprocessed copy
            groups.setdefault(m.plan.preprocessing_key(m.config.name), []).append(m)
        total = None
        for members in groups.values():
            data, _, props = preprocess_image(image, spacing, members[0].plan, members[0].config)
            x = torch.from_numpy(data)
            summed = sum(predict_logits(m.model, x, m.config.patch_size, self.overlap, self.mirror_axes,
                                        self.sw_batch_size, self.device).cpu() for m in members)
            full = logits_to_original(summed, props, members[0].plan)
            total = full if total is None else total + full
        return total / len(self.models)

    def predict_label(self, image: np.ndarray, spacing) -> np.ndarray:
        labels = np.asarray(sorted(self.plan.labels))
        return labels[self.predict_logits(image, spacing).argmax(0).numpy()]

    def predict_file(self, paths: list[Path], output: Path) -> None:
        image, geometry = read_image(paths)
        write_label(self.predict_label(image, geometry.spacing), geometry, output)


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def group_cases(files: list[Path], num_channels: int) -> dict[str, list[Path]]:
    """Case id -> channel files. ``<case>_0000`` style names (nnU-Net) group channels; otherwise each file is
    one case (a 4D file may hold every channel)."""
    cases: dict[str, list[Path]] = {}
    for f in files:
        stem = strip_suffix(f)
        m = _CHANNEL.match(stem)
        if m:
            cases.setdefault(m["case"], []).append(f)
        else:
            cases[stem] = [f]
    for case, paths in cases.items():
        paths.sort()
        if len(paths) > 1 and len(paths) != num_channels:
            raise MedsegError(f"case {case}: {len(paths)} channel files, the model expects {num_channels}")
    return cases


def output_path(case_id: str, inputs: list[Path], output_dir: Path) -> Path:
    """Same format as the input (first channel's suffix)."""
    return output_dir / f"{case_id}{image_suffix(inputs[0]) or '.nii.gz'}"


def check_output_dir(input_dir: Path, output_dir: Path) -> None:
    i, o = input_dir.resolve(), output_dir.resolve()
    if o == i or o.is_relative_to(i):
        raise MedsegError(f"output {output_dir} is inside the input folder {input_dir}; medseg never writes there")


