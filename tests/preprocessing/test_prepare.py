"""prepare(): validation before anything is written; cached steps; folds fixed once."""

import json

import numpy as np
import pytest

from medseg.datasets.synthetic import make_case
from medseg.errors import DatasetError
from medseg.preprocessing.prepare import prepare
from tests.conftest import compose, make_msd


def _cases(n):
    return {f"c{i}": make_case(np.random.default_rng(i), (20, 24, 16), (1.0, 1.0, 1.0)) for i in range(n)}


def test_bad_dataset_leaves_nothing_a_later_run_would_trust(tmp_path):
    cases = _cases(6)
    image, label = cases["c3"]
    cases["c3"] = (np.stack([image, image], -1), label)  # a case with a different channel count
    root = make_msd(tmp_path / "bad", cases)
    cfg = compose("plan", ["data=msd", f"data.root={root}", f"paths.preprocessed={tmp_path / 'pp'}"])
    with pytest.raises(DatasetError, match="imagesTr/c3.nii.gz: 2 channel"):
        prepare(cfg, ["3d_fullres"], progress=False)
    assert not (tmp_path / "pp").exists() or not any((tmp_path / "pp").rglob("*.json"))


def test_prepare_is_cached_and_folds_stay_fixed(tmp_path):
    root = make_msd(tmp_path / "good", _cases(6))
    overrides = ["data=msd", f"data.root={root}", f"paths.preprocessed={tmp_path / 'pp'}", "num_processes=1"]
    first = prepare(compose("plan", overrides), ["3d_fullres"], progress=False)
    folder = tmp_path / "pp" / "good"
    assert {p.name for p in folder.iterdir()} >= {"manifest.json", "fingerprint.json", "plans.json", "3d_fullres"}
    stamp = (folder / "fingerprint.json").stat().st_mtime_ns
    folds = {c.case_id: c.fold for c in first.manifest.cases}
    # a different seed later does not move the saved folds, and nothing is recomputed
    again = prepare(compose("plan", overrides + ["data.fold_seed=7"]), ["3d_fullres"], progress=False)
    assert {c.case_id: c.fold for c in again.manifest.cases} == folds
    assert (folder / "fingerprint.json").stat().st_mtime_ns == stamp
    saved = json.loads((folder / "plans.json").read_text())
    assert saved["configurations"]["3d_fullres"]["patch_size"] == first.plan.configuration("3d_fullres").patch_size
    # a planner override is applied and recorded
    forced = prepare(compose("plan", overrides + ["planner.batch_size=3"]), [], progress=False)
    assert forced.plan.configuration("3d_fullres").batch_size == 3 and forced.plan.overridden == ["batch_size"]
