"""Reading and writing volumes with their geometry.

NIfTI goes through nibabel (keeps the exact affine and header); NRRD/MHA/other ITK formats through SimpleITK;
DICOM image series (a folder of one, or a medseg.datasets.dicom.DicomSeries) and DICOM-SEG labels through
medseg.datasets.dicom (headers checked with pydicom, voxels read by SimpleITK, SEGs by highdicom).
2D natural images (PNG, BMP, TIFF) go through SimpleITK too and are read as nnU-Net v2's NaturalImage2DIO reads
them: one slice of a 3D volume with spacing (999, 1, 1), a colour image's channels as a trailing channel axis.
Arrays are channel-first with spatial axes in SimpleITK's (z, y, x) order, the file's last voxel axis first,
whatever the format: the order nnU-Net plans in, so that tie-breaks between axes (slice axis of the 2d
configuration, which axis shrinks first) agree with it. ``spacing[k]`` belongs to array axis k.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.atomic import atomic_path
from medseg.errors import VolumeError, WriteError

if TYPE_CHECKING:
    from medseg.datasets.dicom import ImageInput

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
NATURAL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + NATURAL_SUFFIXES
# nnU-Net's spacing for natural images: pixels carry no physical size, and the slice axis is made far coarser
# than the pixels so that planning makes the 2d configuration only
NATURAL_SPACING = (999.0, 1.0, 1.0)


def image_suffix(path: str | Path) -> str:
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: str | Path) -> str:
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


@dataclass
class Geometry:
    """Where a volume's voxels lie in the world, enough to write a result back on the same grid."""

    shape: tuple[int, ...]  # spatial shape, array (z, y, x) order
    spacing: tuple[float, ...]  # array order
    affine: np.ndarray  # 4x4, file voxel index (i, j, k) -> world (RAS for NIfTI and DICOM, LPS for ITK formats)
    # "nifti", "itk", "dicom" (a DICOM series) or "natural" (a 2D PNG/BMP/TIFF: shape (1, y, x), no world frame)
    kind: str
    header: object | None = field(default=None, repr=False)  # nibabel header, reused on write
    direction: tuple[float, ...] | None = None  # ITK direction cosines
    origin: tuple[float, ...] | None = None  # ITK origin
    # a DICOM series' checked headers (medseg.datasets.dicom.CheckedSeries): what a DICOM-SEG of it references
    source: object | None = field(default=None, repr=False)

    def same_grid(self, other: "Geometry", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)


def natural_geometry(height: int, width: int) -> Geometry:
    """A 2D image's grid as a one-slice volume; the affine only carries NATURAL_SPACING (file order x, y, z)."""
    affine = np.diag([NATURAL_SPACING[2], NATURAL_SPACING[1], NATURAL_SPACING[0], 1.0])
    return Geometry((1, int(height), int(width)), NATURAL_SPACING, affine, "natural")


def _spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def _reverse_spatial(data: np.ndarray, ndim: int) -> np.ndarray:
    """(i, j, k[, c]) <-> (k, j, i[, c]): reverse the spatial axes, keep a trailing channel axis."""
    return np.transpose(data, tuple(range(ndim))[::-1] + tuple(range(ndim, data.ndim)))


# Largest volume medseg reads into memory, counted as its float32 working copy. A header claiming more is
# refused before any voxel is read: it is damaged or hostile, or the volume is far beyond what one machine
# plans, preprocesses and predicts. MEDSEG_MAX_VOLUME_GB raises (or lowers) it.
DEFAULT_MAX_VOLUME_GB = 16.0


def max_volume_bytes() -> int:
    return int(float(os.environ.get("MEDSEG_MAX_VOLUME_GB", DEFAULT_MAX_VOLUME_GB)) * 2**30)


def check_volume_size(path: str | Path, shape, itemsize: int) -> None:
    """Refuse a volume whose header declares more voxels than fit the limit, before reading its data."""
    voxels = int(np.prod([int(s) for s in shape], dtype=object))  # exact: a hostile header may overflow int64
    need = voxels * max(int(itemsize), 4)
    limit = max_volume_bytes()
    if need > limit:
        raise VolumeError(f"{path}: the header declares a {'x'.join(str(int(s)) for s in shape)} volume "
                          f"({need / 2**30:.1f} GiB in memory), above the {limit / 2**30:.1f} GiB limit "
                          "(MEDSEG_MAX_VOLUME_GB); refused before reading: the header is damaged or the volume "
                          "is too large")


def _cause(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Return (data, geometry); data is (z, y, x) or (z, y, x, c), not yet cast. The header is read and the
    declared size checked first; a damaged or truncated file raises VolumeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    nifti = image_suffix(path) in NIFTI_SUFFIXES
    natural = image_suffix(path) in NATURAL_SUFFIXES
    try:
        if nifti:
            img = nib.load(str(path))  # the header only; voxels are read below
            shape, itemsize = img.shape, img.get_data_dtype().itemsize
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
            components = reader.GetNumberOfComponents()
            shape = tuple(reader.GetSize()) + ((components,) if components > 1 else ())
            itemsize = probe.GetSizeOfPixelComponent()
    except Exception as e:  # noqa: BLE001 - whatever the reader says, the file is not a readable image
        raise VolumeError(f"{path}: not a readable image ({_cause(e)})") from None
    if natural:
        _check_natural_size(path, reader)
    check_volume_size(path, shape, itemsize)
    try:
        if nifti:
            return _read_nifti_data(img)
        if natural:
            return _read_natural_data(path, reader.Execute())
        return _read_itk_data(reader.Execute())
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        raise VolumeError(f"{path}: cannot read the voxel data; the file is truncated or corrupt ({_cause(e)})") \
            from None


def _read_nifti_data(img) -> tuple[np.ndarray, Geometry]:
    ndim = min(3, len(img.shape))
    data = _reverse_spatial(np.asanyarray(img.dataobj), ndim)
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = _spacing_from_affine(affine)[:ndim][::-1]
    return data, Geometry(tuple(int(s) for s in data.shape[:ndim]), spacing, affine, "nifti", header=img.header.copy())


def _read_itk_data(img) -> tuple[np.ndarray, Geometry]:
    data = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, c)
    ndim = img.GetDimension()
    spacing_ijk = np.asarray(img.GetSpacing(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction * spacing_ijk[None, :]
    affine[:ndim, ndim] = img.GetOrigin()
    geo = Geometry(tuple(int(s) for s in data.shape[:ndim]), tuple(float(s) for s in spacing_ijk[::-1]), affine,
                   "itk", direction=tuple(img.GetDirection()), origin=tuple(img.GetOrigin()))
    return data, geo


def _check_natural_size(path: Path, reader) -> None:
    """A natural image is one 2D picture; a multi-page TIFF is a stack nnU-Net reads with another reader (with
    spacing from a side file), so it is refused here rather than guessed at."""
    size = tuple(reader.GetSize())
    if len(size) == 3 and size[2] == 1:
        return
    if len(size) != 2:
        raise VolumeError(f"{path}: a {'x'.join(map(str, size))} {len(size)}D image; .png/.bmp/.tif files are read "
                          "as single 2D images: store volumes as NIfTI, NRRD or MHA")


def _read_natural_data(path: Path, img) -> tuple[np.ndarray, Geometry]:
    """(1, y, x) grey or (1, y, x, c) colour, on its natural_geometry."""
    data = sitk.GetArrayFromImage(img)  # (y, x) or (y, x, c)
    if img.GetDimension() == 3:  # a TIFF with one page: (1, y, x[, c])
        data = data[0]
    if _grey_palette_bmp(path, data):
        data = data[..., 0]
    return data[None], natural_geometry(data.shape[0], data.shape[1])


def _grey_palette_bmp(path: Path, data: np.ndarray) -> bool:
    """ITK expands every 8-bit (palette) BMP to RGB, also greyscale ones, which other readers (Pillow, so
    nnU-Net) and medseg's own label writer treat as single-channel: such a file is grey again when its
    three channels agree everywhere."""
    if image_suffix(path) != ".bmp" or data.ndim != 3 or data.shape[-1] != 3:
        return False
    with open(path, "rb") as f:
        head = f.read(30)
    # bit depth: offset 24 in the old 12-byte OS/2 header, else 28
    at = 24 if int.from_bytes(head[14:18], "little") == 12 else 28
    bits = int.from_bytes(head[at:at + 2], "little")
    return bits <= 8 and bool((data[..., 0] == data[..., 1]).all() and (data[..., 0] == data[..., 2]).all())


_COLOUR_KIND = {2: "greyscale + alpha", 3: "RGB, or a colour palette", 4: "RGBA"}


def _natural_channels(data: np.ndarray) -> int:
    return int(data.shape[-1]) if data.ndim == 4 else 1


def check_natural_image(path: str | Path, data: np.ndarray) -> None:
    """A natural image holds 1 (grey) or 3 (RGB) channels; an alpha channel is refused rather than trained on."""
    channels = _natural_channels(data)
    if channels not in (1, 3):
        raise VolumeError(f"{path}: {channels} colour channels ({_COLOUR_KIND.get(channels, 'unknown')}); a 2D "
                          "image must be greyscale or RGB (3 channels): save it without the alpha channel")


def orientation(geometry: Geometry) -> str:
    """Axis codes of the file's voxel axes in RAS world terms (e.g. ``RAS``, ``LPS``, ``PIR``), whatever the
    format (ITK formats store LPS coordinates)."""
    ndim = len(geometry.shape)
    affine = np.asarray(geometry.affine, dtype=np.float64)
    if ndim != 3 or geometry.kind == "natural":  # a picture has no world orientation
        return ""
    if geometry.kind == "itk":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return "".join(str(c) for c in nib.aff2axcodes(affine))


def nonfinite_problem(path: "str | Path | ImageInput", image: np.ndarray) -> str | None:
    """The problem with an image holding NaN or Inf values (z-scoring would spread them over the whole
    volume), or None."""
    if np.isfinite(image).all():
        return None
    bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
    return f"{path}: image contains NaN or Inf values ({bad} voxel(s))"


def is_dicom_input(path: "str | Path | ImageInput") -> bool:
    """A DICOM series, a folder (of one series) or a ``.dcm`` file: read by medseg.datasets.dicom."""
    from medseg.datasets.dicom import DICOM_SUFFIX, DicomSeries

    return isinstance(path, DicomSeries) or Path(path).is_dir() or str(path).lower().endswith(DICOM_SUFFIX)


def read_image(paths: "Sequence[str | Path | ImageInput]") -> tuple[np.ndarray, Geometry]:
    """Read one case's image channels (one file per channel, or one 4D file, or a DICOM series each) as float32
    (c, z, y, x)."""
    from medseg.datasets.dicom import read_dicom_image

    channels: list[np.ndarray] = []
    geometry: Geometry | None = None
    for p in paths:
        data, geo = read_dicom_image(p) if is_dicom_input(p) else read_volume(p)  # type: ignore[arg-type]
        if geo.kind == "natural":
            check_natural_image(p, data)
        if data.ndim in (2, 3):
            data = data[None]
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
        else:
            raise VolumeError(f"{p}: expected a 2D/3D volume or a 4D multi-channel volume, got shape {data.shape}")
        if geometry is None:
            geometry = geo
        elif not geometry.same_grid(geo):
            raise VolumeError(f"{p}: channel grid {geo.shape} / affine differs from the first channel {paths[0]}")
        channels.append(np.asarray(data, dtype=np.float32))
    assert geometry is not None, "read_image needs at least one path"
    return np.concatenate(channels, axis=0), geometry


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label map as int16 (z, y, x); some datasets store labels as float, values must still be integers.
    A ``.dcm`` label is a DICOM-SEG, read onto the grid of the series it references (segment numbers as values)."""
    if str(path).lower().endswith(".dcm"):
        from medseg.datasets.dicom import read_dicom_seg

        return read_dicom_seg(path)
    data, geo = read_volume(path)
    data = np.asarray(data)
    if geo.kind == "natural" and _natural_channels(data) > 1:
        channels = _natural_channels(data)
        raise VolumeError(f"{path}: a label image must have one channel holding the label values, this one has "
                          f"{channels} ({_COLOUR_KIND.get(channels, 'colour')}): save it as a greyscale image")
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: a label map must be 3D, got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)):
            raise VolumeError(f"{path}: label map contains NaN or Inf")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise VolumeError(f"{path}: label map holds non-integer values")
        data = rounded
    return data.astype(np.int16), geo


def write_label(label: np.ndarray, geometry: Geometry, path: str | Path) -> None:
    """Write a label map on ``geometry``'s grid, in the format the path's suffix names; atomic (temp + rename)."""
    path = Path(path)
    if tuple(label.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: label shape {label.shape} does not match the target grid {geometry.shape}")
    if image_suffix(path) in NATURAL_SUFFIXES:
        _check_natural_label(label, path)
    try:
        with atomic_path(path, suffix=image_suffix(path)) as tmp:
            _write_label(label, geometry, path, tmp)
    except (OSError, RuntimeError) as e:  # disk full, permissions (SimpleITK raises RuntimeError)
        reason = getattr(e, "strerror", None) or _cause(e)
        raise WriteError(f"{path}: cannot write ({reason}); nothing was replaced") from e


def _natural_dtype(label: np.ndarray) -> type:
    # as nnU-Net's NaturalImage2DIO: 8-bit where the values fit, else 16-bit (PNG and TIFF hold unsigned only)
    return np.uint8 if label.max(initial=0) < 256 else np.uint16


def _check_natural_label(label: np.ndarray, path: Path) -> None:
    """A 2D image file holds one slice of non-negative values its format can store; refused before writing."""
    if label.ndim != 3 or label.shape[0] != 1:
        raise WriteError(f"{path}: a {'x'.join(map(str, label.shape))} label map is not one 2D slice, which is all "
                         f"a {image_suffix(path)} file holds; nothing was written")
    low, high = int(label.min(initial=0)), int(label.max(initial=0))
    limit = 255 if image_suffix(path) == ".bmp" else 65535  # ITK writes 8-bit BMP only
    if low < 0 or high > limit:
        raise WriteError(f"{path}: label values {low}..{high} do not fit a {image_suffix(path)} file (0..{limit}); "
                         "nothing was written")


def _write_label(label: np.ndarray, geometry: Geometry, path: Path, tmp: Path) -> None:
    suffix = image_suffix(path)
    if suffix in NATURAL_SUFFIXES:  # the 2D picture only: pixels have no spacing or position
        sitk.WriteImage(sitk.GetImageFromArray(np.asarray(label[0], dtype=_natural_dtype(label))), str(tmp),
                        useCompression=True)
        return
    label = np.asarray(label, dtype=np.uint8 if label.max(initial=0) < 256 else np.int16)
    ndim = label.ndim
    if suffix in NIFTI_SUFFIXES:
        header = geometry.header.copy() if geometry.header is not None and geometry.kind == "nifti" else None
        # NIfTI's world is RAS; an ITK format's geometry is LPS
        affine = geometry.affine
        if geometry.kind == "itk":
            affine = np.diag([-1.0, -1.0] + [1.0] * (len(affine) - 2)) @ affine
        img = nib.Nifti1Image(_reverse_spatial(label, ndim), affine, header=header)
        img.set_data_dtype(label.dtype)
        # keep the input's qform/sform codes and matrices: geometry is copied, not re-derived
        if header is not None:
            img.set_qform(header.get_qform(), code=int(header["qform_code"]))
            img.set_sform(header.get_sform(), code=int(header["sform_code"]))
        elif geometry.kind in ("dicom", "itk"):  # a scanner's world frame in mm, in both matrices (as ITK writes)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm")
        img.header["scl_slope"] = 1
        img.header["scl_inter"] = 0
        nib.save(img, str(tmp))
    else:
        img = sitk.GetImageFromArray(label)
        spacing_ijk = np.asarray(geometry.spacing[::-1], dtype=np.float64)
        img.SetSpacing(tuple(float(s) for s in spacing_ijk))
        if geometry.direction is not None and geometry.origin is not None:
            img.SetDirection(geometry.direction)
            img.SetOrigin(geometry.origin)
        else:  # NIfTI geometry into an ITK file: RAS -> LPS
            flip = np.diag([-1.0, -1.0] + [1.0] * (ndim - 2))
            direction = flip @ (geometry.affine[:ndim, :ndim] / spacing_ijk[None, :])
            img.SetDirection(tuple(direction.ravel()))
            img.SetOrigin(tuple(flip @ geometry.affine[:ndim, ndim]))
        sitk.WriteImage(img, str(tmp), useCompression=True)
