"""Plans on the real Hippocampus data equal nnU-Net v2.8.1's (DESIGN.md section 3 golden values)."""

import pytest

from medseg.datasets.adapters import build_manifest
from medseg.errors import ConfigError
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset, topology


@pytest.fixture(scope="module")
def hippo_fingerprint(hippocampus):
    manifest = build_manifest("msd", root=str(hippocampus))
    return manifest, compute_fingerprint(manifest, num_processes=2, progress=False)


def test_fingerprint_of_hippocampus(hippo_fingerprint):
    _, fp = hippo_fingerprint
    assert len(fp.cases) == 220
    assert all(c.spacing == [1.0, 1.0, 1.0] for c in fp.cases)
    # mixed dtypes and intensity scales are real in this data: foreground stats span them
    assert fp.intensity[0].max > 1e5 and fp.intensity[0].min >= 0
    assert fp.intensity[0].percentile_00_5 < fp.intensity[0].median < fp.intensity[0].percentile_99_5


def test_hippocampus_3d_fullres_matches_nnunet(hippo_fingerprint):
    manifest, fp = hippo_fingerprint
    plan = plan_dataset(fp, manifest.channel_names, manifest.label_scheme, PlannerSettings())
    c = plan.configuration("3d_fullres")
    assert c.spacing == [1.0, 1.0, 1.0]
    assert c.median_shape == [36, 50, 35]  # (z, y, x), as nnU-Net reports it
    assert plan.transpose == [0, 1, 2]
    assert c.patch_size == [40, 56, 40]
    assert c.batch_size == 8
    assert c.features == [32, 64, 128, 256]
    assert c.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert c.kernel_sizes == [[3, 3, 3]] * 4
    assert c.normalization == ["zscore"] and c.use_mask_for_norm == [False]
    assert plan.overridden == []
    c2 = plan.configuration("2d")
    assert (c2.patch_size, c2.batch_size, c2.features) == ([56, 40], 309, [32, 64, 128, 256])
    assert c2.spacing == [1.0, 1.0]
    assert "3d_lowres" not in plan.configurations


def test_overrides_are_used_and_recorded(hippo_fingerprint):
    manifest, fp = hippo_fingerprint
    settings = PlannerSettings(patch_size=[32, 48, 32], batch_size=3, base_features=8)
    plan = plan_dataset(fp, manifest.channel_names, manifest.label_scheme, settings)
    c = plan.configuration("3d_fullres")
    assert c.patch_size == [32, 48, 32] and c.batch_size == 3 and c.features == [8, 16, 32, 64]
    assert plan.overridden == ["base_features", "patch_size", "batch_size"]
    with pytest.raises(ConfigError, match="not divisible"):
        plan_dataset(fp, manifest.channel_names, manifest.label_scheme, PlannerSettings(patch_size=[36, 48, 32]))


def test_topology_of_anisotropic_spacing():
    # 3 mm slices along axis 2: that axis is not pooled or convolved (kernel 1) until in-plane catches up
    topo = topology([0.7, 0.7, 3.0], [20, 256, 256][::-1])
    assert topo.strides[1] == [2, 2, 1]
    assert topo.kernel_sizes[0] == [3, 3, 1]
    assert topo.kernel_sizes[-1] == [3, 3, 3]
    for axis in range(3):
        total = 1
        for s in topo.strides:
            total *= s[axis]
        assert topo.patch_size[axis] % total == 0


def test_fingerprint_matches_nnunet_on_hippocampus(hippo_fingerprint):
    """Spacings and cropped shapes exactly; foreground statistics within sampling error (nnU-Net draws a
    random sample with replacement, medseg uses every foreground voxel when there are fewer than its budget)."""
    import json
    from pathlib import Path

    ref = json.loads((Path(__file__).parent / "fixtures" / "nnunet_hippocampus.json").read_text())
    _, fp = hippo_fingerprint
    ours = {c.case_id: c for c in fp.cases}
    for case_id, spacing, shape in zip(ref["cases"], ref["fingerprint"]["spacings"],
                                       ref["fingerprint"]["shapes_after_crop"]):
        assert ours[case_id].spacing == pytest.approx(spacing)
        assert ours[case_id].shape_after_crop == shape
    theirs = ref["fingerprint"]["foreground_intensity_properties_per_channel"]["0"]
    mine = vars(fp.intensity[0])
    for key in ("mean", "median", "std", "percentile_00_5", "percentile_99_5"):
        assert mine[key] == pytest.approx(theirs[key], rel=2e-3), key
    assert mine["min"] == theirs["min"] and mine["max"] == theirs["max"]
