"""End to end on data: the generated reference datasets, read and fingerprinted by medseg itself, give nnU-Net's
fingerprint and plans (the anisotropic MRI, the CT set with zero-padded borders, and the sagittal MRI whose thick
axis is first in the file, so that the axis order is transposed)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from medseg.datasets.adapters import build_manifest
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset
from tests.conftest import REPO
from tests.planning.test_nnunet_parity import assert_plan_matches

FIXTURES = Path(__file__).parent / "fixtures"


def _make_datasets():
    spec = importlib.util.spec_from_file_location("make_datasets", REPO / "scripts/nnunet_reference/make_datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["aniso_mri", "ct", "mri_mask"])
def test_medseg_fingerprint_and_plan_equal_nnunet(kind, tmp_path):
    make = _make_datasets()
    make.generate(kind, str(tmp_path))
    root = tmp_path / make.DATASETS[kind]["dataset_name"]
    manifest = build_manifest("nnunet_raw", root=str(root))
    fp = compute_fingerprint(manifest, num_processes=2, progress=False)
    fixture = json.loads((FIXTURES / f"nnunet_{kind}.json").read_text())
    ref = fixture["fingerprint"]
    ours = {c.case_id: c for c in fp.cases}
    for case_id, spacing, shape in zip(fixture["cases"], ref["spacings"], ref["shapes_after_crop"]):
        np.testing.assert_allclose(ours[case_id].spacing, spacing, rtol=1e-6)
        assert ours[case_id].shape_after_crop == shape
    assert np.median([c.relative_size_after_crop for c in fp.cases]) == pytest.approx(
        ref["median_relative_size_after_cropping"], rel=1e-6)
    theirs = ref["foreground_intensity_properties_per_channel"]["0"]
    for key in ("mean", "std", "median", "percentile_00_5", "percentile_99_5"):
        assert getattr(fp.intensity[0], key) == pytest.approx(theirs[key], rel=0.01, abs=1.0), key
    plan = plan_dataset(fp, manifest.channel_names, manifest.label_scheme, PlannerSettings())
    assert_plan_matches(plan, fixture["plans"])
