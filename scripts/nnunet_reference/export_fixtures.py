#!/usr/bin/env python3
"""Turn nnU-Net v2.8.1 fingerprints + plans into compact JSON fixtures for medseg's planning tests.

Usage (see run_reference.sh):
  python export_fixtures.py --preprocessed $nnUNet_preprocessed --raw $nnUNet_raw --out tests/planning/fixtures \
      --dataset aniso_mri:Dataset501_AnisoMRI --plans nnUNetPlans nnUNetResEncUNetMPlans ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PLANNER_OF_PLANS = {
    "nnUNetPlans": ("ExperimentPlanner", None, 8),
    "nnUNetResEncUNetMPlans": ("nnUNetPlannerResEncM", "resencm", 8),
    "nnUNetResEncUNetLPlans": ("nnUNetPlannerResEncL", "resencl", 24),
    "nnUNetResEncUNetXLPlans": ("nnUNetPlannerResEncXL", "resencxl", 40),
}

ARCH_KEYS = ("n_stages", "features_per_stage", "strides", "kernel_sizes", "n_conv_per_stage", "n_blocks_per_stage",
             "n_conv_per_stage_decoder", "conv_op", "norm_op", "conv_bias", "norm_op_kwargs", "nonlin", "nonlin_kwargs",
             "dropout_op")
CONF_KEYS = ("data_identifier", "preprocessor_name", "spacing", "median_image_size_in_voxels", "patch_size",
             "batch_size", "batch_dice", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
             "resampling_fn_data_kwargs",
             "resampling_fn_seg", "resampling_fn_seg_kwargs", "resampling_fn_probabilities",
             "resampling_fn_probabilities_kwargs", "next_stage", "previous_stage", "inherits_from")


def _load(p):
    with open(p) as f:
        return json.load(f)


def compact_configuration(conf: dict) -> dict:
    out = {k: conf[k] for k in CONF_KEYS if k in conf}
    if "architecture" in conf:
        arch = conf["architecture"]
        out["architecture"] = {"network_class_name": arch["network_class_name"]}
        out["architecture"]["arch_kwargs"] = {k: arch["arch_kwargs"][k] for k in ARCH_KEYS if k in arch["arch_kwargs"]}
    return out


def build_fixture(kind: str, dataset_name: str, plans_name: str, raw: str, preprocessed: str) -> dict:
    from importlib.metadata import version

    folder = os.path.join(preprocessed, dataset_name)
    fp = _load(os.path.join(folder, "dataset_fingerprint.json"))
    plans = _load(os.path.join(folder, plans_name + ".json"))
    dataset_json = _load(os.path.join(raw, dataset_name, "dataset.json"))
    planner, _, gb = PLANNER_OF_PLANS[plans_name]
    if kind == "hippocampus":
        generator = {"kind": "hippocampus", "source": "shared/data/Task04_Hippocampus (MSD layout, 220 cases)",
                     "raw_layout": "symlinks imagesTr/<case>_0000.nii.gz -> MSD imagesTr/<case>.nii.gz"}
        cases_info = None
    else:
        from make_datasets import generator_params
        generator = generator_params(kind)
        info_file = os.path.join(raw, dataset_name, "cases_info.json")
        cases_info = _load(info_file) if os.path.isfile(info_file) else None
    case_ids = sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(os.path.join(raw, dataset_name, "imagesTr"))
                      if f.endswith("_0000.nii.gz"))
    fixture = {
        "nnunetv2_version": version("nnunetv2"),
        "dynamic_network_architectures_version": version("dynamic_network_architectures"),
        "dataset": kind,
        "dataset_name": dataset_name,
        "generator": generator,
        "cases": case_ids,  # fingerprint lists are in nnU-Net's case order (sorted case identifiers)
        "cases_info": cases_info,
        "dataset_json": {k: dataset_json[k] for k in ("channel_names", "labels", "numTraining", "file_ending")},
        "planner": {"class": planner, "plans_name": plans_name, "gpu_memory_target_in_gb": gb},
        "fingerprint": fp,
        "plans": {
            "plans_name": plans["plans_name"],
            "experiment_planner_used": plans.get("experiment_planner_used"),
            "transpose_forward": plans["transpose_forward"],
            "transpose_backward": plans["transpose_backward"],
            "original_median_spacing_after_transp": plans["original_median_spacing_after_transp"],
            "original_median_shape_after_transp": plans["original_median_shape_after_transp"],
            "image_reader_writer": plans.get("image_reader_writer"),
            "configurations": {k: compact_configuration(v) for k, v in plans["configurations"].items()},
        },
    }
    return fixture


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--preprocessed", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dataset", required=True, help="kind:DatasetXXX_Name")
    ap.add_argument("--plans", nargs="+", default=["nnUNetPlans"])
    a = ap.parse_args(argv)
    kind, dataset_name = a.dataset.split(":")
    os.makedirs(a.out, exist_ok=True)
    for plans_name in a.plans:
        fx = build_fixture(kind, dataset_name, plans_name, a.raw, a.preprocessed)
        suffix = PLANNER_OF_PLANS[plans_name][1]
        fname = os.path.join(a.out, f"nnunet_{kind}{'_' + suffix if suffix else ''}.json")
        with open(fname, "w") as f:
            json.dump(fx, f, indent=1)
            f.write("\n")
        print(f"wrote {fname} ({os.path.getsize(fname)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
