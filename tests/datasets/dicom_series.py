"""Writing volumes as DICOM series (pydicom) for the DICOM tests: one MR slice per file with its position,
orientation, spacing and UIDs, as a scanner writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds


def _ds(values) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def write_series(folder: Path, image: sitk.Image, patient_id: str = "P001", description: str = "T1",
                 series_number: int = 3, series_uid: str | None = None, study_uid: str | None = None,
                 positions: list | None = None, rows_of: dict[int, int] | None = None,
                 rescale: tuple[float, float] | None = None) -> list[Path]:
    """``image`` (3D, integer voxels >= 0) as ``folder/slice_<k>.dcm``. ``positions`` replaces the slices'
    ImagePositionPatient (to make bad series); ``rows_of`` {slice: rows} crops some slices' rows; ``rescale``
    (slope, intercept) stores (voxel - intercept) / slope with RescaleSlope/RescaleIntercept."""
    folder.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    series_uid, study_uid, frame_uid = series_uid or generate_uid(), study_uid or generate_uid(), generate_uid()
    files = []
    for k in range(array.shape[0]):
        pixels = array[k] if rescale is None else (array[k] - rescale[1]) / rescale[0]
        pixels = np.rint(pixels).astype(np.uint16)
        if rows_of and k in rows_of:
            pixels = pixels[:rows_of[k]]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Test^Patient", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer = "MR", "test"
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, series_number, k + 1
        position = origin + k * spacing[2] * direction[:, 2] if positions is None else np.asarray(positions[k])
        ds.ImagePositionPatient = _ds(position)
        ds.ImageOrientationPatient = _ds(np.concatenate([direction[:, 0], direction[:, 1]]))
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # row spacing (y), column spacing (x)
        ds.SliceThickness = format_number_as_ds(float(spacing[2]))
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = (format_number_as_ds(float(v)) for v in rescale)
        ds.PixelData = pixels.tobytes()
        path = folder / f"slice_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def oblique(image: sitk.Image, spacing=(0.7, 0.8, 1.3), degrees: float = 20.0) -> sitk.Image:
    """The same voxels on a rotated (about two axes), anisotropic grid with a world origin off zero."""
    a, b = np.radians(degrees), np.radians(degrees / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = sitk.Image(image)
    out.SetSpacing(spacing)
    out.SetDirection(tuple((rz @ rx).ravel()))
    out.SetOrigin((-12.5, 30.25, 7.0))
    return out
