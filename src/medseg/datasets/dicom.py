"""DICOM image series as cases: found in folders or named slice by slice in a list file, checked on their headers
(pydicom, no pixel data) before any voxel is read, then read with SimpleITK's ImageSeriesReader.

One series (SeriesInstanceUID) is one case. Its case id, which names the outputs, is built from the headers:
``<PatientID>_<SeriesDescription>``, with ``series<SeriesNumber>`` where there is no description and the
SeriesInstanceUID where there is neither; the PatientID part is left out where there is none. Characters other
than letters, digits, ``.`` and ``-`` become ``_``. Where two series of one input would get the same id, each of
them gets ``_<first 8 hex digits of the SHA-1 of its SeriesInstanceUID>`` appended: ids are unique within an
input and the same on every run over it.

Arrays are (z, y, x) like every other reader's (medseg.datasets.io): z runs along the slice normal
(row cosines x column cosines, the direction GDCM and ITK stack in), y down the rows, x along a row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError, VolumeError

if TYPE_CHECKING:
    from medseg.datasets.io import Geometry

DICOM_SUFFIX = ".dcm"
# Series that hold no image to segment: results and documents (a DICOM-SEG written next to its source, reports)
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "PLAN"})
# Slice steps along the normal may differ from their median by this fraction of it (DS values are decimal
# strings, rounded by the writer); beyond it a step that is a multiple of the median is missing slices, any
# other is non-uniform spacing.
SPACING_TOLERANCE = 0.01
# The step between slice positions may leave the slice normal by this angle (radians, ~0.06 degrees); beyond
# it the slices are sheared (gantry tilt) and the volume is not a grid ITK or NIfTI can describe.
TILT_TOLERANCE = 1e-3
# Direction cosines and pixel spacings of the slices of one series must agree to this (absolute).
ORIENTATION_TOLERANCE = 1e-4


def _pydicom():
    try:
        import pydicom
    except ImportError:  # the optional extra
        raise MedsegError("reading DICOM needs pydicom: pip install 'medseg[dicom]'") from None
    return pydicom


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM image series: its slice files (any order) and where they came from."""

    uid: str  # SeriesInstanceUID of the first file (a listed series is checked to hold no other when read)
    files: tuple[Path, ...]
    folder: Path  # the folder holding its files (the deepest one common to all)
    case_id: str = ""
    list_file: Path | None = None  # the list file that named the slices, where one did

    def __str__(self) -> str:  # how error messages name it
        where = f"{self.folder}" + (f", listed in {self.list_file}" if self.list_file else "")
        return f"DICOM series {self.uid} ({where})"


# an input of a case: an image file, or a DICOM series
ImageInput = Union[Path, DicomSeries]


@dataclass
class CheckedSeries:
    """A series whose headers passed every check, slices sorted along the normal (the array's z order)."""

    series: DicomSeries
    files: list[Path]
    headers: list[Any] = field(repr=False)  # pydicom Datasets without pixel data, in slice order
    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # LPS position of the first voxel (first slice's ImagePositionPatient)
    direction: tuple[float, ...]  # ITK direction cosines, row-major 3x3: columns are x (row), y (column), normal

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(h.SOPInstanceUID) for h in self.headers]

    def geometry(self) -> "Geometry":
        """The grid as medseg's Geometry: kind ``dicom``, affine in RAS (as NIfTI's), ITK direction and origin
        in LPS (as DICOM's)."""
        from medseg.datasets.io import Geometry

        d = np.asarray(self.direction).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = d * np.asarray(self.spacing[::-1])[None, :]
        lps[:3, 3] = self.origin
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        return Geometry(self.shape, self.spacing, affine, "dicom", direction=self.direction, origin=self.origin,
                        source=self)


# ---- finding series ------------------------------------------------------------------------------------------

def sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("._-")[:80]


def _case_base(header: Any, uid: str) -> str:
    description = sanitise(str(header.get("SeriesDescription", "") or ""))
    number = str(header.get("SeriesNumber", "") or "").strip()
    what = description or (f"series{sanitise(number)}" if sanitise(number) else sanitise(uid))
    patient = sanitise(str(header.get("PatientID", "") or ""))
    return f"{patient}_{what}" if patient else what


def assign_case_ids(series: Sequence[DicomSeries]) -> list[DicomSeries]:
    """Give each series its case id (see the module doc); ids shared by several series get a UID hash."""
    pydicom = _pydicom()
    bases = []
    for s in series:
        try:
            header = pydicom.dcmread(s.files[0], stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - an unreadable first file is reported when the case is read
            header = {}
        bases.append(_case_base(header, s.uid) or "series")
    counts = Counter(bases)
    return [dataclasses.replace(s, case_id=b if counts[b] == 1 else f"{b}_{_uid_hash(s.uid)}")
            for s, b in zip(series, bases)]


def _uid_hash(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:8]


def _common_folder(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def _modality(path: Path) -> str:
    try:
        return str(_pydicom().dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality", ""))
    except Exception:  # noqa: BLE001 - unreadable: kept, and reported when the case is read
        return ""


def find_series(folder: str | Path) -> list[DicomSeries]:
    """Every DICOM image series under ``folder`` (nested folders included, hidden ones not), found by GDCM
    (SimpleITK's ImageSeriesReader.GetGDCMSeriesIDs); slices of one series in several folders are one series.
    Non-image series (DICOM-SEG, structured reports, ...) are left out. Case ids assigned, sorted by them."""
    found: dict[str, list[Path]] = {}
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns about every folder without DICOM files
    try:
        for dirpath, dirnames, _ in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath):
                names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, uid)
                found.setdefault(uid, []).extend(Path(n) for n in names if not Path(n).name.startswith("."))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    series = [DicomSeries(uid, tuple(files), _common_folder(files)) for uid, files in sorted(found.items())
              if files and _modality(files[0]).upper() not in NON_IMAGE_MODALITIES]
    return sorted(assign_case_ids(series), key=lambda s: s.case_id)


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or an existing file with DICOM's preamble (DICOM files often have no suffix)."""
    if path.name.lower().endswith(DICOM_SUFFIX):
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def listed_inputs(paths: Sequence[Path], list_file: Path) -> list[ImageInput]:
    """The inputs of a list file: a listed folder gives each DICOM series in it; the listed DICOM files together
    are ONE series (checked to be one when read); other files stay as they are. An image suffix
    (medseg.datasets.io.IMAGE_SUFFIXES) marks a file as not DICOM without opening it."""
    from medseg.datasets.io import image_suffix

    out: list[ImageInput] = []
    series: list[DicomSeries] = []
    slices: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = find_series(p)
            series.extend(found)
            if not found:
                out.append(p)  # fails its own case: "no DICOM image series"
        elif not image_suffix(p) and is_dicom_file(p):
            slices.append(p)
        else:
            out.append(p)
    if slices:
        uid = _series_uid(slices[0])
        series.append(DicomSeries(uid, tuple(slices), _common_folder(slices), list_file=list_file))
    return out + sorted(assign_case_ids(series), key=lambda s: s.case_id)


def _series_uid(path: Path) -> str:
    try:
        header = _pydicom().dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        return str(header.SeriesInstanceUID)
    except Exception:  # noqa: BLE001 - reported when the case is read
        return "unknown"


def series_of_folder(folder: Path) -> DicomSeries:
    """The one image series of a folder (a training case's image); several or none is an error."""
    found = find_series(folder)
    if len(found) != 1:
        what = ", ".join(s.uid for s in found) or "none"
        raise VolumeError(f"{folder}: expected one DICOM image series in the folder, found {len(found)} ({what})")
    return found[0]


# ---- checking headers ----------------------------------------------------------------------------------------

def _floats(header: Any, keyword: str, count: int, path: Path, problem) -> np.ndarray:
    value = header.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise problem(f"{path.name}: {keyword} is missing or malformed ({value!r})")
    return arr


def check_series(series: DicomSeries) -> CheckedSeries:
    """Read every slice's header (no pixel data) and refuse, with one VolumeError naming the series, a series
    that is not one regular grid: mixed series, enhanced multi-frame or colour files, inconsistent rows/columns,
    orientation or pixel spacing, repeated positions, gantry tilt (positions stepping off the slice normal),
    missing slices (a step a multiple of the others) and non-uniform slice spacing."""
    pydicom = _pydicom()

    def problem(text: str) -> VolumeError:
        return VolumeError(f"{series}: {text}")

    headers = []
    for f in series.files:
        if not f.is_file():
            raise problem(f"{f}: file not found")
        try:
            headers.append(pydicom.dcmread(f, stop_before_pixels=True))
        except Exception as e:  # noqa: BLE001 - whatever pydicom says, not a DICOM file
            raise problem(f"{f}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    uids = Counter(str(h.get("SeriesInstanceUID", "")) for h in headers)
    if len(uids) > 1:
        parts = ", ".join(f"{uid or '(none)'} ({n} file(s))" for uid, n in uids.most_common())
        raise problem(f"the files belong to {len(uids)} series: {parts}; a case is one series")
    for f, h in zip(series.files, headers):
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            raise problem(f"{f.name}: a multi-frame file ({h.NumberOfFrames} frames); enhanced multi-frame DICOM "
                          "is not supported, only one slice per file")
        if int(h.get("SamplesPerPixel", 1) or 1) != 1:
            raise problem(f"{f.name}: {h.SamplesPerPixel} samples per pixel (colour); only greyscale slices are read")
    sizes = Counter((int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for h in headers)
    if len(sizes) > 1:
        parts = ", ".join(f"{r}x{c} in {n} file(s)" for (r, c), n in sizes.most_common())
        raise problem(f"inconsistent rows x columns between slices: {parts}")
    rows, cols = next(iter(sizes))
    if rows < 1 or cols < 1:
        raise problem(f"{series.files[0].name}: no Rows/Columns")
    iops = [_floats(h, "ImageOrientationPatient", 6, f, problem) for f, h in zip(series.files, headers)]
    ipps = np.stack([_floats(h, "ImagePositionPatient", 3, f, problem) for f, h in zip(series.files, headers)])
    pixel = [_floats(h, "PixelSpacing", 2, f, problem) for f, h in zip(series.files, headers)]
    for f, iop, ps in zip(series.files, iops, pixel):
        if not np.allclose(iop, iops[0], atol=ORIENTATION_TOLERANCE):
            raise problem(f"{f.name}: ImageOrientationPatient {iop.tolist()} differs from {iops[0].tolist()} "
                          f"of {series.files[0].name}; the slices are not parallel")
        if not np.allclose(ps, pixel[0], atol=ORIENTATION_TOLERANCE):
            raise problem(f"{f.name}: PixelSpacing {ps.tolist()} differs from {pixel[0].tolist()} of "
                          f"{series.files[0].name}")
    row, col = iops[0][:3], iops[0][3:]
    if not (np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(col), 1, atol=1e-3)
            and abs(row @ col) < 1e-3):
        raise problem(f"ImageOrientationPatient {iops[0].tolist()} is not two orthogonal unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    order = np.argsort(ipps @ normal, kind="stable")
    files = [series.files[i] for i in order]
    headers = [headers[i] for i in order]
    ipps = ipps[order]
    positions = ipps @ normal
    z_spacing = _check_steps(files, ipps, positions, normal, headers[0], problem)
    x, y, z = (float(v) for v in ipps[0])
    return CheckedSeries(series, files, headers, (len(files), rows, cols),
                         (z_spacing, float(pixel[0][0]), float(pixel[0][1])), (x, y, z),
                         tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))


def _check_steps(files: list[Path], ipps: np.ndarray, positions: np.ndarray, normal: np.ndarray, first: Any,
                 problem) -> float:
    """The slice spacing of slices sorted along the normal, after the checks on their steps."""
    if len(files) == 1:  # one slice: its thickness is the only extent along the normal there is
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(keyword)
            if value not in (None, "") and float(value) > 0:
                return float(value)
        return 1.0
    steps = np.diff(positions)
    for i in np.flatnonzero(steps <= ORIENTATION_TOLERANCE).tolist():
        raise problem(f"{files[i].name} and {files[i + 1].name} lie at the same position ({positions[i]:.4f} mm "
                      "along the slice normal): duplicate slices")
    vectors = np.diff(ipps, axis=0)
    off = np.linalg.norm(vectors - np.outer(steps, normal), axis=1) / steps
    if off.max() > TILT_TOLERANCE:
        t = int(np.flatnonzero(off > TILT_TOLERANCE)[0])  # the first step off the normal
        raise problem(f"the slices are not stacked along their normal: from {files[t].name} to {files[t + 1].name} "
                      f"the position moves {np.degrees(np.arctan(off[t])):.2f} degrees off it (gantry tilt or a "
                      "sheared acquisition); resample the series onto an orthogonal grid first")
    median = float(np.median(steps))
    tolerance = SPACING_TOLERANCE * median
    multiple = np.rint(steps / median)
    gaps = [i for i in range(len(steps)) if multiple[i] >= 2 and abs(steps[i] - multiple[i] * median) <= tolerance
            * multiple[i]]
    if gaps:
        parts = "; ".join(f"{int(multiple[i]) - 1} between {files[i].name} ({positions[i]:.3f} mm) and "
                          f"{files[i + 1].name} ({positions[i + 1]:.3f} mm)" for i in gaps)
        raise problem(f"missing slices (spacing {median:g} mm): {parts}")
    bad = np.flatnonzero(np.abs(steps - median) > tolerance)
    if bad.size:
        b = int(bad[0])
        raise problem(f"non-uniform slice spacing: steps from {steps.min():g} to {steps.max():g} mm along the "
                      f"normal (median {median:g} mm, tolerance {SPACING_TOLERANCE:.0%}), first between "
                      f"{files[b].name} and {files[b + 1].name}")
    return float((positions[-1] - positions[0]) / (len(files) - 1))


# ---- reading -------------------------------------------------------------------------------------------------

def read_series(series: DicomSeries) -> tuple[np.ndarray, "Geometry"]:
    """(z, y, x) voxels (rescale slope/intercept applied by GDCM) and the series' geometry, from the headers'
    grid; every header check runs first, then the size check, then the pixels are read."""
    from medseg.datasets.io import _cause, check_volume_size

    checked = check_series(series)
    bits = int(checked.headers[0].get("BitsAllocated", 16) or 16)
    check_volume_size(series.folder, checked.shape[::-1], max(1, bits // 8))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in checked.files])  # our order: sorted along the normal
    try:
        image = reader.Execute()
    except Exception as e:  # noqa: BLE001
        raise VolumeError(f"{series}: cannot read the pixel data ({_cause(e)})") from None
    data = sitk.GetArrayFromImage(image)
    if tuple(data.shape) != checked.shape:
        raise VolumeError(f"{series}: read {data.shape} voxels, the headers declare {checked.shape}")
    return data, checked.geometry()


def read_dicom_image(path: ImageInput) -> tuple[np.ndarray, "Geometry"]:
    """A DICOM image input: a series, a folder holding one series, or one slice file (a one-slice series)."""
    if isinstance(path, DicomSeries):
        return read_series(path)
    path = Path(path)
    if path.is_dir():
        return read_series(series_of_folder(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return read_series(DicomSeries(_series_uid(path), (path,), path.parent))


# ---- DICOM-SEG labels ----------------------------------------------------------------------------------------

def _highdicom():
    try:
        import highdicom
    except ImportError:  # the optional extra
        raise MedsegError("reading DICOM-SEG needs highdicom: pip install 'medseg[dicom]'") from None
    return highdicom


def _source_series(path: Path, uid: str) -> DicomSeries:
    """The series a DICOM-SEG references, looked for under the SEG's folder, then under the folder above it."""
    looked = []
    for folder in (path.parent, path.parent.parent):
        looked.append(str(folder))
        for s in find_series(folder):
            if s.uid == uid:
                return s
    raise VolumeError(f"{path}: the DICOM-SEG references series {uid}, which is not under {' or '.join(looked)}; "
                      "keep a SEG label in or beside the folder of its source series")


def read_dicom_seg(path: str | Path) -> tuple[np.ndarray, "Geometry"]:
    """A DICOM-SEG as a (z, y, x) int16 label map on its source series' grid: each voxel holds the number of
    the segment covering it (0: none); frames are placed by the source SOP instances they reference."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    hd = _highdicom()
    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # noqa: BLE001 - whatever highdicom says, not a usable SEG
        raise VolumeError(f"{path}: not a readable DICOM-SEG ({type(e).__name__}: {e})") from None
    refs = seg.get("ReferencedSeriesSequence") or []
    if len(refs) != 1:
        raise VolumeError(f"{path}: the DICOM-SEG references {len(refs)} series; a label references one")
    checked = check_series(_source_series(path, str(refs[0].SeriesInstanceUID)))
    try:
        labels = seg.get_pixels_by_source_instance(checked.sop_instance_uids, combine_segments=True,
                                                   assert_missing_frames_are_empty=True)
    except Exception as e:  # noqa: BLE001 - overlapping segments, frames of other instances
        raise VolumeError(f"{path}: cannot place the segments on series {checked.series.uid} "
                          f"({type(e).__name__}: {e})") from None
    return np.asarray(labels, dtype=np.int16), checked.geometry()
