#!/usr/bin/env python3
"""Independent, numpy-only re-implementation of nnU-Net v2.8.1's planner as described in RULES.md.

It re-plans every fixture in tests/planning/fixtures/nnunet_*.json from the stored fingerprint + dataset.json and
compares against the stored nnU-Net plans (it does not import nnunetv2 or torch).  With --vram it also checks the
closed-form VRAM estimate against dynamic_network_architectures' compute_conv_feature_map_size (needs the venv).

Usage: python check_rules.py [--fixtures DIR] [--vram] [--fingerprint-raw $nnUNet_raw [--fingerprint-only F.json ...]]
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

import numpy as np

ANISO = 3
PRESETS = {
    # name: (network, ref_val_3d, ref_val_2d, ref_GB, vram_target_GB, max_dataset_covered, enc blocks, dec blocks)
    "ExperimentPlanner": ("plain", 560e6, 85e6, 8, 8, 0.05, (2,) * 14, (2,) * 13),
    "nnUNetPlannerResEncM": ("resenc", 680e6, 135e6, 8, 8, 1.0, (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), (1,) * 12),
    "nnUNetPlannerResEncL": ("resenc", 2100e6, 380e6, 24, 24, 1.0, (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), (1,) * 12),
    "nnUNetPlannerResEncXL": ("resenc", 3600e6, 560e6, 40, 40, 1.0, (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), (1,) * 12),
}


# ------------------------------------------------------------------ spacing / transpose
def fullres_target_spacing(spacings, shapes):
    spacings = np.asarray(spacings, float)
    target = np.median(spacings, 0)
    size = np.median(np.asarray(shapes, float), 0)
    w = int(np.argmax(target))
    others = [i for i in range(3) if i != w]
    aniso_spacing = target[w] > ANISO * max(target[i] for i in others)
    aniso_voxels = size[w] * ANISO < min(size[i] for i in others)
    if aniso_spacing and aniso_voxels:
        t = np.percentile(spacings[:, w], 10)
        m = max(target[i] for i in others)
        if t < m:
            t = max(m, t) + 1e-5
        target[w] = t
    return target


def transpose(target):
    w = int(np.argmax(target))
    fwd = [w] + [i for i in range(3) if i != w]
    bwd = [fwd.index(i) for i in range(3)]
    return fwd, bwd


# ------------------------------------------------------------------ topology
def pool_and_conv(spacing, patch, min_fm=4):
    dim = len(spacing)
    cur_sp = list(map(float, spacing))
    cur_sz = list(map(float, patch))
    strides = [[1] * dim]
    kernels = []
    npool = [0] * dim
    k = [1] * dim
    while True:
        valid = [i for i in range(dim) if cur_sz[i] >= 2 * min_fm]
        if not valid:
            break
        ms = min(cur_sp[i] for i in valid)
        valid = [i for i in valid if cur_sp[i] / ms < 2]
        if len(valid) == 1 and cur_sz[valid[0]] < 3 * min_fm:
            break
        if not valid:
            break
        for d in range(dim):
            if k[d] != 3 and cur_sp[d] / min(cur_sp) < 2:
                k[d] = 3
        s = [1] * dim
        for v in valid:
            s[v] = 2
            npool[v] += 1
            cur_sp[v] *= 2
            cur_sz[v] = math.ceil(cur_sz[v] / 2)
        strides.append(s)
        kernels.append(list(k))
    kernels.append([3] * dim)
    div = [2 ** n for n in npool]
    padded = [int(math.ceil(p / d) * d) for p, d in zip(patch, div)]
    return strides, kernels, padded, div


# ------------------------------------------------------------------ VRAM estimate (closed form)
def vram_estimate(patch, strides, features, n_enc, n_dec, num_classes, network):
    sizes = []
    cur = list(patch)
    for s in strides:
        cur = [c // t for c, t in zip(cur, s)]
        sizes.append(int(np.prod(cur, dtype=np.int64)))
    n = len(strides)
    total = 0
    if network == "plain":
        for s in range(n):
            total += n_enc[s] * features[s] * sizes[s]
    else:
        total += features[0] * int(np.prod(patch, dtype=np.int64))  # stem conv
        for s in range(n):
            total += (2 * n_enc[s] + (1 if s > 0 else 0)) * features[s] * sizes[s]
    for t in range(n - 1):  # decoder stage t works at encoder level n-2-t
        lvl = n - 2 - t
        total += (n_dec[t] + 1) * features[lvl] * sizes[lvl]  # convs + transposed conv output
    if n > 1:  # final segmentation layer only (deep_supervision=False); it belongs to the last decoder stage
        total += num_classes * sizes[0]
    return total


# ------------------------------------------------------------------ one configuration
def plan_configuration(spacing, median_shape, approx_voxels, preset, n_classes):
    network, r3, r2, ref_gb, target_gb, cover, enc_b, dec_b = PRESETS[preset]
    dim = len(spacing)
    max_f = 512 if dim == 2 else 320
    tmp = 1 / np.asarray(spacing, float)
    vol = 256 ** 3 if dim == 3 else 2048 ** 2
    init = [round(i) for i in tmp * (vol / np.prod(tmp)) ** (1 / dim)]
    init = [min(i, j) for i, j in zip(init, median_shape)]
    strides, kernels, patch, div = pool_and_conv(spacing, init)

    def feats(n):
        return [min(max_f, 32 * 2 ** i) for i in range(n)]

    def est(patch, strides):
        n = len(strides)
        return vram_estimate(patch, strides, feats(n), enc_b[:n], dec_b[:n - 1], n_classes, network)

    e = est(patch, strides)
    reference = (r2 if dim == 2 else r3) * (target_gb / ref_gb)
    ref_bs = 12 if dim == 2 else 2

    def too_big(e):
        return (e / ref_bs * 2 > reference) if network == "plain" else (e > reference)

    while too_big(e):
        ratios = [p / m for p, m in zip(patch, median_shape)]
        axis = int(np.argsort(ratios)[-1])
        t = list(patch)
        t[axis] -= div[axis]
        _, _, _, div2 = pool_and_conv(spacing, t)
        patch = list(patch)
        patch[axis] -= div2[axis]
        strides, kernels, patch, div = pool_and_conv(spacing, patch)
        e = est(patch, strides)
    bs = round(reference / e * ref_bs)
    bs5 = round(approx_voxels * cover / np.prod(patch, dtype=np.float64))
    bs = max(min(bs, bs5), 2)
    n = len(strides)
    return {"patch_size": patch, "batch_size": int(bs), "strides": strides, "kernel_sizes": kernels,
            "features_per_stage": feats(n), "n_stages": n, "spacing": [float(x) for x in spacing],
            "median_image_size_in_voxels": [float(x) for x in median_shape], "estimate": int(e)}


def plan(fp, dataset_json, preset):
    n_classes = len(dataset_json["labels"])
    spacings, shapes = fp["spacings"], fp["shapes_after_crop"]
    target = fullres_target_spacing(spacings, shapes)
    fwd, bwd = transpose(target)
    new_shapes = [[int(round(s / t * n)) for s, t, n in zip(sp, target, sh)] for sp, sh in zip(spacings, shapes)]
    med = np.median(np.asarray(new_shapes, float), 0)[fwd]
    sp_t = target[fwd]
    approx = float(np.prod(med, dtype=np.float64) * dataset_json["numTraining"])
    out = {"transpose_forward": fwd, "transpose_backward": bwd, "configurations": {}}
    if med[0] != 1:
        full = plan_configuration(sp_t, med, approx, preset, n_classes)
        median_vox = np.prod(med, dtype=np.float64)
        patch_vox = np.prod(full["patch_size"], dtype=np.float64)
        low = None
        low_sp = np.array(sp_t, float)
        while patch_vox / median_vox < 0.25:
            mx = max(low_sp)
            if np.any(mx / low_sp > 2):
                low_sp[(mx / low_sp) > 2] *= 1.03
            else:
                low_sp *= 1.03
            median_vox = np.prod(sp_t / low_sp * med, dtype=np.float64)
            low_med = [round(i) for i in sp_t / low_sp * med]
            low = plan_configuration(low_sp, low_med, float(median_vox * dataset_json["numTraining"]), preset,
                                     n_classes)
            patch_vox = np.prod(low["patch_size"], dtype=np.int64)
        if np.prod(med, dtype=np.float64) / median_vox < 2:
            low = None
        if low is not None:
            out["configurations"]["3d_lowres"] = low
        out["configurations"]["3d_fullres"] = full
    out["configurations"]["2d"] = plan_configuration(sp_t[1:], med[1:], approx, preset, n_classes)
    return out


def check_fixture(path) -> list:
    fx = json.load(open(path))
    mine = plan(fx["fingerprint"], fx["dataset_json"], fx["planner"]["class"])
    ref = fx["plans"]
    errs = []
    for k in ("transpose_forward", "transpose_backward"):
        if mine[k] != ref[k]:
            errs.append(f"{k}: {mine[k]} != {ref[k]}")
    ref_confs = {k: v for k, v in ref["configurations"].items() if "architecture" in v}
    if set(ref_confs) != set(mine["configurations"]):
        errs.append(f"configs {sorted(mine['configurations'])} != {sorted(ref_confs)}")
    for c, rv in ref_confs.items():
        mv = mine["configurations"].get(c)
        if mv is None:
            continue
        a = rv["architecture"]["arch_kwargs"]
        pairs = [("patch_size", mv["patch_size"], rv["patch_size"]), ("batch_size", mv["batch_size"], rv["batch_size"]),
                 ("strides", mv["strides"], a["strides"]), ("kernel_sizes", mv["kernel_sizes"], a["kernel_sizes"]),
                 ("features", mv["features_per_stage"], a["features_per_stage"])]
        for name, x, y in pairs:
            if json.loads(json.dumps(x)) != json.loads(json.dumps(y)):
                errs.append(f"{c}.{name}: {x} != {y}")
        if not np.allclose(mv["spacing"], rv["spacing"], rtol=1e-12, atol=0):
            errs.append(f"{c}.spacing: {mv['spacing']} != {rv['spacing']}")
        if not np.allclose(mv["median_image_size_in_voxels"], rv["median_image_size_in_voxels"]):
            errs.append(f"{c}.median: {mv['median_image_size_in_voxels']} != {rv['median_image_size_in_voxels']}")
    return errs


def check_vram(n_random=300, seed=0):
    """Compare vram_estimate() with the real networks' compute_conv_feature_map_size (needs torch + DNA)."""
    import torch  # noqa: F401
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    from torch import nn
    rng = np.random.default_rng(seed)
    bad = 0
    for _ in range(n_random):
        dim = int(rng.choice([2, 3]))
        spacing = list(rng.uniform(0.5, 5, dim))
        patch = list(rng.integers(8, 200, dim))
        strides, kernels, patch, _ = pool_and_conv(spacing, patch)
        n = len(strides)
        feats = [min(512 if dim == 2 else 320, 32 * 2 ** i) for i in range(n)]
        ncls = int(rng.integers(2, 6))
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
        for network in ("plain", "resenc"):
            if network == "plain":
                enc, dec = [2] * n, [2] * (n - 1)
                net = PlainConvUNet(1, n, feats, conv, kernels, strides, enc, ncls, dec, True, norm, {}, None, None,
                                    nn.LeakyReLU, {}, deep_supervision=False)
            else:
                enc, dec = list((1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)[:n]), [1] * (n - 1)
                net = ResidualEncoderUNet(1, n, feats, conv, kernels, strides, enc, ncls, dec, True, norm, {}, None,
                                          None, nn.LeakyReLU, {}, deep_supervision=False)
            want = int(net.compute_conv_feature_map_size(patch))
            got = vram_estimate(patch, strides, feats, enc, dec, ncls, network)
            if want != got:
                bad += 1
                print("VRAM MISMATCH", network, dim, patch, strides, want, got)
    print(f"vram formula: {2 * n_random - bad}/{2 * n_random} random networks match exactly")
    return bad == 0


def fingerprint(raw_dataset_dir):
    """Re-compute nnU-Net's dataset_fingerprint.json (needs SimpleITK + scipy; no nnunetv2)."""
    import SimpleITK as sitk
    from scipy.ndimage import binary_fill_holes
    dj = json.load(open(os.path.join(raw_dataset_dir, "dataset.json")))
    fe = dj["file_ending"]
    n_ch = len(dj["channel_names"])
    img_dir = os.path.join(raw_dataset_dir, "imagesTr")
    ids = sorted({f[: -len(fe) - 5] for f in os.listdir(img_dir) if f.endswith(fe)})
    n_samples = int(10e7 // len(ids))
    spacings, shapes, rel, samples = [], [], [], [[] for _ in range(n_ch)]
    for cid in ids:
        itks = [sitk.ReadImage(os.path.join(img_dir, f"{cid}_{c:04d}{fe}")) for c in range(n_ch)]
        img = np.vstack([sitk.GetArrayFromImage(i)[None] for i in itks], dtype=np.float32, casting="unsafe")
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw_dataset_dir, "labelsTr", cid + fe)))
        seg = seg.astype(np.float32)
        mask = binary_fill_holes(np.any(img != 0, axis=0))
        if mask.any():
            idx = np.nonzero(mask)
            sl = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
        else:
            sl = tuple(slice(0, n) for n in mask.shape)
        imgc, segc, maskc = img[(slice(None),) + sl], seg[sl].copy(), mask[sl]
        segc[(segc == 0) & (~maskc)] = -1
        rs = np.random.RandomState(1234)
        fg = segc > 0
        for c in range(n_ch):
            px = imgc[c][fg]
            samples[c].append(rs.choice(px, n_samples, replace=True) if px.size else np.zeros(0, np.float32))
        spacings.append([float(abs(x)) for x in itks[0].GetSpacing()[::-1]])
        shapes.append(list(imgc.shape[1:]))
        rel.append(np.prod(imgc.shape[1:]) / np.prod(img.shape[1:]))
    props = {}
    for c in range(n_ch):
        v = np.concatenate(samples[c])
        p005, med, p995 = np.percentile(v, (0.5, 50.0, 99.5))
        props[str(c)] = {"mean": float(np.mean(v)), "median": float(med), "std": float(np.std(v)),
                         "min": float(np.min(v)), "max": float(np.max(v)), "percentile_99_5": float(p995),
                         "percentile_00_5": float(p005)}
    return {"spacings": spacings, "shapes_after_crop": shapes, "foreground_intensity_properties_per_channel": props,
            "median_relative_size_after_cropping": float(np.median(rel))}


def check_fingerprint(fixture_path, raw_root):
    fx = json.load(open(fixture_path))
    d = os.path.join(raw_root, fx["dataset_name"])
    if not os.path.isdir(d):
        print("SKIP fingerprint", fx["dataset_name"], "(raw data missing)")
        return True
    mine, ref = fingerprint(d), fx["fingerprint"]
    errs = []
    if not np.allclose(mine["spacings"], ref["spacings"], rtol=0, atol=0):
        errs.append("spacings")
    if mine["shapes_after_crop"] != ref["shapes_after_crop"]:
        errs.append("shapes_after_crop")
    if mine["median_relative_size_after_cropping"] != ref["median_relative_size_after_cropping"]:
        errs.append("median_relative_size_after_cropping")
    for c, props in ref["foreground_intensity_properties_per_channel"].items():
        for k, v in props.items():
            if mine["foreground_intensity_properties_per_channel"][c][k] != v:
                errs.append(f"intensity[{c}].{k}: {mine['foreground_intensity_properties_per_channel'][c][k]} != {v}")
    print(("OK   " if not errs else "FAIL ") + "fingerprint " + fx["dataset_name"], *errs)
    return not errs


def main(argv=None):
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "..", "tests", "planning", "fixtures"))
    ap.add_argument("--vram", action="store_true")
    ap.add_argument("--fingerprint-raw", default=None, help="nnUNet_raw folder: also re-compute the fingerprints")
    ap.add_argument("--fingerprint-only", nargs="*", default=None, help="fixture basenames to fingerprint-check")
    a = ap.parse_args(argv)
    ok = True
    for f in sorted(glob.glob(os.path.join(a.fixtures, "nnunet_*.json"))):
        errs = check_fixture(f)
        print(("OK   " if not errs else "FAIL ") + os.path.basename(f))
        for e in errs:
            print("     ", e)
        ok &= not errs
    if a.vram:
        ok &= check_vram()
    if a.fingerprint_raw:
        for f in sorted(glob.glob(os.path.join(a.fixtures, "nnunet_*.json"))):
            name = os.path.basename(f)
            if any(t in name for t in ("_resenc",)):
                continue  # same fingerprint as the default-planner fixture
            if a.fingerprint_only and name not in a.fingerprint_only:
                continue
            ok &= check_fingerprint(f, a.fingerprint_raw)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
