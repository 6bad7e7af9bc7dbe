import json
import shutil

import numpy as np
import pytest

from medseg.datasets.adapters import build_manifest
from medseg.datasets.manifest import Manifest, assign_folds, kfold_assignment
from medseg.errors import DatasetError


def test_msd_adapter_reads_hippocampus(hippocampus):
    m = build_manifest("msd", root=str(hippocampus))
    assert len(m.cases) == 220
    assert m.channel_names == ["MRI"]
    assert m.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    first = m.case("hippocampus_001")
    assert first.images[0].endswith("imagesTr/hippocampus_001.nii.gz")
    assert first.label.endswith("labelsTr/hippocampus_001.nii.gz")


def test_folds_are_balanced_seeded_and_kept(hippocampus, tmp_path):
    m = assign_folds(build_manifest("msd", root=str(hippocampus)), seed=12345)
    sizes = np.bincount([c.fold for c in m.cases])
    assert sizes.tolist() == [44, 44, 44, 44, 44]
    again = assign_folds(build_manifest("msd", root=str(hippocampus)), seed=12345)
    assert [c.fold for c in again.cases] == [c.fold for c in m.cases]
    # a different seed moves cases, but a saved assignment always wins over the seed
    other = assign_folds(build_manifest("msd", root=str(hippocampus)), seed=1)
    assert [c.fold for c in other.cases] != [c.fold for c in m.cases]
    m.save(tmp_path / "manifest.json")
    kept = assign_folds(build_manifest("msd", root=str(hippocampus)), seed=1,
                        previous=Manifest.load(tmp_path / "manifest.json"))
    assert [c.fold for c in kept.cases] == [c.fold for c in m.cases]


def test_kfold_matches_sklearn_semantics():
    # KFold(5, shuffle=True, random_state=0) on 7 items: RandomState(0) permutation cut into 2,2,1,1,1
    folds = kfold_assignment([f"c{i}" for i in range(7)], 5, 0)
    order = np.arange(7)
    np.random.RandomState(0).shuffle(order)
    expected = {}
    for fold, chunk in enumerate([order[0:2], order[2:4], order[4:5], order[5:6], order[6:7]]):
        for i in chunk:
            expected[f"c{i}"] = fold
    assert folds == expected


def test_nnunet_raw_layout(synthetic_root, tmp_path):
    raw = tmp_path / "Dataset001_Synth"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for img in sorted((synthetic_root / "imagesTr").glob("*.nii.gz")):
        case = img.name[: -len(".nii.gz")]
        shutil.copy(img, raw / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(synthetic_root / "labelsTr" / img.name, raw / "labelsTr" / img.name)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "outer": 1, "inner": 2}}))
    m = build_manifest("nnunet_raw", root=str(raw))
    assert len(m.cases) == 10 and m.channel_names == ["T1"]
    assert m.labels == {0: "background", 1: "outer", 2: "inner"}
    assert m.case("synthetic_000").images[0].endswith("imagesTr/synthetic_000_0000.nii.gz")


def test_manifest_adapter_relative_paths_and_root_escape(hippocampus, tmp_path):
    manifest = {"name": "hippo_subset", "channel_names": ["MRI"],
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "cases": [{"case_id": "hippocampus_001", "images": ["imagesTr/hippocampus_001.nii.gz"],
                           "label": "labelsTr/hippocampus_001.nii.gz", "fold": 0}]}
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(manifest))
    m = build_manifest("manifest", path=str(path), root=str(hippocampus))
    assert m.cases[0].images[0] == str((hippocampus / "imagesTr/hippocampus_001.nii.gz").resolve())
    assert m.cases[0].fold == 0
    manifest["cases"][0]["label"] = "../../../etc/passwd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="points outside the dataset root"):
        build_manifest("manifest", path=str(path), root=str(hippocampus))


def test_committed_hippocampus_manifest_matches_the_data(hippocampus):
    from tests.conftest import REPO

    m = build_manifest("manifest", path=str(REPO / "data_manifests" / "Task04_Hippocampus.json"),
                       root=str(hippocampus))
    msd = assign_folds(build_manifest("msd", root=str(hippocampus)), seed=12345)
    assert {c.case_id: c.fold for c in m.cases} == {c.case_id: c.fold for c in msd.cases}
    assert all(c.images[0] == msd.case(c.case_id).images[0] for c in m.cases)
