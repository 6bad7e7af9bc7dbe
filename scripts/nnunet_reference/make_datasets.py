#!/usr/bin/env python3
"""Deterministic synthetic datasets in nnU-Net v2 raw layout, used to produce reference plans.

Each generator writes ``<raw_root>/<DatasetXXX_Name>/{imagesTr,labelsTr,dataset.json}`` with nibabel.
Everything is drawn from ``numpy.random.default_rng(seed + case_index)``, so a dataset is fully defined by
``(kind, n_cases, seed)`` and can be regenerated bit-for-bit (given the same numpy / nibabel versions).

Axis convention: arrays are built in NIfTI voxel order (i, j, k).  SimpleITK-based readers (nnU-Net's default
SimpleITKIO, medseg's readers) present them reversed, i.e. as (k, j, i) with spacing reversed accordingly.

Kinds:
  aniso_mri     T2 MRI, in-plane 0.6-0.8 mm, slices 3-4 mm along the LAST voxel axis, ~20 x 256 x 256, labels 0/1/2
  ct            CT (HU), ~0.8 x 0.8 x 1.5 mm, ~160 x 160 x 120, labels 0/1; most cases zero-padded so that
                cropping to the nonzero region removes a large border (median relative size < 0.75)
  large_lowres  CT, 512 x 512 x ~300 at ~0.8 x 0.8 x 0.9 mm: big enough that nnU-Net adds a 3d_lowres stage
  mri_mask      sagittal T1 head MRI in an exactly-zero background (cropping removes ~50 %), thick axis is the
                FIRST voxel axis (exercises transpose_forward != identity and z-score inside the nonzero mask)

Usage:
  python make_datasets.py --raw /tmp/nnunet_ref/nnUNet_raw [--only aniso_mri ct ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Dict, List

import nibabel as nib
import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _save_nifti(arr: np.ndarray, spacing_ijk, path: str) -> None:
    affine = np.diag([float(s) for s in spacing_ijk] + [1.0])
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def _grid_mm(shape, spacing, center_mm):
    """Open (broadcastable) float32 coordinate grids in mm, relative to center_mm, NIfTI voxel order."""
    return [((np.arange(n, dtype=np.float32) + 0.5) * np.float32(s) - np.float32(c)).reshape(
        [-1 if d == a else 1 for d in range(3)]) for a, (n, s, c) in enumerate(zip(shape, spacing, center_mm))]


def _ellipsoid(grids, radii_mm, offset_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    acc = None
    for g, r, o in zip(grids, radii_mm, offset_mm):
        t = ((g - np.float32(o)) / np.float32(r)) ** 2
        acc = t if acc is None else acc + t
    return acc <= 1.0


def _ellipse_cylinder(grids, radii_mm_ij, offset_mm_ij=(0.0, 0.0)) -> np.ndarray:
    """Ellipse in the (i, j) plane, extended along k."""
    gi, gj, gk = grids
    m = ((gi - offset_mm_ij[0]) / radii_mm_ij[0]) ** 2 + ((gj - offset_mm_ij[1]) / radii_mm_ij[1]) ** 2 <= 1.0
    return np.broadcast_to(m, (gi.shape[0], gj.shape[1], gk.shape[2]))


def _noise(rng, shape, std) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _r(x, nd=3):
    return float(round(float(x), nd))


# ----------------------------------------------------------------------------------------------------------------
# generators: each returns (image int16/uint8 array, label uint8 array, spacing_ijk, case-info dict)


def gen_aniso_mri(rng: np.random.Generator):
    n_ij = int(rng.choice([240, 256, 256, 256, 272, 288]))
    shape = (n_ij, n_ij, int(rng.integers(18, 25)))
    sxy = _r(rng.uniform(0.6, 0.8), 3)
    sz = _r(rng.uniform(3.0, 4.0), 2)
    spacing = (sxy, sxy, sz)
    fov = [n * s for n, s in zip(shape, spacing)]
    g = _grid_mm(shape, spacing, [f / 2 for f in fov])
    # MRI: no exact zeros anywhere (noise floor >= 1), so cropping to nonzero removes nothing
    img = np.abs(_noise(rng, shape, 12.0)) + 1.0
    body = _ellipse_cylinder(g, (fov[0] * 0.42, fov[1] * 0.36))
    img[body] = 280.0
    img += np.where(body, _noise(rng, shape, 35.0), 0)
    off = tuple(rng.uniform(-8, 8, 3).astype(np.float32))
    radii = (rng.uniform(18, 26), rng.uniform(15, 22), rng.uniform(14, 22))
    outer = _ellipsoid(g, radii, off)
    inner = _ellipsoid(g, [r * 0.55 for r in radii], off)
    img[outer] = 450.0 + _noise(rng, shape, 40.0)[outer]
    img[inner] = 230.0 + _noise(rng, shape, 30.0)[inner]
    img = np.clip(img, 1, 4000).astype(np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[outer] = 1
    seg[inner] = 2
    return img, seg, spacing, {"shape_ijk": list(shape), "spacing_ijk": list(spacing)}


def gen_ct(rng: np.random.Generator, pad_this_case: bool):
    core = (int(rng.integers(150, 171)), int(rng.integers(150, 171)), int(rng.integers(110, 131)))
    sxy = _r(rng.uniform(0.75, 0.85), 3)
    sz = _r(rng.uniform(1.25, 1.75), 2)
    spacing = (sxy, sxy, sz)
    fov = [n * s for n, s in zip(core, spacing)]
    g = _grid_mm(core, spacing, [f / 2 for f in fov])
    img = -1000.0 + _noise(rng, core, 15.0)                      # air
    body = _ellipse_cylinder(g, (fov[0] * 0.45, fov[1] * 0.38))
    fat_inner = _ellipse_cylinder(g, (fov[0] * 0.40, fov[1] * 0.33))
    img[body] = -100.0
    img[fat_inner] = 40.0                                        # soft tissue
    img += np.where(body, _noise(rng, core, 18.0), 0)
    spine = _ellipse_cylinder(g, (11.0, 11.0), (0.0, fov[1] * 0.22))
    img[spine] = rng.uniform(400, 1500, size=int(spine.sum())).astype(np.float32)
    off = (float(rng.uniform(-20, 20)), float(rng.uniform(-25, 0)), float(rng.uniform(-10, 10)))
    organ = _ellipsoid(g, (rng.uniform(22, 32), rng.uniform(18, 26), rng.uniform(25, 40)), off)
    img[organ] = 60.0 + _noise(rng, core, 12.0)[organ]
    vessel = organ & (rng.random(core, dtype=np.float32) < 0.05)
    img[vessel] = 200.0 + _noise(rng, core, 30.0)[vessel]
    img = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    seg = organ.astype(np.uint8)
    pad = [[0, 0], [0, 0], [0, 0]]
    if pad_this_case:
        # zero-padded border (as if the scan had been embedded into a larger, zero-filled array)
        pad = [[int(rng.integers(15, 35)), int(rng.integers(15, 35))],
               [int(rng.integers(15, 35)), int(rng.integers(15, 35))],
               [int(rng.integers(5, 20)), int(rng.integers(5, 20))]]
        img = np.pad(img, pad, constant_values=0)
        seg = np.pad(seg, pad, constant_values=0)
    return img, seg, spacing, {"shape_ijk": list(img.shape), "core_shape_ijk": list(core), "pad_ijk": pad,
                               "spacing_ijk": list(spacing)}


def gen_large_lowres(rng: np.random.Generator):
    shape = (512, 512, int(rng.integers(270, 331)))
    sxy = _r(rng.uniform(0.72, 0.88), 3)
    sz = _r(rng.uniform(0.8, 1.0), 2)
    spacing = (sxy, sxy, sz)
    fov = [n * s for n, s in zip(shape, spacing)]
    g = _grid_mm(shape, spacing, [f / 2 for f in fov])
    img = np.full(shape, -1000.0, np.float32)
    # np.copyto(..., where=mask) instead of boolean indexing keeps peak memory low for these big volumes
    np.copyto(img, np.float32(40.0), where=_ellipse_cylinder(g, (fov[0] * 0.44, fov[1] * 0.34)))
    np.copyto(img, np.float32(700.0), where=_ellipse_cylinder(g, (15.0, 15.0), (0.0, fov[1] * 0.2)))
    off = (float(rng.uniform(40, 80)), float(rng.uniform(-10, 20)), float(rng.uniform(-30, 30)))
    radii = (rng.uniform(30, 40), rng.uniform(25, 35), rng.uniform(45, 60))
    kidney = _ellipsoid(g, radii, off)
    np.copyto(img, np.float32(150.0), where=kidney)
    toff = (off[0] + float(rng.uniform(-8, 8)), off[1] + float(rng.uniform(-8, 8)),
            off[2] + float(rng.uniform(-15, 15)))
    tumor = _ellipsoid(g, [r * 0.4 for r in radii], toff)
    np.copyto(img, np.float32(90.0), where=tumor)
    img += _noise(rng, shape, 10.0)
    img = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    seg = kidney.astype(np.uint8)
    np.copyto(seg, np.uint8(2), where=tumor)
    return img, seg, spacing, {"shape_ijk": list(shape), "spacing_ijk": list(spacing)}


def gen_mri_mask(rng: np.random.Generator):
    # sagittal acquisition: thick axis (LR) is the FIRST voxel axis
    shape = (int(rng.integers(136, 153)), int(rng.integers(200, 225)), int(rng.integers(200, 225)))
    spacing = (_r(rng.uniform(1.15, 1.3), 2), _r(rng.uniform(0.95, 1.05), 3), _r(rng.uniform(0.95, 1.05), 3))
    fov = [n * s for n, s in zip(shape, spacing)]
    g = _grid_mm(shape, spacing, [f / 2 for f in fov])
    radii = (rng.uniform(64, 72), rng.uniform(82, 92), rng.uniform(72, 82))
    off = (0.0, float(rng.uniform(-6, 6)), float(rng.uniform(0, 15)))
    head = _ellipsoid(g, radii, off)
    brain = _ellipsoid(g, [r - 9 for r in radii], off)
    vent = _ellipsoid(g, (10, 22, 12), (off[0], off[1], off[2] + 5))
    img = np.zeros(shape, np.float32)                            # exact-zero background
    img[head] = 650.0
    img[brain] = 420.0
    img[vent] = 150.0
    img += np.where(head, _noise(rng, shape, 35.0), 0)
    img = np.where(head, np.clip(img, 1, 4000), 0)               # strictly positive inside the head
    loff = (float(rng.uniform(-30, 30)), float(rng.uniform(-30, 30)), float(rng.uniform(-10, 30)))
    lesion = _ellipsoid(g, tuple(rng.uniform(8, 16, 3)), loff) & brain
    img[lesion] = 700.0 + _noise(rng, shape, 40.0)[lesion]
    img = np.where(head, np.clip(img, 1, 4000), 0).astype(np.int16)
    seg = lesion.astype(np.uint8)
    return img, seg, spacing, {"shape_ijk": list(shape), "spacing_ijk": list(spacing)}


# ----------------------------------------------------------------------------------------------------------------
# registry

DATASETS: Dict[str, dict] = {
    "aniso_mri": dict(dataset_id=501, dataset_name="Dataset501_AnisoMRI", n_cases=10, seed=501,
                      case_prefix="aniso", channel_names={"0": "T2"},
                      labels={"background": 0, "peripheral": 1, "central": 2}),
    "ct": dict(dataset_id=502, dataset_name="Dataset502_SynthCT", n_cases=8, seed=502,
               case_prefix="ct", channel_names={"0": "CT"}, labels={"background": 0, "organ": 1},
               padded_cases=[0, 1, 2, 4, 5, 7]),
    "large_lowres": dict(dataset_id=503, dataset_name="Dataset503_LargeLowres", n_cases=4, seed=503,
                         case_prefix="large", channel_names={"0": "CT"},
                         labels={"background": 0, "kidney": 1, "tumor": 2}),
    "mri_mask": dict(dataset_id=504, dataset_name="Dataset504_MRIMask", n_cases=6, seed=504,
                     case_prefix="head", channel_names={"0": "T1"}, labels={"background": 0, "lesion": 1}),
}


def _case_generator(kind: str) -> Callable:
    if kind == "aniso_mri":
        return lambda rng, i, p: gen_aniso_mri(rng)
    if kind == "ct":
        return lambda rng, i, p: gen_ct(rng, i in p["padded_cases"])
    if kind == "large_lowres":
        return lambda rng, i, p: gen_large_lowres(rng)
    if kind == "mri_mask":
        return lambda rng, i, p: gen_mri_mask(rng)
    raise KeyError(kind)


def generator_params(kind: str) -> dict:
    """Everything needed to regenerate dataset ``kind`` (stored in the fixtures)."""
    p = dict(DATASETS[kind])
    p["kind"] = kind
    p["generator"] = f"scripts/nnunet_reference/make_datasets.py:generate('{kind}', raw_root)"
    p["rng"] = "numpy.random.default_rng(seed + case_index)"
    return p


def generate(kind: str, raw_root: str, overwrite: bool = False) -> List[dict]:
    p = DATASETS[kind]
    out = os.path.join(raw_root, p["dataset_name"])
    info_file = os.path.join(out, "cases_info.json")
    if not overwrite and os.path.isfile(os.path.join(out, "dataset.json")) and os.path.isfile(info_file):
        with open(info_file) as f:
            return json.load(f)
    os.makedirs(os.path.join(out, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out, "labelsTr"), exist_ok=True)
    gen = _case_generator(kind)
    infos = []
    for i in range(p["n_cases"]):
        rng = np.random.default_rng(p["seed"] + i)
        case = f"{p['case_prefix']}_{i:03d}"
        img, seg, spacing, info = gen(rng, i, p)
        _save_nifti(img, spacing, os.path.join(out, "imagesTr", f"{case}_0000.nii.gz"))
        _save_nifti(seg, spacing, os.path.join(out, "labelsTr", f"{case}.nii.gz"))
        info["case"] = case
        infos.append(info)
        print(f"[{kind}] {case}: shape_ijk={info['shape_ijk']} spacing_ijk={info['spacing_ijk']}", flush=True)
        del img, seg
    dataset_json = {
        "channel_names": p["channel_names"],
        "labels": p["labels"],
        "numTraining": p["n_cases"],
        "file_ending": ".nii.gz",
        "name": p["dataset_name"],
        "description": f"synthetic medseg reference dataset '{kind}' (seed {p['seed']})",
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    with open(info_file, "w") as f:
        json.dump(infos, f, indent=1)
    return infos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, help="nnUNet_raw folder to write into")
    ap.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=None)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    for kind in a.only or list(DATASETS):
        generate(kind, a.raw, overwrite=a.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
