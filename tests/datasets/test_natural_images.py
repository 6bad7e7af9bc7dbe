"""2D natural images (PNG, BMP, TIFF) in nnU-Net v2's raw layout, read as nnU-Net's NaturalImage2DIO reads them:
a one-slice volume with spacing (999, 1, 1), RGB as three channels of one file, labels single-channel."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.datasets.adapters import build_manifest, list_images
from medseg.datasets.io import NATURAL_SPACING, natural_geometry, read_image, read_label, write_label
from medseg.errors import ConfigError, DatasetError, VolumeError, WriteError
from medseg.inference.predictor import group_cases, output_path
from medseg.planning.fingerprint import compute_fingerprint
from medseg.preprocessing.prepare import prepare
from tests.conftest import compose, write_nifti


def write_picture(path: Path, array: np.ndarray) -> Path:
    """(y, x) grey or (y, x, c) colour pixels into a 2D image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(path))
    return path


def read_picture(path: Path) -> tuple[np.ndarray, sitk.Image]:
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


def plan_of(root: Path, tmp_path: Path):
    """medseg-plan's planning step (fingerprint, plan; nothing preprocessed) on an nnU-Net raw dataset."""
    cfg = compose("plan", ["data=nnunet_raw", f"data.root={root}", f"paths.preprocessed={tmp_path / 'pre'}",
                           "num_processes=1"])
    return prepare(cfg, [], progress=False)


def disc_case(seed: int, shape=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """An RGB picture (uint8) with a bright disc on a noisy background, and the disc as label 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx, r = rng.integers(14, shape[0] - 14), rng.integers(14, shape[1] - 14), rng.integers(6, 11)
    label = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
    image = rng.normal(60, 20, (*shape, 3)) + label[..., None] * np.array([150, 120, 90])
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_raw(root: Path, num_cases: int, channel_names: dict, rgb: bool = True, ending: str = ".png") -> Path:
    """A natural-image dataset in nnU-Net v2's raw layout: imagesTr/<case>_0000<ending> holds every channel."""
    for i in range(num_cases):
        image, label = disc_case(i)
        write_picture(root / "imagesTr" / f"case{i:02d}_0000{ending}", image if rgb else image[..., 0].copy())
        write_picture(root / "labelsTr" / f"case{i:02d}{ending}", label)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channel_names, "labels": {"background": 0, "disc": 1}, "numTraining": num_cases,
        "file_ending": ending}))
    return root


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_grey_picture_round_trip_keeps_size_values_and_format(tmp_path, suffix):
    pixels = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    src = write_picture(tmp_path / f"in{suffix}", pixels)
    image, geo = read_image([src])
    assert image.shape == (1, 1, 48, 64) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0, 0], pixels)
    assert geo.kind == "natural" and geo.shape == (1, 48, 64) and geo.spacing == NATURAL_SPACING == (999.0, 1.0, 1.0)
    label, lgeo = read_label(src)
    assert label.shape == (1, 48, 64) and label.dtype == np.int16 and lgeo.shape == geo.shape
    out = tmp_path / f"out{suffix}"
    write_label(label, geo, out)
    written, img = read_picture(out)
    assert img.GetDimension() == 2 and img.GetSize() == (64, 48)
    # ITK reads an 8-bit BMP as RGB; medseg reads its own grey BMP back as one channel
    assert written.dtype == np.uint8 and (written.ndim == 2 or suffix == ".bmp")
    back, back_geo = read_label(out)
    np.testing.assert_array_equal(back, label)
    assert back_geo.shape == geo.shape and np.array_equal(back_geo.affine, geo.affine)


def test_rgb_picture_is_three_channels_and_its_label_map_is_written_as_a_grey_png(tmp_path):
    pixels, truth = disc_case(0)
    image, geo = read_image([write_picture(tmp_path / "rgb.png", pixels)])
    assert image.shape == (3, 1, 48, 64)
    for c in range(3):
        np.testing.assert_array_equal(image[c, 0], pixels[..., c])
    assert geo.shape == (1, 48, 64)
    write_label(truth[None].astype(np.int16), geo, tmp_path / "pred.png")
    written, img = read_picture(tmp_path / "pred.png")
    assert img.GetDimension() == 2 and img.GetNumberOfComponentsPerPixel() == 1 and written.dtype == np.uint8
    np.testing.assert_array_equal(written, truth)


def test_labels_above_255_are_written_16_bit_and_refused_where_the_format_cannot_hold_them(tmp_path):
    _, geo = read_image([write_picture(tmp_path / "g.png", np.zeros((4, 5), np.uint8) + 3)])
    label = np.zeros((1, 4, 5), np.int16)
    label[0, 1, 2] = 300
    write_label(label, geo, tmp_path / "wide.png")
    written, _ = read_picture(tmp_path / "wide.png")
    assert written.dtype == np.uint16 and written[1, 2] == 300
    with pytest.raises(WriteError, match=r"wide.bmp: label values 0..300 do not fit a .bmp file \(0..255\)"):
        write_label(label, geo, tmp_path / "wide.bmp")
    assert not (tmp_path / "wide.bmp").exists()
    volume = natural_geometry(4, 5)
    volume.shape = (2, 4, 5)  # a volume's grid: no picture holds it
    with pytest.raises(WriteError, match=r"deep.png: a 2x4x5 label map is not one 2D slice, which is all a .png file"):
        write_label(np.zeros((2, 4, 5), np.int16), volume, tmp_path / "deep.png")


def test_rgba_picture_is_one_clear_error(tmp_path):
    src = write_picture(tmp_path / "case_0000.png", np.full((6, 7, 4), 9, np.uint8))
    with pytest.raises(VolumeError) as err:
        read_image([src])
    assert str(err.value) == (f"{src}: 4 colour channels (RGBA); a 2D image must be greyscale or RGB (3 channels): "
                              "save it without the alpha channel")


def test_rgb_label_picture_is_one_clear_error(tmp_path):
    src = write_picture(tmp_path / "case.png", np.zeros((6, 7, 3), np.uint8))
    with pytest.raises(VolumeError) as err:
        read_label(src)
    assert str(err.value) == (f"{src}: a label image must have one channel holding the label values, this one has "
                              "3 (RGB, or a colour palette): save it as a greyscale image")


def test_multi_page_tiff_is_refused_as_a_volume(tmp_path):
    src = tmp_path / "stack.tif"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 5, 7), np.uint8)), str(src))
    with pytest.raises(VolumeError, match=r"stack.tif: a 7x5x3 3D image; .png/.bmp/.tif files are read as single "
                                          "2D images"):
        read_image([src])


def test_nnunet_raw_rgb_convention_one_file_holds_the_three_channels(tmp_path):
    root = make_raw(tmp_path / "Dataset120_Discs", 3, {"0": "R", "1": "G", "2": "B"})
    m = build_manifest("nnunet_raw", root=str(root))
    assert m.channel_names == ["R", "G", "B"] and m.labels == {0: "background", 1: "disc"}
    assert [Path(p).name for p in m.case("case01").images] == ["case01_0000.png"]
    fp = compute_fingerprint(m, num_processes=1, progress=False)
    assert [c.spacing for c in fp.cases] == [[999.0, 1.0, 1.0]] * 3
    assert [c.shape_before_crop for c in fp.cases] == [[1, 48, 64]] * 3
    assert [c.orientation for c in fp.cases] == [""] * 3  # a picture has no world orientation to compare


def test_nnunet_raw_missing_channel_file_is_still_named(tmp_path):
    """Only where _0000 is the one file does it hold every channel; a partial set of channel files is an error."""
    root = make_raw(tmp_path / "Dataset121_Split", 2, {"0": "R", "1": "G", "2": "B"}, rgb=False)
    for i in range(2):
        write_picture(root / "imagesTr" / f"case{i:02d}_0001.png", disc_case(i)[0][..., 1].copy())
    m = build_manifest("nnunet_raw", root=str(root))
    assert [Path(p).name for p in m.case("case00").images] == ["case00_0000.png", "case00_0001.png",
                                                               "case00_0002.png"]
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(m, num_processes=1, progress=False)
    folder = root.resolve() / "imagesTr"
    assert err.value.problems == [f"case case{i:02d}: cannot read image: {folder}/case{i:02d}_0002.png: file not found"
                                  for i in range(2)]


def test_nnunet_raw_nifti_channels_are_one_file_each_as_before(tmp_path):
    root = tmp_path / "Dataset122_Nifti"
    write_nifti(root / "imagesTr" / "c0_0000.nii.gz", np.random.rand(4, 5, 6).astype(np.float32))
    write_nifti(root / "labelsTr" / "c0.nii.gz", np.zeros((4, 5, 6), np.uint8))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "a": 1}}))
    m = build_manifest("nnunet_raw", root=str(root))
    assert [Path(p).name for p in m.case("c0").images] == ["c0_0000.nii.gz", "c0_0001.nii.gz"]


def test_channel_names_disagreeing_with_the_picture_is_one_problem_per_file(tmp_path):
    root = make_raw(tmp_path / "Dataset123_Grey", 3, {"0": "grey"})
    with pytest.raises(DatasetError) as err:
        compute_fingerprint(build_manifest("nnunet_raw", root=str(root)), num_processes=1, progress=False)
    assert err.value.problems == [
        f"{root.resolve()}/imagesTr/case{i:02d}_0000.png: 3 channel(s), the dataset declares 1 (a greyscale image is "
        "one channel; an RGB image is three, e.g. channel_names R, G, B, in one <case>_0000 file)" for i in range(3)]


@pytest.mark.parametrize("names, schemes", [({"0": "R", "1": "G", "2": "B"}, ["zscore"] * 3),
                                            ({"0": "rgb_to_0_1", "1": "RGB_to_0_1", "2": "rgb_to_0_1"},
                                             ["rgb_0_1"] * 3)])
def test_natural_dataset_plans_2d_only_with_nnunets_normalisation_by_channel_name(tmp_path, names, schemes):
    plan = plan_of(make_raw(tmp_path / "Dataset124_Plan", 5, names), tmp_path).plan
    assert list(plan.configurations) == ["2d"] and plan.transpose == [0, 1, 2]
    config = plan.configuration("2d")
    assert config.spatial_dims == 2 and config.spacing == [1.0, 1.0] and config.median_shape == [48.0, 64.0]
    assert config.normalization == schemes
    assert "3d_fullres: not planned, the median image has a single slice" in plan.explanations
    with pytest.raises(ConfigError, match=r"configuration '3d_fullres' is not in the plan of Dataset124_Plan "
                                          r"\(planned: \['2d'\]\)"):
        plan.configuration("3d_fullres")


def test_single_slice_nifti_still_plans_2d_only(tmp_path):
    root = tmp_path / "Dataset125_Slices"
    rng = np.random.default_rng(0)
    for i in range(5):
        label = np.zeros((40, 32, 1), np.uint8)  # nibabel (x, y, z): one slice
        label[10:20, 8:16] = 1
        write_nifti(root / "imagesTr" / f"c{i}_0000.nii.gz", (rng.random((40, 32, 1)) + label).astype(np.float32),
                    np.diag([0.5, 0.5, 3.0, 1.0]))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, np.diag([0.5, 0.5, 3.0, 1.0]))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "a": 1}}))
    prepared = plan_of(root, tmp_path)
    assert [c.spacing for c in prepared.fingerprint.cases] == [[3.0, 0.5, 0.5]] * 5
    plan = prepared.plan
    assert list(plan.configurations) == ["2d"] and plan.configuration("2d").spacing == [0.5, 0.5]


def test_prediction_lists_pictures_groups_the_one_file_case_and_writes_its_format(tmp_path):
    folder = tmp_path / "in"
    for name in ("b_0000.png", "a_0000.tif", "c.bmp"):
        write_picture(folder / name, np.zeros((4, 5, 3), np.uint8))
    (folder / "notes.txt").write_text("not an image")
    files = list_images(folder)
    assert [f.name for f in files] == ["a_0000.tif", "b_0000.png", "c.bmp"]
    cases = group_cases(files, num_channels=3)
    assert {k: [p.name for p in v] for k, v in cases.items()} == {"a": ["a_0000.tif"], "b": ["b_0000.png"],
                                                                  "c": ["c.bmp"]}
    assert output_path("b", cases["b"], tmp_path / "out") == tmp_path / "out" / "b.png"
    assert output_path("a", cases["a"], tmp_path / "out") == tmp_path / "out" / "a.tif"
