import os

import numpy as np
import pytest
import torch

from medseg.datasets.adapters import build_manifest
from medseg.datasets.io import read_image
from medseg.planning.fingerprint import compute_fingerprint
from medseg.planning.planner import PlannerSettings, plan_dataset
from medseg.preprocessing.cache import preprocess_dataset
from medseg.preprocessing.pipeline import logits_to_original, preprocess_image


def _plan(root, **settings):
    manifest = build_manifest("msd", root=str(root))
    fp = compute_fingerprint(manifest, num_processes=1, progress=False)
    return manifest, plan_dataset(fp, manifest.channel_names, manifest.label_scheme, PlannerSettings(**settings))


def test_rerun_is_a_noop_and_a_changed_plan_redoes_the_cases(synthetic_root, tmp_path):
    manifest, plan = _plan(synthetic_root)
    config = plan.configuration("3d_fullres")
    cache = preprocess_dataset(manifest, plan, config, tmp_path / "cache", num_processes=1, progress=False)
    files = sorted((tmp_path / "cache").glob("*.json"))
    assert len(files) == len(manifest.cases)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    preprocess_dataset(manifest, plan, config, tmp_path / "cache", num_processes=1, progress=False)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    data, label, locations = cache.load_arrays("synthetic_000")
    assert data.dtype == np.float32 and label.dtype == np.int8
    assert set(np.unique(label)) <= {0, 1, 2} and len(locations[1]) > 0
    # 1.5 mm along the file's last axis (array axis 0); forcing 1.2 mm makes that axis grow
    _, plan2 = _plan(synthetic_root, target_spacing=[1.2, 1.0, 1.0])
    config2 = plan2.configuration("3d_fullres")
    preprocess_dataset(manifest, plan2, config2, tmp_path / "cache", num_processes=2, progress=False)
    assert all(f.stat().st_mtime_ns != stamps[f] for f in files)
    data2, _, _ = cache.load_arrays("synthetic_000")
    assert data2.shape[1] > data.shape[1] and data2.shape[2:] == data.shape[2:]


def test_interrupted_case_is_not_trusted(synthetic_root, tmp_path):
    manifest, plan = _plan(synthetic_root)
    config = plan.configuration("3d_fullres")
    cache = preprocess_dataset(manifest, plan, config, tmp_path / "cache", num_processes=1, progress=False)
    props = cache.paths("synthetic_001")["properties"]
    props.unlink()  # as if killed after the arrays were written but before the properties
    stamp = cache.paths("synthetic_002")["image"].stat().st_mtime_ns
    preprocess_dataset(manifest, plan, config, tmp_path / "cache", num_processes=1, progress=False)
    assert props.is_file()
    assert cache.paths("synthetic_002")["image"].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("target", [[1.3, 0.8, 1.0], [1.0, 1.6, 0.8]], ids=["identity-order", "transposed"])
def test_preprocess_then_back_restores_the_input_grid(synthetic_root, target):
    manifest, plan = _plan(synthetic_root, target_spacing=target)
    assert (plan.transpose != [0, 1, 2]) == (target[1] == 1.6)
    config = plan.configuration("3d_fullres")
    image, geo = read_image(manifest.cases[0].images)
    from medseg.datasets.io import read_label

    label, _ = read_label(manifest.cases[0].label)
    data, seg, props = preprocess_image(image, geo.spacing, plan, config, "c", label)
    assert list(data.shape[1:]) == props.shape_after_resample != props.shape_after_crop
    one_hot = torch.from_numpy(np.eye(3, dtype=np.float32)[seg.astype(int)]).permute(3, 0, 1, 2) * 10
    back = logits_to_original(one_hot, props, plan).argmax(0).numpy()
    assert back.shape == label.shape
    dice = 2 * ((back > 0) & (label > 0)).sum() / ((back > 0).sum() + (label > 0).sum())
    assert dice > 0.95


def test_an_edited_input_redoes_only_its_case(synthetic_root, tmp_path):
    manifest, plan = _plan(synthetic_root)
    config = plan.configuration("3d_fullres")
    cache = preprocess_dataset(manifest, plan, config, tmp_path / "cache", num_processes=1, progress=False)
    stamps = {c.case_id: cache.paths(c.case_id)["properties"].stat().st_mtime_ns for c in manifest.cases}
    edited = manifest.cases[3]
    st = os.stat(edited.label)
    os.utime(edited.label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        preprocess_dataset(manifest, plan, config, tmp_path / "cache", num_processes=1, progress=False)
    finally:
        os.utime(edited.label, ns=(st.st_atime_ns, st.st_mtime_ns))  # the dataset is shared by other tests
    after = {c.case_id: cache.paths(c.case_id)["properties"].stat().st_mtime_ns for c in manifest.cases}
    assert [c for c in stamps if after[c] != stamps[c]] == [edited.case_id]
