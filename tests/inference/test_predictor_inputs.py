from pathlib import Path

import pytest

from medseg.errors import MedsegError
from medseg.inference.batch import collect_inputs, read_image_list
from medseg.inference.predictor import (check_output_dir, check_output_outside_inputs, group_cases, output_path,
                                        resolve_mirror_axes)


def test_channel_files_are_grouped_per_case():
    files = [Path(p) for p in ["a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"]]
    cases = group_cases(files, num_channels=2)
    assert cases == {"a": [Path("a_0000.nii.gz"), Path("a_0001.nii.gz")],
                     "b": [Path("b_0000.nii.gz"), Path("b_0001.nii.gz")]}
    assert group_cases([Path("scan.nrrd")], 1) == {"scan": [Path("scan.nrrd")]}
    assert output_path("scan", [Path("scan.nrrd")], Path("out")) == Path("out/scan.nrrd")
    with pytest.raises(MedsegError, match="case a: 3 channel files, the model expects 2"):
        group_cases(files + [Path("a_0002.nii.gz")], num_channels=2)


def test_inputs_that_would_write_the_same_output_are_refused():
    # a list may name equal file names from different folders: each would overwrite the other's result
    with pytest.raises(MedsegError, match="case ct: several inputs would write the same output"):
        group_cases([Path("p1/ct.nii.gz"), Path("p2/ct.nii.gz")], num_channels=1)
    with pytest.raises(MedsegError, match="several inputs"):
        group_cases([Path("p1/x_0000.nii.gz"), Path("p2/x_0000.nii.gz")], num_channels=2)


def test_output_inside_the_input_folder_is_refused(tmp_path):
    with pytest.raises(MedsegError, match="inside the input folder"):
        check_output_dir(tmp_path, tmp_path / "preds")
    with pytest.raises(MedsegError):
        check_output_dir(tmp_path, tmp_path)
    check_output_dir(tmp_path / "in", tmp_path / "out")


def test_list_file_comments_blank_lines_and_relative_paths(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "cases.txt"
    listing.write_text(f"# test set\n\n../scans/a_0000.nii.gz  # first\n{tmp_path}/other/b.mha\n   \n"
                       "../scans/a_0000.nii.gz\n")
    assert read_image_list(listing) == [tmp_path / "lists" / "../scans/a_0000.nii.gz", tmp_path / "other/b.mha"]
    listing.write_text("# nothing\n\n")
    with pytest.raises(MedsegError, match="names no images"):
        read_image_list(listing)
    with pytest.raises(MedsegError, match="input folder or list file not found"):
        collect_inputs(tmp_path / "nope.txt", tmp_path / "out")


def test_output_must_stay_clear_of_listed_inputs(tmp_path):
    listed = [tmp_path / "scans" / "a.nii.gz", tmp_path / "elsewhere" / "deep" / "b.nrrd"]
    for bad in [tmp_path / "scans", tmp_path / "scans" / "preds", tmp_path / "elsewhere" / "deep" / "x",
                tmp_path]:  # the last holds the listed files
        with pytest.raises(MedsegError, match="listed input"):
            check_output_outside_inputs(listed, bad)
    check_output_outside_inputs(listed, tmp_path / "preds")
    check_output_outside_inputs(listed, tmp_path / "elsewhere" / "preds")  # beside a listed file's folder


def test_mirror_axes_all_follows_the_configuration():
    assert resolve_mirror_axes("all", 3) == (0, 1, 2)
    assert resolve_mirror_axes("all", 2) == (0, 1)  # a 2d model mirrors its own 2 axes
    assert resolve_mirror_axes(None, 3) is None and resolve_mirror_axes([], 3) is None
    assert resolve_mirror_axes([2, 1], 3) == (2, 1)
    assert resolve_mirror_axes([0, 2], 2) == (0,)  # an axis a 2d model lacks is left out
    with pytest.raises(MedsegError, match="mirror_axes"):
        resolve_mirror_axes([3], 3)
    with pytest.raises(MedsegError, match="mirror_axes"):
        resolve_mirror_axes("some", 3)


def test_predict_config_defaults():
    from tests.conftest import compose

    cfg = compose("predict", ["ckpt_dir=run", "input=scans", "output=preds"])
    assert cfg.checkpoint == "last" and cfg.mirror_axes == "all" and cfg.save_probabilities is False
    assert cfg.sw_batch_size == "auto" and cfg.background_io is True and cfg.overlap == 0.5
    assert list(compose("predict", ["mirror_axes=[1,2]", "ckpt_dir=r", "input=i", "output=o"]).mirror_axes) == [1, 2]
