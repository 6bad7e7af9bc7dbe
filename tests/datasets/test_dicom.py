"""DICOM series as cases: read back voxel for voxel in the series' geometry, found in nested folders and list
files, refused with one clear error per bad series before any pixel is read, and usable as training data with a
DICOM-SEG or NIfTI label."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.datasets.adapters import build_manifest
from medseg.datasets.dicom import DicomSeries, find_series, read_dicom_seg
from medseg.datasets.io import read_image, read_label, write_label
from medseg.datasets.labels import LabelScheme
from medseg.errors import VolumeError
from medseg.inference.batch import collect_inputs
from medseg.inference.dicom_seg import write_dicom_seg
from medseg.inference.predictor import group_cases, output_path
from medseg.planning.fingerprint import compute_fingerprint
from tests.datasets.dicom_series import oblique, write_series

CASE = "hippocampus_001"
SCHEME = LabelScheme({0: "background", 1: "Anterior", 2: "Posterior"})


@pytest.fixture(scope="module")
def volume(hippocampus) -> sitk.Image:
    return sitk.ReadImage(str(hippocampus / "imagesTr" / f"{CASE}.nii.gz"))


@pytest.fixture(scope="module")
def truth(hippocampus) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(hippocampus / "labelsTr" / f"{CASE}.nii.gz"))).astype(np.int16)


def _geometry_of(image: sitk.Image):
    return np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin()), np.asarray(image.GetDirection())


@pytest.mark.parametrize("grid", ["as stored", "oblique"])
def test_series_reads_back_as_the_nifti_voxel_for_voxel(volume, hippocampus, tmp_path, grid):
    image = volume if grid == "as stored" else oblique(volume)
    nifti = hippocampus / "imagesTr" / f"{CASE}.nii.gz"
    if grid == "oblique":
        nifti = tmp_path / "oblique.nii.gz"
        sitk.WriteImage(image, str(nifti))
    write_series(tmp_path / "dicom", image)
    (series,) = find_series(tmp_path / "dicom")
    data, geo = read_image([series])
    ref, ref_geo = read_image([nifti])
    np.testing.assert_array_equal(data, ref)  # every voxel, exactly
    assert geo.kind == "dicom" and geo.shape == ref_geo.shape == (35, 51, 35)
    spacing, origin, direction = _geometry_of(image)
    # against the written grid: DICOM's decimal strings carry 16 characters
    np.testing.assert_allclose(geo.spacing[::-1], spacing, rtol=1e-12)
    np.testing.assert_allclose(geo.origin, origin, atol=1e-10)
    np.testing.assert_allclose(geo.direction, direction, atol=1e-12)
    # against the NIfTI as medseg reads it (both RAS): exact for the stored grid, NIfTI's float32 sform otherwise
    np.testing.assert_allclose(geo.affine, ref_geo.affine, atol=0 if grid == "as stored" else 1e-5)
    # the same grid through a folder path (a training case's image) and through one listed slice's folder
    folder_data, folder_geo = read_image([tmp_path / "dicom"])
    np.testing.assert_array_equal(folder_data, data)
    assert folder_geo.same_grid(geo)


def test_rescale_slope_and_intercept_give_the_stored_values_back(volume, tmp_path):
    write_series(tmp_path / "dicom", volume, rescale=(0.5, -100.0))  # stored: 2 * (voxel + 100)
    data, _ = read_image([tmp_path / "dicom"])
    np.testing.assert_array_equal(data[0], sitk.GetArrayFromImage(volume).astype(np.float32))


def test_label_maps_on_a_series_or_itk_grid_are_written_as_nifti_in_that_world(volume, tmp_path):
    image = oblique(volume)
    write_series(tmp_path / "dicom", image)
    sitk.WriteImage(image, str(tmp_path / "volume.mha"))
    for source in (tmp_path / "dicom", tmp_path / "volume.mha"):
        _, geo = read_image([source])
        target = tmp_path / f"{source.stem}_label.nii.gz"
        write_label(np.zeros(geo.shape, np.int16), geo, target)
        written = sitk.ReadImage(str(target))  # LPS, as the series and the .mha
        spacing, origin, direction = _geometry_of(image)
        np.testing.assert_allclose(written.GetSpacing(), spacing, rtol=1e-6)  # NIfTI holds float32
        np.testing.assert_allclose(written.GetOrigin(), origin, atol=1e-5)
        np.testing.assert_allclose(written.GetDirection(), direction, atol=1e-6)
        header = nib.load(str(target)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)


def test_a_folder_with_series_in_nested_folders_gives_one_case_each(volume, truth, tmp_path):
    scans = tmp_path / "scans"
    first = write_series(scans / "patient1" / "t1", volume, patient_id="P001", description="T1 axial")
    write_series(scans / "patient1" / "t1_repeat", volume, patient_id="P001", description="T1 axial")
    write_series(scans / "patient2" / "study" / "series", volume, patient_id="P002", description="",
                 series_number=7)
    source = [s for s in find_series(scans) if s.folder.name == "t1"][0]
    checked = read_image([source])[1].source
    write_dicom_seg(truth, checked, SCHEME, scans / "patient1" / "t1" / "seg.dcm")  # a result, not a case
    sitk.WriteImage(volume, str(scans / "plain.nii.gz"))
    inputs = collect_inputs(scans, tmp_path / "out")
    series = [i for i in inputs if isinstance(i, DicomSeries)]
    assert len(inputs) == 4 and len(series) == 3
    ids = sorted(s.case_id for s in series)
    # equal names get a hash of their UID; none gets the series number
    assert ids[0].startswith("P001_T1_axial_") and ids[1].startswith("P001_T1_axial_") and ids[0] != ids[1]
    assert ids[2] == "P002_series7"
    assert len(ids[0]) == len("P001_T1_axial_") + 8
    assert [s.files for s in series if s.folder.name == "t1"][0] == tuple(first)  # the SEG is no slice
    cases = group_cases(inputs, num_channels=1)
    assert sorted(cases) == sorted([*ids, "plain"])
    assert output_path(ids[2], cases[ids[2]], tmp_path / "out") == tmp_path / "out" / "P002_series7.nii.gz"
    assert collect_inputs(scans, tmp_path / "out2") == inputs  # the same ids on every run


def _bad_series(kind: str, volume: sitk.Image, tmp_path):
    """A 10-slice series made bad in one way; (the series as prediction would find it, expected message)."""
    image = volume[:, :, :10]
    folder = tmp_path / kind
    step = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2] * image.GetSpacing()[2]
    positions = [np.asarray(image.GetOrigin()) + k * step for k in range(10)]
    if kind == "missing slice":
        files = write_series(folder, image)
        files.pop(4).unlink()
        return files, "missing slices \\(spacing 1 mm\\): 1 between slice_003.dcm \\(-?[0-9.]+ mm\\) and slice_005.dcm"
    if kind == "non-uniform spacing":
        positions[4] = positions[4] + 0.4 * step
        files = write_series(folder, image, positions=positions)
        return files, ("non-uniform slice spacing: steps from 0.6 to 1.4 mm along the normal \\(median 1 mm, "
                       "tolerance 1%\\), first between slice_003.dcm and slice_004.dcm")
    if kind == "gantry tilt":
        row = np.asarray(image.GetDirection()).reshape(3, 3)[:, 1]
        positions = [p + k * 0.2 * row for k, p in enumerate(positions)]
        files = write_series(folder, image, positions=positions)
        return files, ("the slices are not stacked along their normal: from slice_000.dcm to slice_001.dcm the "
                       "position moves 11.31 degrees off it \\(gantry tilt")
    if kind == "inconsistent rows":
        files = write_series(folder, image, rows_of={6: 40})
        return files, "inconsistent rows x columns between slices: 51x35 in 9 file\\(s\\), 40x35 in 1 file\\(s\\)"
    if kind == "mixed series":
        files = write_series(folder / "a", image) + write_series(folder / "b", image, description="other")
        return files, ("the files belong to 2 series: [0-9.]+ \\(10 file\\(s\\)\\), [0-9.]+ \\(10 file\\(s\\)\\); "
                       "a case is one series")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing slice", "non-uniform spacing", "gantry tilt", "inconsistent rows",
                                  "mixed series"])
def test_each_bad_series_gets_its_error_before_any_pixel_is_read(kind, volume, tmp_path, monkeypatch):
    files, message = _bad_series(kind, volume, tmp_path)
    listing = tmp_path / "slices.txt"
    listing.write_text("\n".join(str(f) for f in files))
    (series,) = collect_inputs(listing, tmp_path / "out")  # one case, however bad
    assert isinstance(series, DicomSeries)

    def no_pixels(*_):
        raise AssertionError("pixel data read before the headers were checked")

    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", no_pixels)
    with pytest.raises(VolumeError, match=message) as err:
        read_image([series])
    # the error names the series (UID and folder) and where its slices were listed
    assert str(err.value).startswith(f"DICOM series {series.uid} ({series.folder}, listed in {listing}): ")


def test_a_list_of_one_series_slices_is_one_case(volume, tmp_path):
    files = write_series(tmp_path / "scans" / "t1", volume)
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "case.txt"
    listing.write_text("# one series, slice by slice, in any order\n" +
                       "\n".join(f"../scans/t1/{f.name}" for f in reversed(files)) + "\n")
    inputs = collect_inputs(listing, tmp_path / "out")
    assert len(inputs) == 1 and isinstance(inputs[0], DicomSeries) and len(inputs[0].files) == 35
    cases = group_cases(inputs, num_channels=1)
    assert list(cases) == ["P001_T1"]
    assert output_path("P001_T1", cases["P001_T1"], tmp_path / "out") == tmp_path / "out" / "P001_T1.nii.gz"
    listed, _ = read_image(cases["P001_T1"])
    folder, _ = read_image([tmp_path / "scans" / "t1"])
    np.testing.assert_array_equal(listed, folder)


def test_dicom_images_with_seg_or_nifti_labels_are_training_cases(volume, truth, tmp_path):
    root = tmp_path / "data"
    write_series(root / "case_a" / "image", oblique(volume), patient_id="A")
    write_series(root / "case_b" / "image", volume, patient_id="B")
    _, geo_a = read_image([root / "case_a" / "image"])
    _, geo_b = read_image([root / "case_b" / "image"])
    write_dicom_seg(truth, geo_a.source, SCHEME, root / "case_a" / "seg.dcm")
    write_label(truth, geo_b, root / "case_b" / "label.nii.gz")  # a NIfTI label on the series' grid
    label, label_geo = read_label(root / "case_a" / "seg.dcm")
    np.testing.assert_array_equal(label, truth)
    assert label_geo.same_grid(geo_a, atol=1e-9)
    manifest = {"name": "dicom", "channel_names": ["MRI"], "labels": {"0": "background", "1": "Anterior",
                                                                      "2": "Posterior"},
                "cases": [{"case_id": "a", "images": ["case_a/image"], "label": "case_a/seg.dcm"},
                          {"case_id": "b", "images": ["case_b/image"], "label": "case_b/label.nii.gz"}]}
    (tmp_path / "dicom.json").write_text(json.dumps(manifest))
    m = build_manifest("manifest", path=str(tmp_path / "dicom.json"), root=str(root))
    fp = compute_fingerprint(m, num_processes=1, progress=False)  # every case validated: grids, labels
    by_case = {c.case_id: c for c in fp.cases}
    np.testing.assert_allclose(by_case["a"].spacing, [1.3, 0.8, 0.7], rtol=1e-9)
    assert by_case["b"].shape_before_crop == [35, 51, 35]
    # a SEG whose source series is not beside it is refused, naming the series it references
    moved = tmp_path / "elsewhere" / "sub" / "seg.dcm"
    moved.parent.mkdir(parents=True)
    shutil.copy(root / "case_a" / "seg.dcm", moved)
    with pytest.raises(VolumeError, match=f"references series {geo_a.source.series.uid}, which is not under"):
        read_dicom_seg(moved)
