"""Batch prediction of a folder or a list of images: skip finished cases, report per-case errors without
stopping the batch, and keep the compute device busy.

While case i is inferred, case i+1 is read and preprocessed and case i-1 is mapped back and written, each in
its own background thread (reading, resampling and writing spend their heavy parts outside the GIL). At
most one case is read ahead and one waits to be written, so memory stays bounded; results are those of
sequential prediction (the same steps in the same order per case).
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from medseg.atomic import write_json
from medseg.datasets.adapters import list_images
from medseg.datasets.dicom import CheckedSeries, DicomSeries, ImageInput, find_series, listed_inputs
from medseg.datasets.io import Geometry, nonfinite_problem, read_image, write_label
from medseg.inference.postprocessing import PostprocessingSpec, apply_postprocessing, load_postprocessing
from medseg.errors import MedsegError, VolumeError, WriteError
from medseg.locking import exclusive
from medseg.inference.dicom_seg import write_dicom_seg
from medseg.inference.ensemble import RunEnsemble
from medseg.inference.predictor import (Predictor, check_output_dir, check_output_outside_inputs,
                                        dicom_seg_path, group_cases, output_path, probabilities_path)
from medseg.inference.probability_files import write_probabilities

log = logging.getLogger(__name__)

CasePredictor = Predictor | RunEnsemble  # one run (its fold ensemble), or several runs' probabilities averaged

SUMMARY_FILE = "prediction_summary.json"
LOCK_FILE = ".medseg-predict.lock"  # held while a prediction writes into the folder, removed afterwards


@dataclass
class BatchSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # per written case: read/predict/write
    output_dir: Path | None = None  # where the label maps and prediction_summary.json went

    def report(self) -> str:
        lines = [f"predicted {len(self.written)}, skipped {len(self.skipped)} (already done), "
                 f"failed {len(self.failed)}"]
        lines += [f"  failed {case}: {err}" for case, err in self.failed.items()]
        if self.output_dir is not None:
            out = self.output_dir.absolute()
            already = f"; {len(self.skipped)} already there" if self.skipped else ""
            lines.append(f"wrote {len(self.written)} case(s) to {out}{already} (record: {out / SUMMARY_FILE})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"counts": {"written": len(self.written), "skipped": len(self.skipped), "failed": len(self.failed)},
                "written": self.written, "skipped": self.skipped, "failed": self.failed, "seconds": self.seconds}


@dataclass
class CaseJob:
    case_id: str
    inputs: list[ImageInput]
    target: Path
    probabilities: Path | None  # where the class probabilities go, None when not asked for
    dicom_seg: Path | None = None  # where the DICOM-SEG goes (a DICOM series' case, dicom_seg=true), else None

    def done(self) -> bool:
        return self.target.exists() and all(p is None or p.exists() for p in (self.probabilities, self.dicom_seg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_sw_batch_size(value: int | str, device: torch.device) -> int:
    """``auto``: 4 windows per forward pass on a GPU; 1 on the CPU, where batching gains little (4 windows of
    the default U-Net, patch 96x160x128: 106 s instead of 4 x 29 s) and every window adds its own activations
    (1.6 GB each there)."""
    if value == "auto":
        return 4 if device.type == "cuda" else 1
    if int(value) < 1:
        raise MedsegError(f"sw_batch_size={value}: expected auto or a positive number")
    return int(value)


def read_image_list(path: Path) -> list[Path]:
    """Image paths of a list file: one per line, ``#`` comments and blank lines ignored, relative paths
    against the list file's folder. Listed files need not exist: a missing one fails its own case. DICOM
    slice files may be listed one by one (medseg.inference.batch.collect_inputs makes them one series)."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise MedsegError(f"{path}: not a text file; input= takes a folder or a list of image paths") from None
    base = path.resolve().parent
    paths = []
    for line in lines:
        entry = line.split("#", 1)[0].strip()
        if entry:
            p = Path(entry).expanduser()
            paths.append(p if p.is_absolute() else base / p)
    if not paths:
        raise MedsegError(f"{path}: the list names no images")
    return list(dict.fromkeys(paths))


def collect_inputs(source: Path, output_dir: Path) -> list[ImageInput]:
    """Image files and DICOM series of a folder (series also in nested folders) or a list file (a listed folder
    gives its series, the listed DICOM slice files together one series), once the output location is known to
    be outside them."""
    if source.is_dir():
        check_output_dir(source, output_dir)
        files: list[ImageInput] = [*list_images(source), *find_series(source)]
        if not files:
            raise MedsegError(f"{source}: no NIfTI/NRRD/MHA/PNG/BMP/TIFF images or DICOM series found")
        return files
    if source.is_file():
        listed = read_image_list(source)
        check_output_outside_inputs(listed, output_dir)
        return listed_inputs(listed, source)
    raise MedsegError(f"{source}: input folder or list file not found")


def predict_folder(ckpt_dir: Path | Sequence[Path], input_dir: Path, output_dir: Path, checkpoint: str = "last",
                   overlap: float = 0.5, mirror_axes: str | Sequence[int] | None = "all", overwrite: bool = False,
                   device: str = "auto", sw_batch_size: int | str = "auto", progress: bool | None = None,
                   save_probabilities: bool = False, background_io: bool = True,
                   postprocessing: bool | str | Path = True, precision: str = "auto", backend: str = "torch",
                   folds: Sequence[int | str] | None = None, dicom_seg: bool = False) -> BatchSummary:
    """Predict every case of ``input_dir`` (a folder, or a text file listing image paths) into ``output_dir``
    and write ``prediction_summary.json`` there. ``ckpt_dir``: a run or fold folder, a model archive (.zip) or an
    ONNX export's description (.json), or several (an ensemble of runs); prediction goes through
    medseg.inference.api.Segmenter, as the Python API's does. ``progress``: a bar (True), log lines (False), or a
    bar on a terminal only (None)."""
    from medseg.inference.api import Segmenter

    collect_inputs(input_dir, output_dir)  # bad inputs or output location: refused before any model is loaded
    segmenter = Segmenter.from_run(ckpt_dir, device=device, folds=folds, mirror_axes=mirror_axes,
                                   checkpoint=checkpoint, overlap=overlap, precision=precision,
                                   sw_batch_size=sw_batch_size, backend=backend, postprocessing=postprocessing)
    return segmenter.predict_folder(input_dir, output_dir, overwrite=overwrite, save_probabilities=save_probabilities,
                                    background_io=background_io, progress=progress, dicom_seg=dicom_seg)


def predict_files(predictor: CasePredictor, files: list[ImageInput], input_dir: Path, output_dir: Path,
                  postprocessing: PostprocessingSpec | None = None, overwrite: bool = False,
                  save_probabilities: bool = False, background_io: bool = True, progress: bool | None = None,
                  record: dict | None = None, dicom_seg: bool = False) -> BatchSummary:
    """Predict the cases of ``files`` (collect_inputs' list) into ``output_dir``, skipping finished ones, under the
    folder's lock; ``prediction_summary.json`` gets ``record`` (what predicted) with the counts and times."""
    cases = group_cases(files, len(predictor.plan.channel_names))
    output_dir.mkdir(parents=True, exist_ok=True)
    # two predictions into one folder would race on the skip-existing check and the summary
    with exclusive(output_dir / LOCK_FILE, output_dir, "prediction"):
        summary = BatchSummary(output_dir=output_dir)
        jobs = pending_jobs(cases, output_dir, save_probabilities, overwrite, summary, dicom_seg)
        log.info("predicting %d case(s) with %d model(s) on %s (%s)", len(jobs), len(predictor.models),
                 predictor.device, predictor.precision)
        started = time.perf_counter()
        predict_cases(predictor, jobs, summary, progress=progress, background=background_io,
                      postprocessing=postprocessing)
        if jobs or not (output_dir / SUMMARY_FILE).exists():  # a run with nothing to do leaves the folder as it was
            previous = predictor.previous_stage
            written = {"input": str(input_dir), "output": str(output_dir),
                       "checkpoints": [m.source for m in predictor.models], "device": str(predictor.device),
                       "precision": predictor.precision, "overlap": predictor.overlap,
                       "mirror_axes": _jsonable(predictor.mirror_axes), "save_probabilities": save_probabilities,
                       "previous_stage": [m.source for m in previous.models] if previous is not None else None,
                       "postprocessing": postprocessing.to_dict() if postprocessing is not None else None,
                       **(record or {}), "total_seconds": round(time.perf_counter() - started, 3),
                       **summary.to_dict()}
            write_json(output_dir / SUMMARY_FILE, written)
    return summary


def pending_jobs(cases: dict[str, list[ImageInput]], output_dir: Path, save_probabilities: bool, overwrite: bool,
                 summary: BatchSummary, dicom_seg: bool = False) -> list[CaseJob]:
    """The cases to predict, in case-id order; finished ones (every asked-for output there) go to ``skipped``."""
    jobs = []
    for case_id, paths in sorted(cases.items()):
        seg = dicom_seg and isinstance(paths[0], DicomSeries)
        job = CaseJob(case_id, paths, output_path(case_id, paths, output_dir),
                      probabilities_path(case_id, output_dir) if save_probabilities else None,
                      dicom_seg_path(case_id, output_dir) if seg else None)
        if job.done() and not overwrite:
            summary.skipped.append(case_id)
        else:
            jobs.append(job)
    if summary.skipped:
        log.info("skipping %d case(s) whose outputs exist (overwrite=true redoes them)", len(summary.skipped))
    others = [c for c, paths in cases.items() if not isinstance(paths[0], DicomSeries)]
    if dicom_seg and others:
        log.info("dicom_seg=true: %d case(s) are not DICOM series (%s ...); they get their label map only",
                 len(others), others[0])
    return jobs


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _reason(error: Exception) -> str:
    text = str(error)
    return text if isinstance(error, (MedsegError, FileNotFoundError)) and text else f"{type(error).__name__}: {text}"


class _Inline:
    """An executor that runs each task when it is submitted: the pipeline without background threads."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - delivered through the future, as a thread pool would
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class _Progress:
    """A tqdm bar on a terminal; elsewhere (log files, batch jobs) one plain line per finished case."""

    def __init__(self, total: int, bar: bool | None):
        self.bar = sys.stderr.isatty() if bar is None else bar
        self.total, self.count = total, 0
        self.tqdm = tqdm(total=total, desc="predict", unit="case", disable=not self.bar)

    def done(self, case_id: str, outcome: str, failed: bool = False) -> None:
        self.count += 1
        if self.bar:
            self.tqdm.set_postfix_str(case_id, refresh=False)
            self.tqdm.update()
        else:
            log.log(logging.ERROR if failed else logging.INFO, "[%d/%d] %s: %s", self.count, self.total, case_id,
                    outcome)

    def close(self) -> None:
        self.tqdm.close()


@dataclass
class _Loaded:
    prepared: Any  # Prepared, or EnsemblePrepared for an ensemble of runs
    geometry: Geometry
    seconds: float


def find_postprocessing(ckpt_dir: Path) -> PostprocessingSpec | None:
    """The run's ``postprocessing.json`` (decided by ``medseg-postprocess`` from its folds), also when a single
    fold dir is given; None where there is none or it enables nothing."""
    for folder in (ckpt_dir, ckpt_dir.parent):
        spec = load_postprocessing(folder)
        if spec is not None:
            return spec if spec.enabled else None
    return None


def predict_cases(predictor: CasePredictor, jobs: list[CaseJob], summary: BatchSummary, progress: bool | None = None,
                  background: bool = True, postprocessing: PostprocessingSpec | None = None) -> BatchSummary:
    """Predict ``jobs`` in order, reading one case ahead and writing one case behind in background threads
    (``background=False``: the same steps, one after the other). Per-case errors go into ``summary``."""
    if jobs:
        _Pipeline(predictor, summary, _Progress(len(jobs), progress), background, postprocessing).run(jobs)
    return summary


class _Pipeline:
    def __init__(self, predictor: CasePredictor, summary: BatchSummary, bar: _Progress, background: bool,
                 postprocessing: PostprocessingSpec | None = None):
        self.predictor, self.summary, self.bar = predictor, summary, bar
        self.postprocessing = postprocessing
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="medseg-read") if background else _Inline()
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="medseg-write") if background else _Inline()

    def run(self, jobs: list[CaseJob]) -> None:
        try:
            pending_read: Future | None = self.reader.submit(self.load, jobs[0])
            behind = None  # (job, write future, step times) of the case being written
            for i, job in enumerate(jobs):
                assert pending_read is not None  # submitted for every job
                loaded = self.result(job, pending_read)
                pending_read = self.reader.submit(self.load, jobs[i + 1]) if i + 1 < len(jobs) else None
                inferred = self.infer(job, loaded) if loaded is not None else None
                if behind is not None:  # case i-1 is written before case i queues: one case behind at most
                    self.collect(*behind)
                    behind = None
                if inferred is not None:
                    logits, times = inferred
                    behind = (job, self.writer.submit(self.save, job, logits, loaded), times)
                del loaded, inferred
            if behind is not None:
                self.collect(*behind)
        finally:
            self.reader.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True, cancel_futures=True)
            self.bar.close()

    def load(self, job: CaseJob) -> _Loaded:
        """Background: read and preprocess (the raw image is dropped once preprocessed)."""
        t0 = time.perf_counter()
        image, geometry = read_image(job.inputs)  # a DICOM series: every header checked before its pixels
        problem = nonfinite_problem(job.inputs[0], image)
        if problem:  # z-scoring would spread them over the whole volume: refused rather than predicted
            raise VolumeError(problem)
        prepared = self.predictor.prepare(image, geometry.spacing)
        return _Loaded(prepared, geometry, time.perf_counter() - t0)

    def infer(self, job: CaseJob, loaded: _Loaded) -> tuple[list, dict[str, float]] | None:
        """Foreground: the model on the compute device."""
        t0 = time.perf_counter()
        try:
            logits = self.predictor.infer(loaded.prepared)
        except Exception as e:  # noqa: BLE001 - one bad case never stops the batch
            self.fail(job, e)
            return None
        finally:
            loaded.prepared.release()
        return logits, {"read": loaded.seconds, "predict": time.perf_counter() - t0}

    def save(self, job: CaseJob, logits: list, loaded: _Loaded) -> float:
        """Background: back onto the input grid, argmax, write (probabilities and DICOM-SEG first: the label map
        is what marks a case done)."""
        t0 = time.perf_counter()
        result = self.predictor.finish(logits, loaded.prepared, probabilities=job.probabilities is not None)
        del logits
        if job.probabilities is not None:
            assert result.probabilities is not None  # asked for above
            try:
                write_probabilities(job.probabilities, result.probabilities, result.labels)
            except OSError as e:
                raise WriteError(f"{job.probabilities}: cannot write ({e.strerror or e}); nothing was replaced") from e
        label = result.label
        if self.postprocessing is not None:  # the label map only; probabilities stay as predicted (nnU-Net)
            label = apply_postprocessing(label, self.postprocessing)
        if job.dicom_seg is not None:
            assert isinstance(loaded.geometry.source, CheckedSeries)  # a DICOM series' case (pending_jobs)
            write_dicom_seg(label, loaded.geometry.source, self.predictor.plan.label_scheme, job.dicom_seg)
        write_label(label, loaded.geometry, job.target)
        return time.perf_counter() - t0

    def result(self, job: CaseJob, future: Future):
        try:
            return future.result()
        except Exception as e:  # noqa: BLE001 - one bad case never stops the batch
            self.fail(job, e)
            return None

    def collect(self, job: CaseJob, future: Future, times: dict[str, float]) -> None:
        seconds = self.result(job, future)
        if seconds is None:
            return
        times["write"] = seconds
        self.summary.written.append(job.case_id)
        self.summary.seconds[job.case_id] = {k: round(v, 3) for k, v in times.items()}
        self.bar.done(job.case_id, "written in {:.1f}s (read {read:.1f}s, predict {predict:.1f}s, write {write:.1f}s)"
                      .format(sum(times.values()), **times))

    def fail(self, job: CaseJob, error: Exception) -> None:
        if self.bar.bar:  # the bar names no reasons; plain progress lines do, so the failure is logged once
            log.error("case %s failed: %s", job.case_id, _reason(error))
        self.summary.failed[job.case_id] = _reason(error)
        self.bar.done(job.case_id, f"failed ({_reason(error)})", failed=True)
