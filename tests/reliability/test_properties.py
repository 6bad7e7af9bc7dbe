"""Property-based checks (hypothesis): the geometry round trip of prediction over random grids (spacings,
axis permutations and flips, small oblique rotations, shapes, origins, NIfTI and MHA, plans with any axis
order), and the adapters' path and fold handling over random inputs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medseg.datasets.adapters import build_manifest
from medseg.datasets.io import read_image, write_label
from medseg.datasets.manifest import Case, Manifest, kfold_assignment
from medseg.errors import DatasetError
from medseg.inference.predictor import Predictor, TrainedModel
from medseg.preprocessing.pipeline import preprocess_image

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SPACINGS = st.sampled_from([0.6, 0.8, 1.0, 1.25, 2.0, 3.0])


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@st.composite
def grids(draw):
    """A voxel grid: shape (i, j, k), spacing, direction (signed axis permutation, optionally tilted by up to
    15 degrees), origin, file format, and a nonzero box holding the labelled structure."""
    shape = draw(st.tuples(*[st.integers(5, 13)] * 3))
    signed = np.zeros((3, 3))
    for col, row in enumerate(draw(st.permutations([0, 1, 2]))):
        signed[row, col] = draw(st.sampled_from([-1.0, 1.0]))
    tilt = draw(st.one_of(st.just(0.0), st.floats(-15, 15)))
    direction = _rotation(draw(st.integers(0, 2)), tilt) @ signed
    box = []
    for s in shape:
        lo = draw(st.integers(0, s - 2))
        box.append((lo, draw(st.integers(lo + 1, s))))
    return {"shape": shape, "spacing": draw(st.tuples(*[SPACINGS] * 3)), "direction": direction,
            "origin": draw(st.tuples(*[st.floats(-150, 150)] * 3)),
            "format": draw(st.sampled_from([".nii.gz", ".mha"])),
            "box": box, "seed": draw(st.integers(0, 2**16)), "resample": draw(st.booleans()),
            "plan_axes": draw(st.permutations([0, 1, 2]))}


def _write(array_ijk: np.ndarray, g: dict, path: Path) -> None:
    if g["format"] == ".nii.gz":
        affine = np.eye(4)
        affine[:3, :3] = g["direction"] * np.asarray(g["spacing"])[None, :]
        affine[:3, 3] = g["origin"]
        nib.save(nib.Nifti1Image(array_ijk, affine), str(path))
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)))
        img.SetSpacing(g["spacing"])
        img.SetDirection(tuple(g["direction"].ravel()))
        img.SetOrigin(g["origin"])
        sitk.WriteImage(img, str(path))


def _same_grid(written: Path, source: Path) -> None:
    if written.name.endswith(".nii.gz"):
        a, b = nib.load(str(written)), nib.load(str(source))
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.affine, b.affine)
        assert [int(a.header[k]) for k in ("qform_code", "sform_code")] == \
            [int(b.header[k]) for k in ("qform_code", "sform_code")]
    else:
        a, b = sitk.ReadImage(str(written)), sitk.ReadImage(str(source))
        assert (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
            (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())


def _read_ijk(path: Path) -> np.ndarray:
    if path.name.endswith(".nii.gz"):
        return np.asarray(nib.load(str(path)).dataobj)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)


@SETTINGS
@given(g=grids())
# a one-voxel structure thinner than half a target voxel: resampling keeps one voxel instead of none
@example(g={"shape": (5, 5, 5), "spacing": (0.6, 0.6, 0.6), "direction": -np.eye(3), "origin": (0.0, 0.0, 0.0),
            "format": ".nii.gz", "box": [(0, 1), (0, 1), (0, 1)], "seed": 0, "resample": True,
            "plan_axes": [1, 0, 2]})
def test_prediction_maps_back_onto_the_input_grid_exactly(tiny_plan, tmp_path_factory, g):
    folder = tmp_path_factory.mktemp("grid")
    rng = np.random.default_rng(g["seed"])
    inside = tuple(slice(a, b) for a, b in g["box"])
    image = np.zeros(g["shape"], np.float32)
    image[inside] = rng.uniform(10, 100, image[inside].shape)
    label = np.zeros(g["shape"], np.uint8)
    label[inside] = rng.integers(0, 3, label[inside].shape)
    source = folder / f"case{g['format']}"
    _write(image, g, source)

    data, geo = read_image([source])
    # a plan with its own axis order; without resampling its target spacing is the case's own
    config = tiny_plan.configuration("3d_fullres")
    target = [geo.spacing[a] for a in g["plan_axes"]] if not g["resample"] else config.spacing
    config = dataclasses.replace(config, spacing=[float(s) for s in target])
    plan = dataclasses.replace(tiny_plan, transpose=list(g["plan_axes"]), configurations={"3d_fullres": config})
    predictor = Predictor([TrainedModel(torch.nn.Identity(), plan, config, "property")])
    prepared = predictor.prepare(data, geo.spacing)
    # logits that name the preprocessed reference label: what a perfect model would output
    _, seg, _ = preprocess_image(data, geo.spacing, plan, config, "case", label.transpose(2, 1, 0))
    logits = torch.from_numpy(np.eye(3, dtype=np.float16)[seg.astype(int)] * 10).permute(3, 0, 1, 2)
    result = predictor.finish([logits.contiguous()], prepared)
    assert result.label.shape == tuple(geo.shape)

    written = folder / f"pred{g['format']}"
    write_label(result.label, geo, written)
    _same_grid(written, source)
    back = _read_ijk(written)
    if g["resample"]:
        assert set(np.unique(back)) <= {0, 1, 2}
    else:  # no resampling: crop, transpose and their inverses are exact
        np.testing.assert_array_equal(back, label)


SEGMENTS = st.sampled_from(["..", ".", "imagesTr", "a", "b.nii.gz"])


@SETTINGS
@given(parts=st.lists(SEGMENTS, min_size=1, max_size=6), absolute=st.booleans())
def test_a_manifest_path_is_accepted_exactly_when_it_stays_inside_the_root(tmp_path_factory, parts, absolute):
    base = tmp_path_factory.mktemp("adapter")
    root = base / "data" / "root"
    root.mkdir(parents=True)
    rel = ("/" if absolute else "") + "/".join(parts)
    (base / "m.json").write_text(json.dumps({"name": "m", "channel_names": ["MRI"], "labels": {"0": "bg"},
                                             "cases": [{"case_id": "x", "images": [rel], "label": None}]}))
    inside = Path(os.path.normpath(root / rel)).is_relative_to(root)
    try:
        m = build_manifest("manifest", path=str(base / "m.json"), root=str(root))
    except DatasetError as e:
        assert not inside and f"path {rel!r} points outside the dataset root" in str(e)
    else:
        assert inside and Path(m.cases[0].images[0]).is_relative_to(root)
    allowed = build_manifest("manifest", path=str(base / "m.json"), root=str(root), allow_outside_root=True)
    assert allowed.cases[0].images[0] == os.path.normpath(root / rel)


CASE_IDS = st.lists(st.text("abcxyz0123_-", min_size=1, max_size=8), min_size=1, max_size=30, unique=True)


@SETTINGS
@given(ids=CASE_IDS, folds=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_folds_are_balanced_complete_and_independent_of_listing_order(ids, folds, seed):
    if len(ids) < folds:
        with pytest.raises(DatasetError, match="cannot be split"):
            kfold_assignment(ids, folds, seed)
        return
    assignment = kfold_assignment(ids, folds, seed)
    assert set(assignment) == set(ids)
    sizes = np.bincount(list(assignment.values()), minlength=folds)
    assert sizes.max() - sizes.min() <= 1 and list(sizes) == sorted(sizes, reverse=True)
    assert kfold_assignment(list(reversed(ids)), folds, seed) == assignment


@SETTINGS
@given(ids=CASE_IDS, data=st.data())
def test_a_saved_manifest_loads_back_the_same(tmp_path_factory, ids, data):
    root = tmp_path_factory.mktemp("root")
    cases = [Case(c, [str(root / "imagesTr" / f"{c}_{k:04d}.nii.gz") for k in range(data.draw(st.integers(1, 2)))],
                  data.draw(st.one_of(st.none(), st.just(str(root / "labelsTr" / f"{c}.nii.gz")))),
                  data.draw(st.integers(0, 4))) for c in ids]
    m = Manifest("m", ["T1", "T2"], {0: "background", 1: "a"}, cases, 5, str(root))
    m.save(root / "manifest.json")
    assert Manifest.load(root / "manifest.json") == m
    saved = json.loads((root / "manifest.json").read_text())
    assert all(not os.path.isabs(p) for c in saved["cases"] for p in c["images"])  # portable: relative to root
