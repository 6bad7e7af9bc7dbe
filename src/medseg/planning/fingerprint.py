"""Dataset fingerprint (spacings, shapes, foreground intensities), computed in the same pass that
validates every case, so that bad data is reported before any planning or training."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medseg.atomic import file_signature, write_json
from medseg.datasets.io import nonfinite_problem, orientation, read_image, read_label
from medseg.datasets.manifest import Case, Manifest
from medseg.errors import DatasetError
from medseg.planning.crop import crop_to_nonzero

# nnU-Net draws the same number of foreground samples from every case (with replacement), so each case weighs
# the same in the intensity statistics whatever its foreground size. medseg computes the expectation of those
# statistics instead: each case's foreground voxels (at most this many, drawn without replacement) weighted
# 1/count. Same answer up to nnU-Net's sampling noise, deterministic, and a fraction of the memory.
FOREGROUND_SAMPLES_PER_CASE = 100_000
FINGERPRINT_VERSION = 1

log = logging.getLogger(__name__)
# nnU-Net's convention for PNG/BMP/TIFF datasets, which a wrong channel_names count usually misses
NATURAL_CHANNELS_HINT = (" (a greyscale image is one channel; an RGB image is three, e.g. channel_names R, G, B, "
                         "in one <case>_0000 file)")


@dataclass
class CaseFingerprint:
    case_id: str
    spacing: list[float]
    shape_before_crop: list[int]
    shape_after_crop: list[int]
    relative_size_after_crop: float
    orientation: str = ""  # axis codes of the image's voxel axes, e.g. RAS


@dataclass
class ChannelIntensity:
    mean: float
    std: float
    min: float
    max: float
    median: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass
class DatasetFingerprint:
    dataset: str
    source_key: str
    cases: list[CaseFingerprint]
    intensity: list[ChannelIntensity]
    version: int = FINGERPRINT_VERSION
    warnings: list[str] = field(default_factory=list)  # legitimate but unusual data, each naming its file

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=np.float64)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetFingerprint":
        return cls(d["dataset"], d["source_key"], [CaseFingerprint(**c) for c in d["cases"]],
                   [ChannelIntensity(**c) for c in d["intensity"]], d.get("version", FINGERPRINT_VERSION),
                   list(d.get("warnings", [])))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "DatasetFingerprint":
        return cls.from_dict(json.loads(Path(path).read_text()))


def source_key(manifest: Manifest) -> str:
    """Changes when any input file of the dataset (path, size, modification time) or the label set changes."""
    h = hashlib.sha1()
    h.update(json.dumps([manifest.channel_names, sorted(manifest.labels.items())]).encode())
    if manifest.regions:  # (only then: the keys of datasets without regions stay what they were)
        h.update(json.dumps(manifest.label_scheme.to_dict()).encode())
    for case in sorted(manifest.cases, key=lambda c: c.case_id):
        h.update(file_signature(case.images + ([case.label] if case.label else [])).encode())
    return h.hexdigest()


def _with_path(error: Exception, path: str, others: tuple[str, ...] | list[str] = ()) -> str:
    """The reader's message, prefixed with ``path`` unless it names that file or one of ``others`` already
    (a case's missing channel file names itself)."""
    msg = str(error) or type(error).__name__
    return msg if any(p in msg for p in (path, *others)) else f"{path}: {msg}"


def inspect_case(case: Case, num_channels: int, labels: list[int], samples_per_case: int = FOREGROUND_SAMPLES_PER_CASE,
                 seed: int = 1234):
    """Validate one case and fingerprint it. Returns (problems, warnings, fingerprint or None, fg samples or
    None): problems make the dataset unusable, warnings name legitimate but unusual files."""
    problems: list[str] = []
    warnings: list[str] = []
    where = case.images[0]
    try:
        image, geo = read_image(case.images)
    except Exception as e:  # noqa: BLE001 - any reader failure is a problem with that file
        return [f"case {case.case_id}: cannot read image: {_with_path(e, where, case.images)}"], [], None, None
    if len(geo.shape) != 3:
        return [f"{where}: {len(geo.shape)}D image in a 3D dataset (shape {geo.shape})"], [], None, None
    if case.label is None:
        return [f"case {case.case_id}: no label file"], [], None, None
    try:
        label, lgeo = read_label(case.label)
    except Exception as e:  # noqa: BLE001
        return [f"case {case.case_id}: cannot read label: {_with_path(e, case.label)}"], [], None, None
    if image.shape[0] != num_channels:
        hint = NATURAL_CHANNELS_HINT if geo.kind == "natural" else ""
        problems.append(f"{where}: {image.shape[0]} channel(s), the dataset declares {num_channels}{hint}")
    if label.shape != image.shape[1:]:
        problems.append(f"{case.label}: label shape {label.shape} differs from image shape {image.shape[1:]}")
    elif not np.allclose(geo.affine, lgeo.affine, atol=1e-3, rtol=1e-4):
        problems.append(f"{case.label}: label affine differs from the image's ({where})")
    nonfinite = nonfinite_problem(where, image)
    if nonfinite:
        problems.append(nonfinite)
    elif image.size and image.min() == image.max():
        problems.append(f"{where}: image is constant (all voxels {image.min():g})")
    undeclared = sorted(set(np.unique(label).tolist()) - set(labels))
    if undeclared:
        problems.append(f"{case.label}: label values {undeclared} are not declared (declared: {labels})")
    if problems:
        return problems, [], None, None
    if not (label > 0).any():
        # some datasets hold cases without the structure (healthy controls): kept, they teach background
        warnings.append(f"{case.label}: label map is empty (background only)")
    cropped, cropped_label, _, _ = crop_to_nonzero(image, label)
    fg = cropped_label > 0
    rng = np.random.default_rng(seed)
    samples = []
    keep = np.flatnonzero(fg.ravel())
    if keep.size > samples_per_case:
        keep = np.sort(rng.choice(keep, samples_per_case, replace=False))
    for c in range(cropped.shape[0]):
        samples.append(cropped[c].ravel()[keep].astype(np.float32))
    fp = CaseFingerprint(case.case_id, [float(s) for s in geo.spacing], list(image.shape[1:]),
                         list(cropped.shape[1:]), float(np.prod(cropped.shape[1:]) / np.prod(image.shape[1:])),
                         orientation(geo))
    return [], warnings, fp, samples


def _inspect(args):
    return inspect_case(*args)


def _channel_stats(per_case: list[np.ndarray]) -> ChannelIntensity:
    """Statistics over all cases' foreground values, every case weighing the same."""
    per_case = [v for v in per_case if v.size]
    if not per_case:  # no foreground anywhere: statistics are undefined, keep them neutral
        return ChannelIntensity(0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    values = np.concatenate(per_case).astype(np.float64)
    weights = np.concatenate([np.full(v.size, 1.0 / v.size) for v in per_case])
    weights /= weights.sum()
    mean = float(np.sum(weights * values))
    std = float(np.sqrt(np.sum(weights * (values - mean) ** 2)))
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order]) - weights[order] / 2
    median, p005, p995 = np.interp([0.5, 0.005, 0.995], cdf, values[order])
    return ChannelIntensity(mean, std, float(values.min()), float(values.max()), float(median), float(p005),
                            float(p995))


def compute_fingerprint(manifest: Manifest, num_processes: int = 2, progress: bool = True) -> DatasetFingerprint:
    """Read every labelled case once: validate it (all problems collected) and fingerprint it."""
    problems: list[str] = []
    duplicates = [cid for cid, n in Counter(c.case_id for c in manifest.cases).items() if n > 1]
    for d in duplicates:
        files = [c.images[0] if c.images else str(c.label) for c in manifest.cases if c.case_id == d]
        problems.append(f"case id {d!r} appears {len(files)} times ({', '.join(files)}); case ids name the "
                        "preprocessed files and outputs, so they must be unique")
    if not manifest.cases:
        problems.append("the dataset has no cases")
    if problems:
        raise DatasetError(problems, manifest.name)
    labels = sorted(manifest.labels)
    jobs = [(c, manifest.num_channels, labels) for c in manifest.cases]
    if num_processes > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            results = list(tqdm(pool.map(_inspect, jobs, chunksize=4), total=len(jobs), desc="fingerprint",
                                disable=not progress))
    else:
        results = [_inspect(j) for j in tqdm(jobs, desc="fingerprint", disable=not progress)]
    cases, samples, warnings = [], [], []
    for case_problems, case_warnings, fp, s in results:
        problems += case_problems
        warnings += case_warnings
        if fp is not None:
            cases.append(fp)
            samples.append(s)
    if problems:
        raise DatasetError(problems, manifest.name)
    warnings += orientation_warnings(manifest, cases)
    for w in warnings:
        log.warning("%s: %s", manifest.name, w)
    spatial_dims = {len(c.spacing) for c in cases}
    intensity = [_channel_stats([s[c] for s in samples]) for c in range(manifest.num_channels)]
    assert spatial_dims == {3}, spatial_dims
    return DatasetFingerprint(manifest.name, source_key(manifest), cases, intensity, warnings=warnings)


def orientation_warnings(manifest: Manifest, cases: list[CaseFingerprint], show: int = 10) -> list[str]:
    """Cases stored in another orientation than most. medseg does not reorient: each case is preprocessed in
    its own voxel order with its own spacing per axis, and predictions are written back in each input's own
    orientation, so geometry stays right; but the network sees those cases flipped (mirroring augmentation
    covers that) or, with permuted axes, transposed, which is rarely intended."""
    counts = Counter(c.orientation for c in cases if c.orientation)
    if len(counts) < 2:
        return []
    common = counts.most_common(1)[0][0]
    images = {c.case_id: c.images[0] for c in manifest.cases if c.images}
    odd = [c for c in cases if c.orientation and c.orientation != common]
    details = []
    for c in odd[:show]:
        permuted = [_axis(a) for a in c.orientation] != [_axis(a) for a in common]
        kind = "axes permuted" if permuted else "axes flipped"
        details.append(f"{images.get(c.case_id, c.case_id)}: {c.orientation} ({kind})")
    more = f"; and {len(odd) - show} more" if len(odd) > show else ""
    return [f"mixed orientations: {counts[common]} of {len(cases)} cases are {common}, these differ: "
            f"{'; '.join(details)}{more}. Geometry is kept per case (no reorientation); flipped axes are covered "
            "by mirroring augmentation, permuted ones show the network transposed anatomy: reorient the data "
            "first (e.g. nibabel's as_closest_canonical) if that is not intended"]


def _axis(code: str) -> str:
    return {"L": "x", "R": "x", "P": "y", "A": "y", "I": "z", "S": "z"}[code]
