from pathlib import Path

import pytest

from medseg.errors import MedsegError
from medseg.inference.predictor import check_output_dir, group_cases, output_path


def test_channel_files_are_grouped_per_case():
    files = [Path(p) for p in ["a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"]]
    cases = group_cases(files, num_channels=2)
    assert cases == {"a": [Path("a_0000.nii.gz"), Path("a_0001.nii.gz")],
                     "b": [Path("b_0000.nii.gz"), Path("b_0001.nii.gz")]}
    assert group_cases([Path("scan.nrrd")], 1) == {"scan": [Path("scan.nrrd")]}
    assert output_path("scan", [Path("scan.nrrd")], Path("out")) == Path("out/scan.nrrd")
    with pytest.raises(MedsegError, match="case a: 3 channel files, the model expects 2"):
        group_cases(files + [Path("a_0002.nii.gz")], num_channels=2)


def test_output_inside_the_input_folder_is_refused(tmp_path):
    with pytest.raises(MedsegError, match="inside the input folder"):
        check_output_dir(tmp_path, tmp_path / "preds")
    with pytest.raises(MedsegError):
        check_output_dir(tmp_path, tmp_path)
    check_output_dir(tmp_path / "in", tmp_path / "out")
