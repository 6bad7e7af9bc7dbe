"""A predicted label map as a DICOM-SEG (highdicom) referencing the DICOM series it was predicted from.

BINARY segmentation: one segment per foreground label of the plan's label scheme, segment numbers 1..N in
ascending label value (equal to the label values where those are 1..N, as in most schemes), the label's name as
SegmentLabel; one frame per segment and slice that holds it (empty frames are left out), each frame referencing
its source slice (SOP instance) and carrying its plane position. BINARY rather than LABELMAP: every DICOM-SEG
reader (viewers, PACS) reads it; LABELMAP is recent (2024) and not yet widely read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import medseg
from medseg.atomic import atomic_path
from medseg.datasets.dicom import CheckedSeries
from medseg.datasets.labels import LabelScheme
from medseg.errors import MedsegError, WriteError

# Series number of a SEG: its source's plus this, so that viewers list it after the source series
SERIES_NUMBER_OFFSET = 1000


def segment_values(scheme: LabelScheme) -> list[int]:
    """The label values written as segments 1..N, in that order."""
    return [v for v in scheme.values if v != 0]


def build_dicom_seg(label: np.ndarray, source: CheckedSeries, scheme: LabelScheme):
    """The highdicom Segmentation of ``label`` ((z, y, x) on ``source``'s grid, z in its slice order)."""
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError:
        raise MedsegError("writing DICOM-SEG needs highdicom: pip install 'medseg[dicom]'") from None
    if tuple(label.shape) != tuple(source.shape):
        raise ValueError(f"label shape {label.shape} does not match the series grid {source.shape}")
    values = segment_values(scheme)
    segments = np.zeros(label.shape, dtype=np.uint8 if len(values) < 256 else np.uint16)
    for number, value in enumerate(values, start=1):
        segments[label == value] = number
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", version=medseg.__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    # the scheme names its labels only: the property codes are the generic anatomical structure
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=scheme.labels[value][:64],
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_id=f"label {value}", tracking_uid=hd.UID()) for number, value in enumerate(values, start=1)]
    first = source.headers[0]
    number = int(first.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
    return hd.seg.Segmentation(
        source_images=source.headers, pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medseg", manufacturer_model_name="medseg", software_versions=medseg.__version__,
        device_serial_number="0", series_description=f"medseg {first.get('SeriesDescription', '')}".strip()[:64],
        # a label map without foreground still makes a valid SEG: its frames are kept, all empty
        omit_empty_frames=bool(segments.any()))


def write_dicom_seg(label: np.ndarray, source: CheckedSeries, scheme: LabelScheme, path: str | Path) -> None:
    """Write the DICOM-SEG of ``label`` atomically (temp file + rename)."""
    path = Path(path)
    seg = build_dicom_seg(label, source, scheme)
    try:
        with atomic_path(path, suffix=".dcm") as tmp:
            seg.save_as(tmp)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e}); nothing was replaced") from e
