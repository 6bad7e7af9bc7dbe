"""medseg's plans equal nnU-Net v2.8.1's on the reference fixtures (made by scripts/nnunet_reference/ with the
real nnunetv2: anisotropic MRI, CT, a large dataset with a low-resolution stage, MRI normalised inside the
nonzero mask, and the real Hippocampus data), for the default, ResEnc M and ResEnc L planners."""

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.planning.fingerprint import CaseFingerprint, ChannelIntensity, DatasetFingerprint
from medseg.datasets.labels import scheme_from_nnunet
from medseg.planning.planner import PlannerSettings, feature_map_elements, plan_dataset, topology

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("nnunet_*.json"))
PRESET = {"ExperimentPlanner": "default", "nnUNetPlannerResEncM": "resenc_m", "nnUNetPlannerResEncL": "resenc_l"}
SCHEME = {"ZScoreNormalization": "zscore", "CTNormalization": "ct"}


def fingerprint_from_nnunet(fixture: dict) -> DatasetFingerprint:
    fp = fixture["fingerprint"]
    rel = fp["median_relative_size_after_cropping"]
    cases = [CaseFingerprint(cid, sp, sh, sh, rel) for cid, sp, sh in
             zip(fixture["cases"], fp["spacings"], fp["shapes_after_crop"])]
    intensity = [ChannelIntensity(**{k: v for k, v in props.items()})
                 for _, props in sorted(fp["foreground_intensity_properties_per_channel"].items())]
    return DatasetFingerprint(fixture["dataset"], "", cases, intensity)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_plan_equals_nnunet(path):
    fixture = json.loads(path.read_text())
    ds = fixture["dataset_json"]
    channels = [ds["channel_names"][k] for k in sorted(ds["channel_names"], key=int)]
    labels = scheme_from_nnunet(ds["labels"], ds.get("regions_class_order"), str(path))
    plan = plan_dataset(fingerprint_from_nnunet(fixture), channels, labels,
                        PlannerSettings(preset=PRESET[fixture["planner"]["class"]]))
    assert_plan_matches(plan, fixture["plans"])


def assert_plan_matches(plan, expected: dict) -> None:
    assert plan.transpose == expected["transpose_forward"]
    assert plan.transpose_backward == expected["transpose_backward"]
    assert set(plan.configurations) == set(expected["configurations"])
    for name, ref in expected["configurations"].items():
        if "inherits_from" in ref:  # the cascade's fullres stage
            assert plan.configuration(name).previous_stage == ref["previous_stage"]
            continue
        got = plan.configuration(name)
        arch = ref["architecture"]["arch_kwargs"]
        np.testing.assert_allclose(got.spacing, ref["spacing"], rtol=1e-9, err_msg=name)
        np.testing.assert_allclose(got.median_shape, ref["median_image_size_in_voxels"], err_msg=name)
        assert got.patch_size == ref["patch_size"], name
        assert got.batch_size == ref["batch_size"], name
        assert got.strides == arch["strides"], name
        assert got.kernel_sizes == arch["kernel_sizes"], name
        assert got.features == arch["features_per_stage"], name
        assert got.encoder_blocks == list(arch.get("n_blocks_per_stage", arch.get("n_conv_per_stage"))), name
        assert got.decoder_convs == list(arch["n_conv_per_stage_decoder"]), name
        assert got.batch_dice == ref["batch_dice"], name
        assert got.normalization == [SCHEME[s] for s in ref["normalization_schemes"]], name
        assert got.use_mask_for_norm == ref["use_mask_for_norm"], name
        assert got.next_stage == ref.get("next_stage"), name


def test_the_fixtures_cover_every_rule():
    planned = {p.stem: json.loads(p.read_text())["plans"] for p in FIXTURES}
    assert any("3d_lowres" in p["configurations"] for p in planned.values())
    assert any(p["transpose_forward"] != [0, 1, 2] for p in planned.values())
    assert any(any(c.get("use_mask_for_norm") == [True] for c in p["configurations"].values())
               for p in planned.values())
    assert any("CTNormalization" in c.get("normalization_schemes", []) for p in planned.values()
               for c in p["configurations"].values())


def test_feature_map_count_matches_nnunet_reference_networks():
    # nnU-Net's comments and measurements: plain 3D 6-stage U-Net at 128^3, 3 classes; Hippocampus 3d and 2d
    topo = topology([1.0] * 3, [128] * 3)
    assert feature_map_elements([128] * 3, topo, [32, 64, 128, 256, 320, 320], "plain", 3) == 452_796_416
    assert feature_map_elements([128] * 3, topo, [32, 64, 128, 256, 320, 320], "resenc", 3) == 557_420_544
    hippo = topology([1.0] * 3, [40, 56, 40])
    assert feature_map_elements([40, 56, 40], hippo, [32, 64, 128, 256], "plain", 3) == 19_174_400
    hippo2d = topology([1.0] * 2, [56, 40])
    assert feature_map_elements([56, 40], hippo2d, [32, 64, 128, 256], "plain", 3) == 651_840
