"""medseg-predict on DICOM: a list of one series' slices is one case, which predicts the same labels as its NIfTI
volume, in its geometry; its DICOM-SEG puts each frame on the slice it references; a bad series fails alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.inference.batch import BatchSummary, collect_inputs, pending_jobs
from medseg.inference.predictor import group_cases
from tests.datasets.dicom_series import write_series

CASE = "hippocampus_001"


def _run(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name(tool)
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(hippocampus, tmp_path_factory) -> tuple[Path, Path]:
    """A trained run (fold=all, one epoch of two iterations of the debug network) on five real cases."""
    work = tmp_path_factory.mktemp("work")
    manifest = json.loads((Path(__file__).parents[2] / "data_manifests" / "Task04_Hippocampus.json").read_text())
    manifest["cases"] = manifest["cases"][:5]
    (work / "hippo5.json").write_text(json.dumps(manifest))
    result = _run("medseg-train", "data=manifest", f"data.path={work / 'hippo5.json'}", f"data.root={hippocampus}",
                  "debug=fast", "fold=all", "trainer.max_epochs=1", "sampling.iterations_per_epoch=2",
                  "callbacks.progress=plain", "paths.output=outputs", "paths.preprocessed=outputs/preprocessed",
                  cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, work / "outputs" / "hippo5" / "unet__dice_ce"


def _zyx(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def test_dicom_series_predicts_like_its_nifti_and_its_seg_lands_on_the_right_slices(tiny_run, hippocampus,
                                                                                     tmp_path):
    work, run = tiny_run
    scans = tmp_path / "scans"
    nifti = hippocampus / "imagesTr" / f"{CASE}.nii.gz"
    (scans).mkdir()
    (scans / nifti.name).write_bytes(nifti.read_bytes())
    volume = sitk.ReadImage(str(nifti))
    slices = write_series(scans / "P001" / "study" / "t1", volume, patient_id="P001", description="T1")
    broken = write_series(scans / "P002" / "t2", volume, patient_id="P002", description="T2")
    broken[20].unlink()  # a missing slice: that case fails, alone
    # one list: the NIfTI volume, the good series slice by slice (in any order), the broken series' folder
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join([str(scans / nifti.name), *(str(f) for f in reversed(slices)),
                                   str(scans / "P002" / "t2")]) + "\n")
    out = tmp_path / "out"
    result = _run("medseg-predict", f"ckpt_dir={run}", f"input={listing}", f"output={out}", "dicom_seg=true",
                  "mirror_axes=null", "paths.output=outputs", cwd=work)
    assert result.returncode == 1, result.stderr[-4000:]  # one case failed
    assert "predicted 2, skipped 0 (already done), failed 1" in result.stdout
    failed = json.loads((out / "prediction_summary.json").read_text())["failed"]
    series_uid = str(pydicom.dcmread(broken[0], stop_before_pixels=True).SeriesInstanceUID)
    assert failed == {"P002_T2": f"DICOM series {series_uid} ({scans / 'P002' / 't2'}): missing slices (spacing "
                                 "1 mm): 1 between slice_019.dcm (20.000 mm) and slice_021.dcm (22.000 mm)"}
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{CASE}.nii.gz", "P001_T1.dcm", "P001_T1.nii.gz",
                                                             "prediction_summary.json"])
    # the series predicts what its NIfTI volume predicts, written on the same grid
    from_nifti, from_dicom = nib.load(str(out / f"{CASE}.nii.gz")), nib.load(str(out / "P001_T1.nii.gz"))
    np.testing.assert_array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj))
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-9)
    predicted = _zyx(out / "P001_T1.nii.gz")
    present = sorted(int(v) for v in np.unique(predicted) if v)
    assert present, "the tiny run predicts no foreground: nothing to compare the DICOM-SEG with"

    # the DICOM-SEG, rebuilt frame by frame from its own references: source SOP instance -> slice index, and
    # each frame's plane position must be that slice's ImagePositionPatient
    seg = pydicom.dcmread(out / "P001_T1.dcm")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in slices]  # slice_<k> is array z = k
    index = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence} == {1: "Anterior",
                                                                                        2: "Posterior"}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    rebuilt = np.zeros_like(predicted)
    frames = seg.pixel_array.reshape(-1, *predicted.shape[1:])
    for group, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index[str(uid)]
        np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in headers[k].ImagePositionPatient], atol=1e-6)
        rebuilt[k][frame > 0] = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
    np.testing.assert_array_equal(rebuilt, predicted)
    # and as highdicom places it on the source instances
    placed = hd.seg.segread(out / "P001_T1.dcm").get_pixels_by_source_instance(
        [str(h.SOPInstanceUID) for h in headers], combine_segments=True, assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(placed, predicted)


def test_a_missing_dicom_seg_makes_a_case_pending_and_existing_outputs_are_kept(tmp_path):
    volume = sitk.Image([8, 6, 4], sitk.sitkUInt8) + 1
    write_series(tmp_path / "scans" / "t1", volume)
    cases = group_cases(collect_inputs(tmp_path / "scans", tmp_path / "out"), 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "P001_T1.nii.gz").write_bytes(b"an earlier label map")
    jobs = pending_jobs(cases, out, False, False, BatchSummary(), dicom_seg=True)
    assert [(j.case_id, j.dicom_seg) for j in jobs] == [("P001_T1", out / "P001_T1.dcm")]  # the SEG is missing
    (out / "P001_T1.dcm").write_bytes(b"an earlier SEG")
    summary = BatchSummary()
    assert pending_jobs(cases, out, False, False, summary, dicom_seg=True) == [] and summary.skipped == ["P001_T1"]
    assert [j.case_id for j in pending_jobs(cases, out, False, True, BatchSummary(), dicom_seg=True)] == ["P001_T1"]
