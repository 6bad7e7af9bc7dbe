"""Predict label maps for images on their own grid, from one checkpoint or an ensemble of fold checkpoints.

Prediction of a case is three steps so that a batch can overlap them (medseg.inference.batch):
``prepare`` (preprocessing, CPU), ``infer`` (sliding-window model, the compute device) and ``finish``
(logits back onto the input grid, argmax, optional probabilities; CPU, slab by slab so the full-resolution
float32 logits of a large volume never exist at once).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medseg.checkpoint import load_weights_only
from medseg.datasets.dicom import DicomSeries, ImageInput
from medseg.datasets.io import image_suffix, read_image, strip_suffix, write_label
from medseg.errors import MedsegError
from medseg.layout import trained_fold_dirs
from medseg.models import create_model
from medseg.planning.plan import ConfigurationPlan, Plan
from medseg.precision import autocast_dtype, cuda_capability, inference_precision
from medseg.preprocessing.pipeline import CaseProperties, outside_crop_logits, preprocess_image
from medseg.preprocessing.previous_stage import num_input_channels, with_previous_stage
from medseg.inference.probability_files import probability_file, write_probabilities
from medseg.inference.sliding_window import predict_logits

log = logging.getLogger(__name__)

# logits are held in half precision between infer and finish (as nnU-Net aggregates them): half the memory
# while the next case is predicted; argmax can only change where two classes tie to ~1e-3
LOGIT_DTYPE = torch.float16
# float32 working memory of one output slab in finish
SLAB_BYTES = 64 * 2**20


@dataclass
class TrainedModel:
    model: nn.Module
    plan: Plan
    config: ConfigurationPlan
    source: str
    precision: str = "32-true"  # what it was trained with (Lightning's name)
    # a cascade stage's previous stage as trained: {"configuration", "run" (relative to this model's run folder),
    # "folds"}; None for any other configuration
    previous_stage: dict | None = None
    # the registry record the network was built from ({"name", "kwargs"}); None where not known
    model_spec: dict | None = None


def build_model(plan: Plan, config: ConfigurationPlan, spec: dict) -> nn.Module:
    """The untrained network a checkpoint's (or an archive's) model record describes: registry name and keys."""
    return create_model(spec["name"], config.spatial_dims, num_input_channels(plan, config),
                        plan.label_scheme.num_outputs, plan=config, **spec.get("kwargs", {}))


def load_checkpoint(path: str | Path, device: torch.device) -> TrainedModel:
    """Rebuild a model from a medseg checkpoint; tensors and plain data only (``weights_only``)."""
    path = Path(path)
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or "medseg" not in ckpt or "state_dict" not in ckpt:
        raise MedsegError(f"{path}: not a medseg checkpoint (no plan inside)")
    extras = ckpt["medseg"]
    plan = Plan.from_dict(extras["plan"])
    config = plan.configuration(extras["configuration"])
    model = build_model(plan, config, extras["model"])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.to(device).eval()
    return TrainedModel(model, plan, config, str(path), str(extras.get("precision", "32-true")),
                        extras.get("previous_stage"), extras["model"])


def first_precision(models: list[TrainedModel]) -> str:
    """The ensemble's training precision; float32 when its members differ."""
    kinds = {m.precision for m in models}
    return kinds.pop() if len(kinds) == 1 else "32-true"


def find_checkpoints(ckpt_dir: str | Path, which: str = "last") -> list[Path]:
    """A fold dir gives its checkpoint; a run dir gives one per fold_* below it (the fold ensemble).
    ``last`` (the default) are the final weights, the ones training validated, as nnU-Net; ``best`` falls
    back to ``last`` in a fold that has none."""
    ckpt_dir = Path(ckpt_dir)
    # fold_<k> only: folders set aside by overwrite=true (fold_<k>.replaced-<time>) are not ensemble members
    fold_dirs = [ckpt_dir] if (ckpt_dir / "checkpoints").is_dir() else trained_fold_dirs(ckpt_dir)
    found = []
    for d in fold_dirs:
        for name in (f"{which}.ckpt", "last.ckpt"):
            if (d / "checkpoints" / name).is_file():
                found.append(d / "checkpoints" / name)
                break
    if not found:
        raise MedsegError(f"{ckpt_dir}: no checkpoints found (expected checkpoints/{which}.ckpt in it or in fold_*/)")
    return found


def resolve_mirror_axes(value, spatial_dims: int) -> tuple[int, ...] | None:
    """``"all"``: every spatial axis of the configuration; None or []: no mirroring; a list: those axes
    (planning order, as the model sees the volume). Axes a 2D model lacks are left out."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        return None
    if isinstance(value, str):
        if value != "all":
            raise MedsegError(f"mirror_axes={value!r}: expected 'all', null or a list of axes")
        return tuple(range(spatial_dims))
    axes = tuple(int(a) for a in value)
    bad = [a for a in axes if not 0 <= a < 3]
    if bad:
        raise MedsegError(f"mirror_axes={list(axes)}: axes must be 0, 1 or 2")
    kept = tuple(a for a in dict.fromkeys(axes) if a < spatial_dims)
    return kept or None


@dataclass
class PreparedGroup:
    """One preprocessed copy of a case, shared by the ensemble members with the same preprocessing."""

    models: list[TrainedModel]
    data: torch.Tensor | None  # (c, *preprocessed shape); None once released
    props: CaseProperties


@dataclass
class Prepared:
    groups: list[PreparedGroup]
    shape: tuple[int, ...]  # the input grid, array (z, y, x) order

    def release(self) -> None:
        """Drop the preprocessed images (finish needs only the properties) while the case waits to be written."""
        for g in self.groups:
            g.data = None


@dataclass
class Prediction:
    label: np.ndarray  # (z, y, x) int16 label values on the input grid
    labels: np.ndarray  # the label value of each channel: ascending labels, or the value each region paints
    probabilities: np.ndarray | None = None  # float16 (channels, z, y, x) softmax, or sigmoid per region


class StagedPrediction:
    """A whole case through a predictor's three steps (prepare, infer, finish); shared by one run's Predictor and
    an ensemble of runs (medseg.inference.ensemble)."""

    def predict(self, image: np.ndarray, spacing, probabilities: bool = False) -> "Prediction":
        prepared = self.prepare(image, spacing)  # type: ignore[attr-defined]
        logits = self.infer(prepared)  # type: ignore[attr-defined]
        prepared.release()
        return self.finish(logits, prepared, probabilities)  # type: ignore[attr-defined]

    def predict_label(self, image: np.ndarray, spacing) -> np.ndarray:
        return self.predict(image, spacing).label


@dataclass
class Predictor(StagedPrediction):
    models: list[TrainedModel]
    overlap: float = 0.5
    mirror_axes: str | tuple[int, ...] | None = None  # "all", None or axes; resolved per model's configuration
    sw_batch_size: int = 4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # the network's precision: "auto" follows training where safe on this device (medseg.precision), or a
    # Lightning name ("32-true", "bf16-mixed", "16-mixed"); logits are always summed in float32
    precision: str = "auto"
    # for cascade stages (3d_cascade_fullres): the previous stage's predictor, run on each case first; its label
    # map becomes the extra input channels (medseg.inference.cascade builds it from the cascade's run)
    previous_stage: Predictor | None = None

    def __post_init__(self):
        first = self.models[0].plan
        for m in self.models[1:]:
            if m.plan.label_scheme != first.label_scheme or m.plan.channel_names != first.channel_names:
                raise MedsegError(f"{m.source}: labels or channels differ from {self.models[0].source}; "
                                  "an ensemble must share them")
        cascades = [m for m in self.models if m.config.previous_stage]
        if cascades and self.previous_stage is None:
            raise MedsegError(f"{cascades[0].source}: a {cascades[0].config.name} model needs the predictions of its "
                              f"previous stage ({cascades[0].config.previous_stage}), and none was given")
        if self.previous_stage is not None and self.previous_stage.plan.label_scheme != first.label_scheme:
            raise MedsegError(f"{self.previous_stage.models[0].source}: the previous stage's labels differ from "
                              f"those of {self.models[0].source}")
        self._mirror = {id(m): resolve_mirror_axes(self.mirror_axes, m.config.spatial_dims) for m in self.models}
        if self.precision == "auto":
            capability = cuda_capability(self.device) if self.device.type == "cuda" else None
            self.precision = inference_precision(first_precision(self.models), self.device.type, capability)
        self._autocast = autocast_dtype(self.precision)
        self._groups: dict[str, list[TrainedModel]] = {}
        for m in self.models:  # models sharing preprocessing (and inputs) share one preprocessed copy
            key = f"{m.plan.preprocessing_key(m.config.name)}|{m.config.previous_stage or ''}"
            self._groups.setdefault(key, []).append(m)

    @property
    def plan(self) -> Plan:
        return self.models[0].plan

    @property
    def label_values(self) -> np.ndarray:
        """The label value of each output channel (the value a region paints, for region-based labels)."""
        scheme = self.plan.label_scheme
        return np.asarray(scheme.regions_class_order if scheme.has_regions else scheme.values, dtype=np.int16)

    def prepare(self, image: np.ndarray, spacing) -> Prepared:
        """(c, z, y, x) image on its own grid -> preprocessed copies, one per preprocessing in the ensemble. A cascade
        stage's copy gets its previous stage's prediction as extra channels: that stage is predicted here, so batch
        prediction counts it in the case's read time."""
        if image.shape[0] != len(self.plan.channel_names):
            raise MedsegError(f"image has {image.shape[0]} channel(s), the model expects "
                              f"{len(self.plan.channel_names)} ({self.plan.channel_names})")
        groups = []
        previous: np.ndarray | None = None  # the previous stage's label map on the input grid, made once
        for members in self._groups.values():
            plan, config = members[0].plan, members[0].config
            data, _, props = preprocess_image(image, spacing, plan, config)
            tensor = torch.from_numpy(data)
            if config.previous_stage:
                if previous is None:
                    assert self.previous_stage is not None  # checked in __post_init__
                    # as nnU-Net: the previous stage's label map (not post-processed), preprocessed as a label
                    previous = self.previous_stage.predict(image, spacing).label
                tensor = with_previous_stage(tensor, previous, props, plan, config)
            groups.append(PreparedGroup(members, tensor, props))
        return Prepared(groups, tuple(int(s) for s in image.shape[1:]))

    def infer(self, prepared: Prepared) -> list[torch.Tensor]:
        """Summed logits of each group's members on its preprocessed grid (CPU, half precision)."""
        out = []
        for g in prepared.groups:
            if g.data is None:
                raise ValueError("prepared case was released before inference")
            summed: torch.Tensor | None = None
            for m in g.models:
                logits = predict_logits(m.model, g.data, m.config.patch_size, self.overlap, self._mirror[id(m)],
                                        self.sw_batch_size, self.device, self._autocast).cpu()
                summed = logits if summed is None else summed.add_(logits)
                del logits
            assert summed is not None  # every group has a model
            out.append(summed.to(LOGIT_DTYPE))
        return out

    def finish(self, logits: list[torch.Tensor], prepared: Prepared, probabilities: bool = False) -> Prediction:
        """Mean logits back on the input grid -> label map (and probabilities), slab by slab."""
        shape, values, scheme = prepared.shape, self.label_values, self.plan.label_scheme
        label = np.empty(shape, dtype=np.int16)
        probs = np.empty((len(values), *shape), dtype=np.float16) if probabilities else None
        for start, stop in slabs(shape, len(values)):
            mean = self.mean_logits(logits, prepared, start, stop)
            label[start:stop] = scheme.logits_to_labels(mean, dim=0).numpy()
            if probs is not None:
                probs[:, start:stop] = scheme.probabilities(mean, 0).numpy()
            del mean
        return Prediction(label, values, probs)

    def predict_logits(self, image: np.ndarray, spacing) -> torch.Tensor:
        """(c, *shape) image on its own grid -> (classes, *shape) float32 mean logits on the same grid."""
        prepared = self.prepare(image, spacing)
        logits = self.infer(prepared)
        prepared.release()
        return self.mean_logits(logits, prepared, 0, prepared.shape[0])

    def predict_file(self, paths: list[Path], output: Path, probabilities_output: Path | None = None) -> None:
        image, geometry = read_image(paths)
        result = self.predict(image, geometry.spacing, probabilities=probabilities_output is not None)
        del image
        if probabilities_output is not None:
            assert result.probabilities is not None  # asked for above
            write_probabilities(probabilities_output, result.probabilities, result.labels)
        write_label(result.label, geometry, output)

    def mean_logits(self, logits: list[torch.Tensor], prepared: Prepared, start: int, stop: int) -> torch.Tensor:
        """Mean logits of the ensemble for input-grid rows [start, stop) of array axis 0, float32."""
        total: torch.Tensor | None = None
        for group_logits, group in zip(logits, prepared.groups):
            part = _rows_on_input_grid(group_logits, group.props, group.models[0].plan, start, stop)
            total = part if total is None else total.add_(part)
        assert total is not None  # a predictor holds at least one model, so at least one group
        return total / len(self.models)


def slabs(shape, num_classes: int) -> list[tuple[int, int]]:
    rows = max(1, SLAB_BYTES // (4 * num_classes * int(np.prod(shape[1:]))))
    return [(s, min(s + rows, shape[0])) for s in range(0, shape[0], rows)]


def _rows_on_input_grid(logits: torch.Tensor, props: CaseProperties, plan: Plan, start: int,
                        stop: int) -> torch.Tensor:
    """Rows [start, stop) of array axis 0 of preprocessing's way back (medseg.preprocessing.pipeline.
    logits_to_original): resample to the cropped shape, put the crop back (outside it only background),
    undo the transpose; only the rows asked for are computed."""
    k = plan.transpose.index(0)  # the planning axis that is the input's first array axis
    shape_t = [props.original_shape[a] for a in plan.transpose]
    shape_t[k] = stop - start
    out = outside_crop_logits(logits.shape[0], shape_t, plan.label_scheme.has_regions)
    lo, hi = props.box[k]
    a, b = max(start, lo), min(stop, hi)
    if a < b:
        inside = [slice(None)] + [slice(s, e) for s, e in props.box]
        inside[k + 1] = slice(a - start, b - start)
        out[tuple(inside)] = resample_rows(logits, props.shape_after_crop, k, a - lo, b - lo)
    return out.permute(0, *[a + 1 for a in plan.transpose_backward])


def resample_rows(x: torch.Tensor, shape, axis: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along spatial ``axis`` of ``x`` (c, *spatial) resampled to ``shape``, float32.

    The same (tri)linear interpolation as F.interpolate(align_corners=False), done separably: linear along
    ``axis`` for the rows asked for only, then F.interpolate over the other axes."""
    size, out_size = x.shape[axis + 1], shape[axis]
    if size == out_size:
        rows = x.narrow(axis + 1, start, stop - start).float()
    else:
        src = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) * (size / out_size) - 0.5).clamp_(min=0)
        i0 = src.floor().long().clamp_(max=size - 1)
        i1 = (i0 + 1).clamp_(max=size - 1)
        view = [1] * x.ndim
        view[axis + 1] = -1
        w1 = (src - i0).float().view(view)
        rows = x.index_select(axis + 1, i0).float() * (1 - w1)
        rows += x.index_select(axis + 1, i1).float() * w1
    rest = [s for i, s in enumerate(shape) if i != axis]
    if list(rows.shape[1:axis + 1]) + list(rows.shape[axis + 2:]) == rest:
        return rows
    mode = {1: "linear", 2: "bilinear"}[len(rest)]
    moved = F.interpolate(rows.movedim(axis + 1, 0), size=rest, mode=mode, align_corners=False)
    return moved.movedim(0, axis + 1)


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def group_cases(files: Sequence[ImageInput], num_channels: int) -> dict[str, list[ImageInput]]:
    """Case id -> channel files. ``<case>_0000`` style names (nnU-Net) group channels; otherwise each file is
    one case (a 4D file may hold every channel); a DICOM series is one case, named by its case id
    (medseg.datasets.dicom). Case ids name the outputs, so they must be unique."""
    found: dict[str, list[tuple[int, ImageInput]]] = {}
    for f in files:
        if isinstance(f, DicomSeries):
            found.setdefault(f.case_id, []).append((-1, f))
            continue
        m = _CHANNEL.match(strip_suffix(f))
        case, channel = (m["case"], int(m["channel"])) if m else (strip_suffix(f), -1)
        found.setdefault(case, []).append((channel, f))
    cases: dict[str, list[ImageInput]] = {}
    for case, entries in found.items():
        entries.sort(key=lambda e: (e[0], str(e[1])))
        channels = [c for c, _ in entries]
        paths = [p for _, p in entries]
        if len(entries) > 1 and (-1 in channels or len(set(channels)) < len(channels)):
            raise MedsegError(f"case {case}: several inputs would write the same output "
                              f"({', '.join(map(str, paths))}); give them distinct file names")
        if len(paths) > 1 and len(paths) != num_channels:
            raise MedsegError(f"case {case}: {len(paths)} channel files, the model expects {num_channels}")
        cases[case] = paths
    return cases


def output_path(case_id: str, inputs: Sequence[ImageInput], output_dir: Path) -> Path:
    """Same format as the input (first channel's suffix); NIfTI for a DICOM series."""
    suffix = "" if isinstance(inputs[0], DicomSeries) else image_suffix(inputs[0])
    return output_dir / f"{case_id}{suffix or '.nii.gz'}"


def dicom_seg_path(case_id: str, output_dir: Path) -> Path:
    return output_dir / f"{case_id}.dcm"


def probabilities_path(case_id: str, output_dir: Path) -> Path:
    return probability_file(output_dir, case_id)


def check_output_dir(input_dir: Path, output_dir: Path) -> None:
    i, o = input_dir.resolve(), output_dir.resolve()
    if o == i or o.is_relative_to(i):
        raise MedsegError(f"output {output_dir} is inside the input folder {input_dir}; medseg never writes there")


def check_output_outside_inputs(inputs: list[Path], output_dir: Path) -> None:
    """For listed inputs: each listed file's folder counts as an input folder, and the output may not hold
    any listed file either."""
    o = output_dir.resolve()
    for p in inputs:
        p = p.resolve()
        if p.is_relative_to(o) or o.is_relative_to(p.parent):
            raise MedsegError(f"output {output_dir} contains or is inside the folder of the listed input {p}; "
                              "medseg never writes there")
