"""Bad datasets are refused before planning, with every problem named at once."""

import numpy as np
import pytest

from medseg.datasets.adapters import build_manifest
from medseg.datasets.synthetic import make_case
from medseg.errors import DatasetError
from medseg.planning.fingerprint import compute_fingerprint
from tests.conftest import make_msd, write_nifti


def _good(seed):
    return make_case(np.random.default_rng(seed), (20, 24, 16), (1.0, 1.0, 1.0))


def test_clean_dataset_passes_silently(tmp_path):
    root = make_msd(tmp_path / "clean", {f"c{i}": _good(i) for i in range(5)})
    fp = compute_fingerprint(build_manifest("msd", root=str(root)), num_processes=1, progress=False)
    assert len(fp.cases) == 5


def test_every_problem_is_reported_with_its_file(tmp_path):
    cases = {f"c{i}": _good(i) for i in range(8)}
    img, lab = cases["c1"]
    cases["c1"] = (img, lab[:-1])  # shape mismatch
    img, lab = cases["c2"]
    lab = lab.copy()
    lab[0, 0, 0] = 7
    cases["c2"] = (img, lab)  # undeclared label value
    img, lab = cases["c3"]
    img = img.copy()
    img[3, 3, 3] = np.nan
    cases["c3"] = (img, lab)  # NaN
    img, lab = cases["c4"]
    cases["c4"] = (np.stack([img, img], -1), lab)  # two channels in a one-channel dataset
    cases["c6"] = (np.zeros_like(cases["c6"][0]), cases["c6"][1])  # all-zero image
    root = make_msd(tmp_path / "bad", cases)
    write_nifti(root / "labelsTr" / "c5.nii.gz", cases["c5"][1], np.diag([2.0, 1.0, 1.0, 1.0]))  # affine
    (root / "imagesTr" / "c0.nii.gz").unlink()  # missing file
    (root / "imagesTr" / "c7.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")  # corrupt
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(build_manifest("msd", root=str(root)), num_processes=2, progress=False)
    problems = err.value.problems
    msg = str(err.value)
    assert len(problems) == 8, msg
    assert "c0.nii.gz: file not found" in msg
    assert "labelsTr/c1.nii.gz: label shape" in msg
    assert "labelsTr/c2.nii.gz: label values [7] are not declared" in msg
    assert "imagesTr/c3.nii.gz: image contains NaN or Inf" in msg
    assert "imagesTr/c4.nii.gz: 2 channel(s), the dataset declares 1" in msg
    assert "labelsTr/c5.nii.gz: label affine differs" in msg
    assert "imagesTr/c6.nii.gz: image is constant" in msg
    assert "case c7: cannot read image" in msg and "c7.nii.gz" in msg


def test_2d_image_in_3d_dataset(tmp_path):
    cases = {f"c{i}": _good(i) for i in range(3)}
    root = make_msd(tmp_path / "mixed", cases)
    write_nifti(root / "imagesTr" / "c2.nii.gz", np.random.rand(20, 24).astype(np.float32))
    write_nifti(root / "labelsTr" / "c2.nii.gz", np.zeros((20, 24), np.uint8))
    with pytest.raises(DatasetError, match=r"imagesTr/c2.nii.gz: 2D image in a 3D dataset"):
        compute_fingerprint(build_manifest("msd", root=str(root)), num_processes=1, progress=False)
