import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.datasets.io import read_image, read_label, write_label


def test_nifti_roundtrip_keeps_affine_and_header_codes(tmp_path):
    affine = np.array([[0.0, 0.0, 2.5, -30.0], [-0.8, 0.0, 0.0, 40.0], [0.0, 0.9, 0.0, -12.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.random.rand(6, 7, 5).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(tmp_path / "in.nii.gz"))
    data, geo = read_image([tmp_path / "in.nii.gz"])
    assert data.shape == (1, 5, 7, 6) and data.dtype == np.float32  # (z, y, x): the file's last axis first
    np.testing.assert_array_equal(data[0], np.transpose(np.asarray(img.dataobj)))
    np.testing.assert_allclose(geo.spacing, [2.5, 0.9, 0.8], rtol=1e-6)
    label = (data[0] > 0.5).astype(np.uint8)
    write_label(label, geo, tmp_path / "out.nii.gz")
    out = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(out.affine, img.affine)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert out.shape == (6, 7, 5)
    np.testing.assert_array_equal(np.asarray(out.dataobj), np.transpose(label))


def test_itk_roundtrip_keeps_direction_and_origin(tmp_path):
    arr = np.random.rand(5, 7, 6).astype(np.float32)  # (z, y, x) as SimpleITK stores it
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetOrigin((10.0, -20.0, 5.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    data, geo = read_image([tmp_path / "in.nrrd"])
    assert data.shape == (1, 5, 7, 6)  # SimpleITK's (z, y, x)
    np.testing.assert_array_equal(data[0], arr)
    assert geo.spacing == (3.0, 0.8, 0.7)
    label = (data[0] > 0.5).astype(np.uint8)
    write_label(label, geo, tmp_path / "out.nrrd")
    out = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    assert out.GetDirection() == img.GetDirection()
    assert out.GetOrigin() == img.GetOrigin()
    assert out.GetSpacing() == img.GetSpacing()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), label)


def test_float_labels_are_cast_and_fractional_labels_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.array([[[0, 1], [2, 1]]], np.float32), np.eye(4)), str(tmp_path / "ok.nii.gz"))
    label, _ = read_label(tmp_path / "ok.nii.gz")
    assert label.dtype == np.int16 and set(np.unique(label)) == {0, 1, 2}
    nib.save(nib.Nifti1Image(np.array([[[0, 1.5]]], np.float32), np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(ValueError, match="bad.nii.gz: label map holds non-integer values"):
        read_label(tmp_path / "bad.nii.gz")


def test_multichannel_4d_image_is_channel_first(tmp_path):
    nib.save(nib.Nifti1Image(np.random.rand(4, 5, 6, 2).astype(np.float32), np.eye(4)), str(tmp_path / "mc.nii.gz"))
    data, geo = read_image([tmp_path / "mc.nii.gz"])
    assert data.shape == (2, 6, 5, 4) and geo.shape == (6, 5, 4)
