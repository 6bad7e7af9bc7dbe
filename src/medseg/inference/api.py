"""The Python API: ``medseg.Segmenter``, a trained model ready to segment files, arrays and folders.

    from medseg import Segmenter
    seg = Segmenter.from_run("outputs/Task04_Hippocampus/unet__dice_ce")        # or "model.zip"
    result = seg.predict("scan.nii.gz")              # result.label (z, y, x), result.geometry
    result = seg.predict_array(volume, spacing=(1.0, 1.0, 1.0), probabilities=True)
    seg.predict_folder("scans/", "predictions/")     # what medseg-predict does

``medseg-predict`` goes through this same object (medseg.inference.batch.predict_folder), so the command line and
the API give identical label maps. The low-level pieces it holds (fold ensemble, mirroring, sliding window) are
medseg.inference.predictor.Predictor's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medseg import layout
from medseg.datasets.io import Geometry, nonfinite_problem, read_image
from medseg.errors import MedsegError, VolumeError
from medseg.inference.batch import (BatchSummary, collect_inputs, find_postprocessing, predict_files, resolve_device,
                                    resolve_sw_batch_size)
from medseg.inference.cascade import previous_stage_predictor
from medseg.inference.ensemble import RunEnsemble
from medseg.inference.export import ModelArchive, is_archive
from medseg.inference.postprocessing import PostprocessingSpec, apply_postprocessing, load_postprocessing
from medseg.inference.predictor import Predictor, TrainedModel, find_checkpoints, load_checkpoint
from medseg.planning.plan import Plan

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")


@dataclass
class Segmentation:
    """One predicted case: the label map on the input's grid (array (z, y, x) order, int16), the input's geometry
    (None for arrays), and, when asked for, the class probabilities (float16 (channels, z, y, x))."""

    label: np.ndarray
    geometry: Geometry | None
    label_values: np.ndarray  # the label value of each probability channel
    label_names: dict[int, str] = field(default_factory=dict)
    probabilities: np.ndarray | None = None


@dataclass
class LoadedModels:
    """Fold name -> model, with what the source says about post-processing."""

    models: dict[str, TrainedModel]
    postprocessing: PostprocessingSpec | None
    source: Path
    kind: str  # "run", "archive" or "onnx"


def _fold_of_checkpoint(path: Path) -> str:
    return path.parents[1].name  # <fold>/checkpoints/<which>.ckpt


def load_models(source: str | Path, device: torch.device, checkpoint: str = "last",
                folds: Sequence[int | str] | None = None) -> LoadedModels:
    """The models of a run or fold folder, a model archive (.zip, from medseg-export) or an ONNX export's
    description (.json, from medseg-export format=onnx; onnxruntime networks)."""
    source = Path(source)
    wanted: list[int | str] | None = None if folds is None else [str(f) for f in folds]
    if is_archive(source):
        archive = ModelArchive.open(source)
        models = archive.load_models(device, wanted)
        return LoadedModels({layout.fold_name(f): m for f, m in zip(archive.select(wanted), models)},
                            archive.postprocessing, source, "archive")
    if source.suffix.lower() == ".json":
        from medseg.inference.onnx_backend import OnnxExport

        export = OnnxExport.open(source)
        names = export.folds if wanted is None else [layout.fold_name(f) for f in wanted]
        return LoadedModels(dict(zip(names, export.load_models(device, wanted))), export.postprocessing, source,
                            "onnx")
    checkpoints = find_checkpoints(source, checkpoint)
    if wanted is not None:
        chosen = [c for c in checkpoints if _fold_of_checkpoint(c).removeprefix("fold_") in set(map(str, wanted))]
        missing = sorted(set(map(str, wanted)) - {_fold_of_checkpoint(c).removeprefix("fold_") for c in chosen})
        if missing:
            raise MedsegError(f"{source}: fold(s) {missing} have no checkpoint")
        checkpoints = chosen
    return LoadedModels({_fold_of_checkpoint(c): load_checkpoint(c, device) for c in checkpoints},
                        find_postprocessing(source), source, "run")


def _postprocessing_file(path: Path) -> PostprocessingSpec | None:
    """A decision file given by name: it must exist (a wrong path is an error, not silently no post-processing)."""
    if not path.is_file():
        raise MedsegError(f"postprocessing={path}: no such file (a postprocessing.json from medseg-postprocess or "
                          "medseg-select, or true/false)")
    spec = load_postprocessing(path)
    return spec if spec is not None and spec.enabled else None


class Segmenter:
    """A trained model (fold ensemble) that segments image files, arrays and folders. Build it with
    :meth:`from_run`."""

    def __init__(self, predictor: Predictor | RunEnsemble, postprocessing: PostprocessingSpec | None = None,
                 source: Path | None = None, backend: str = "torch", sources: list[Path] | None = None):
        self.predictor = predictor
        self.postprocessing = postprocessing
        self.sources = sources if sources is not None else [source] if source is not None else []
        self.source = source
        self.backend = backend

    @classmethod
    def from_run(cls, path: str | Path | Sequence[str | Path], device: str = "auto",
                 folds: Sequence[int | str] | None = None, mirror_axes: str | Sequence[int] | None = "all",
                 checkpoint: str = "last", overlap: float = 0.5, precision: str = "auto",
                 sw_batch_size: int | str = "auto", backend: str = "torch",
                 postprocessing: bool | str | Path = True) -> "Segmenter":
        """Load a model.

        path: a run folder (its folds are ensembled), one fold folder, a model archive (``.zip`` from
            ``medseg-export``) or an ONNX export's description (``.json``; backend onnxruntime); or a list of
            them: an ensemble of runs (other configurations or models), whose probabilities are averaged
            (medseg.inference.ensemble), as ``medseg-select`` recommends.
        device: ``auto`` (CUDA where available), ``cpu``, ``cuda``.
        folds: fold numbers to ensemble (None: all the source has).
        mirror_axes: test-time mirroring: ``all`` (every spatial axis), None/[] (none) or axes in planning order.
        checkpoint: ``last`` (final weights) or ``best``, for run folders.
        backend: ``torch``, or ``onnxruntime`` (each network exported to ONNX and run by onnxruntime in float32).
        postprocessing: apply the run's cross-validated post-processing to label maps (an ensemble of runs has
            none of its own), or a decision file to apply (``postprocessing.json`` of a run, or the one
            ``medseg-select`` writes for its choice); False: none.
        """
        if isinstance(path, (str, Path)) or len(path) == 1:
            single = Path(path if isinstance(path, (str, Path)) else path[0])
            segmenter = cls._load_one(single, device, folds, mirror_axes, checkpoint, overlap, precision,
                                      sw_batch_size, backend, postprocessing is True)
            if not isinstance(postprocessing, bool):
                segmenter.postprocessing = _postprocessing_file(Path(postprocessing))
            return segmenter
        if not path:
            raise MedsegError("no model given: a run folder, fold folder, archive or a list of them")
        members = [cls._load_one(Path(p), device, folds, mirror_axes, checkpoint, overlap, precision, sw_batch_size,
                                 backend, False) for p in path]
        spec = None if isinstance(postprocessing, bool) else _postprocessing_file(Path(postprocessing))
        if postprocessing is True:
            log.info("an ensemble of %d runs: no run's own post-processing applies (give postprocessing=<file> "
                     "from medseg-select to apply its decision)", len(members))
        predictors = [m.predictor for m in members]
        assert all(isinstance(p, Predictor) for p in predictors)  # one run each
        ensemble = RunEnsemble(predictors)  # type: ignore[arg-type]
        log.info("ensemble of %d runs, their probabilities averaged: %s", len(members), ", ".join(map(str, path)))
        return cls(ensemble, spec, None, backend, sources=[Path(p) for p in path])

    @classmethod
    def _load_one(cls, path: Path, device: str, folds: Sequence[int | str] | None,
                  mirror_axes: str | Sequence[int] | None, checkpoint: str, overlap: float, precision: str,
                  sw_batch_size: int | str, backend: str, postprocessing: bool) -> "Segmenter":
        if backend not in BACKENDS:
            raise MedsegError(f"backend={backend!r}: expected one of {list(BACKENDS)}")
        if overlap < 0 or overlap >= 1:
            raise MedsegError(f"overlap={overlap}: expected 0 <= overlap < 1")
        path = Path(path)
        if path.suffix.lower() == ".json" and backend != "onnxruntime":
            raise MedsegError(f"{path}: an ONNX export runs with backend=onnxruntime")
        dev = resolve_device(device)
        # onnxruntime: the sliding window's tensors stay on the CPU; onnxruntime picks its own execution provider
        host = torch.device("cpu") if backend == "onnxruntime" else dev
        loaded = load_models(path, host, checkpoint, folds)
        models = list(loaded.models.values())
        if isinstance(mirror_axes, Sequence) and not isinstance(mirror_axes, str):
            mirror_axes = tuple(mirror_axes)
        sw = resolve_sw_batch_size(sw_batch_size, dev)
        # a cascade run predicts its low-resolution stage first (that run's folds, as recorded in the checkpoints)
        previous = previous_stage_predictor(models, checkpoint, overlap, mirror_axes, sw, host, precision) \
            if loaded.kind == "run" else None
        if backend == "onnxruntime" and loaded.kind != "onnx":
            from medseg.inference.onnx_backend import to_onnxruntime

            models = to_onnxruntime(models, dev)
        if backend == "onnxruntime":
            precision = "32-true"  # the exported graphs are float32
        predictor = Predictor(models, overlap, mirror_axes, sw, host, precision, previous_stage=previous)
        if previous is not None:
            log.info("cascade: each case is first predicted by the %s stage (%d model(s) from %s)",
                     previous.models[0].config.name, len(previous.models), Path(previous.models[0].source).parents[2])
        spec = loaded.postprocessing if postprocessing else None
        if spec is not None:
            log.info("post-processing from cross-validation: %s", spec.to_dict())
        return cls(predictor, spec, path, backend)

    @property
    def plan(self) -> Plan:
        return self.predictor.plan

    @property
    def label_names(self) -> dict[int, str]:
        return dict(self.plan.labels)

    def _result(self, label: np.ndarray, geometry: Geometry | None, probabilities: np.ndarray | None,
                values: np.ndarray) -> Segmentation:
        if self.postprocessing is not None:  # the label map only; probabilities stay as predicted (nnU-Net)
            label = apply_postprocessing(label, self.postprocessing)
        return Segmentation(label, geometry, values, self.label_names, probabilities)

    def predict_array(self, array: np.ndarray, spacing: Sequence[float], probabilities: bool = False,
                      name: str = "array") -> Segmentation:
        """Segment an image array: (channels, z, y, x), or (z, y, x) for a one-channel model (2D pictures:
        (channels, 1, y, x)); ``spacing`` in the same (z, y, x) order. Returns the label map on the array's grid."""
        image = np.asarray(array, dtype=np.float32)
        spatial = len(spacing)
        if image.ndim == spatial:
            image = image[None]
        if image.ndim != spatial + 1:
            raise VolumeError(f"{name}: array of shape {array.shape} with {spatial} spacing values; expected "
                              f"(channels, {', '.join('zyx'[-spatial:])}) or ({', '.join('zyx'[-spatial:])})")
        problem = nonfinite_problem(name, image)
        if problem:
            raise VolumeError(problem)
        result = self.predictor.predict(image, tuple(float(s) for s in spacing), probabilities=probabilities)
        return self._result(result.label, None, result.probabilities, result.labels)

    def predict(self, image: str | Path | Sequence[str | Path], probabilities: bool = False) -> Segmentation:
        """Segment one case from its file (or one file per channel, in channel order); the result carries the
        input's geometry (``result.geometry``) for writing it back (medseg.datasets.io.write_label)."""
        paths = [Path(image)] if isinstance(image, (str, Path)) else [Path(p) for p in image]
        array, geometry = read_image(paths)
        problem = nonfinite_problem(paths[0], array)
        if problem:
            raise VolumeError(problem)
        result = self.predictor.predict(array, geometry.spacing, probabilities=probabilities)
        return self._result(result.label, geometry, result.probabilities, result.labels)

    def predict_folder(self, input: str | Path, output: str | Path, overwrite: bool = False,
                       save_probabilities: bool = False, background_io: bool = True,
                       progress: bool | None = None, dicom_seg: bool = False) -> BatchSummary:
        """Every case of a folder (or of a text file listing images) into ``output``, as ``medseg-predict``:
        one label map per case in its input's geometry and format, ``prediction_summary.json``, finished cases
        skipped unless ``overwrite``."""
        input_dir, output_dir = Path(input), Path(output)
        files = collect_inputs(input_dir, output_dir)
        record = {"model": str(self.source) if self.source is not None else None, "backend": self.backend,
                  **({"ensemble_of_runs": [str(p) for p in self.sources]} if len(self.sources) > 1 else {})}
        return predict_files(self.predictor, files, input_dir, output_dir, self.postprocessing, overwrite,
                             save_probabilities, background_io, progress, record, dicom_seg)
