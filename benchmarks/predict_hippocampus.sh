#!/usr/bin/env bash
# Prediction of 40 Hippocampus volumes on the CPU: medseg-predict vs nnUNetv2_predict (nnunetv2 2.8.1, its own
# virtual environment $NNUNET_VENV), same network, same machine, same run; each run timed from process start
# to exit, runs alternating; prints each time, the medians and the ratio.
#
# The inputs are the first 40 imagesTr files in sorted order (hippocampus_001 ... hippocampus_083), linked into
# one folder under nnU-Net's <case>_0000.nii.gz names, which medseg-predict groups as channel files too.
# The network is nnU-Net's 3d_fullres plan for the data (PlainConvUNet, patch 40x56x40, 4 stages, 32-256
# features): medseg plans the same topology and trains it for one iteration (near-random weights; prediction
# time does not depend on them), and those weights are copied into the network nnU-Net builds from its own plan,
# so both predict with the same function (checked on a random patch; predict_make_models.py).
# Both: sliding window with step/overlap 0.5, Gaussian weighting, mirroring on all 3 axes (nnU-Net's default),
# torch on 2 threads by default on 2 cores (neither is forced; nnU-Net sets cpu_count()).
# nnU-Net runs twice per repeat: its defaults (3 pre- and 3 post-processing workers) and -npp 1 -nps 1; the
# ratio uses the faster median.
# Usage: benchmarks/predict_hippocampus.sh [path/to/Task04_Hippocampus] [repeats] [cases]
set -euo pipefail
data=$(cd "${1:-../shared/data/Task04_Hippocampus}" && pwd)
repeats=${2:-3}
cases=${3:-40}
here=$(cd "$(dirname "$0")" && pwd)
py=$(dirname "$(command -v medseg-predict)")/python  # medseg's interpreter
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # anything written to a relative default path lands here
. "$here/nnunet_venv.sh"  # sets $venv
run_quiet() { "$@" > "$work/setup.log" 2>&1 || { cat "$work/setup.log"; exit 1; }; }

echo "== plans"
# nnU-Net raw layout of the same files (symlinks; the data folder is never written); a fingerprint and a plan
# are all that prediction needs (no preprocessed data)
raw=$("$py" "$here/nnunet_raw.py" "$data" "$work/raw")
export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/nnunet_pp" nnUNet_results="$work/nnunet_results"
run_quiet "$venv/bin/nnUNetv2_extract_fingerprint" -d 4 -np 2
run_quiet "$venv/bin/nnUNetv2_plan_experiment" -d 4
nn_plans="$nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans.json"

# medseg: plan, preprocess and one training iteration give a checkpoint that carries its plan
run_quiet medseg-train data=msd data.root="$data" trainer.max_epochs=1 sampling.iterations_per_epoch=1 \
  validation.final=false validation.max_cases_per_epoch=1 paths.output="$work/medseg_out" \
  paths.preprocessed="$work/medseg_pre"
fold="$work/medseg_out/Task04_Hippocampus/unet__dice_ce/fold_0"
ckpt="$fold/checkpoints/last.ckpt"
"$py" "$here/predict_make_models.py" compare-plans "$nn_plans" "$work/medseg_pre/Task04_Hippocampus/plans.json"

echo "== networks"
"$py" "$here/predict_make_models.py" medseg-logits "$ckpt" "$work/medseg_logits.pt" 2> /dev/null
"$venv/bin/python" "$here/predict_make_models.py" nnunet-folder "$ckpt" "$nn_plans" "$raw/dataset.json" \
  "$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres" "$work/medseg_logits.pt"

in="$work/in"
mkdir -p "$in"
for f in $(ls "$data"/imagesTr/*.nii.gz | sort | head -n "$cases"); do
  ln -s "$f" "$in/$(basename "$f" .nii.gz)_0000.nii.gz"
done
echo "== $(ls "$in" | wc -l) inputs: $(ls "$in" | head -1) ... $(ls "$in" | tail -1)"

# wall seconds of one command, from process start to exit (its output kept for a failure)
seconds() { local t0; t0=$(date +%s.%N); "$@" > "$work/last.log" 2>&1 || { cat "$work/last.log"; exit 1; }
            echo "$(date +%s.%N) - $t0" | bc; }
nn_default=(); nn_single=(); ms=()
for i in $(seq "$repeats"); do
  rm -rf "$work"/out_*
  nn_default+=("$(seconds "$venv/bin/nnUNetv2_predict" -i "$in" -o "$work/out_nn" -d 4 -c 3d_fullres -f 0 \
    -step_size 0.5 -device cpu --disable_progress_bar)")
  ms+=("$(seconds medseg-predict ckpt_dir="$fold" input="$in" output="$work/out_ms" overlap=0.5 mirror_axes=all \
    device=cpu checkpoint=last paths.output="$work/medseg_predict")")
  nn_single+=("$(seconds "$venv/bin/nnUNetv2_predict" -i "$in" -o "$work/out_nn1" -d 4 -c 3d_fullres -f 0 \
    -step_size 0.5 -device cpu --disable_progress_bar -npp 1 -nps 1)")
  echo "run $i: nnunetv2 ${nn_default[-1]} s (-npp 1 -nps 1: ${nn_single[-1]} s), medseg ${ms[-1]} s"
done

echo "== outputs (last run)"
# 40 label maps each, on the input's grid. The label agreement between the two is informative only: where a
# volume is padded to the patch by an odd number of voxels, nnU-Net mirrors the padded window and medseg (as
# MONAI's inferer per copy) the volume before padding, so mirrored copies sit one voxel apart; near-random
# weights make that visible (without mirroring: 99.96% of hippocampus_001's voxels agree)
"$py" - "$in" "$work/out_nn" "$work/out_nn1" "$work/out_ms" <<'PY'
import sys
from pathlib import Path
import nibabel as nib
import numpy as np
inputs = sorted(Path(sys.argv[1]).glob("*_0000.nii.gz"))
outs = {name: Path(d) for name, d in zip(["nnunetv2", "nnunetv2 -npp 1 -nps 1", "medseg"], sys.argv[2:])}
same = total = 0
for f in inputs:
    case = f.name[:-len("_0000.nii.gz")]
    shape = nib.load(f).shape
    labels = {}
    for name, d in outs.items():
        img = nib.load(d / f"{case}.nii.gz")
        assert img.shape == shape, f"{name} {case}: shape {img.shape}, input {shape}"
        labels[name] = np.asarray(img.dataobj)
    same += int((labels["nnunetv2"] == labels["medseg"]).sum())
    total += labels["medseg"].size
for name, d in outs.items():
    n = len(list(d.glob("*.nii.gz")))
    assert n == len(inputs), f"{name}: {n} outputs for {len(inputs)} inputs"
    print(f"{name}: {n} label maps, each on its input's grid")
print(f"voxels with the same label, nnunetv2 vs medseg: {same / total:.5f}")
PY

"$py" - "$repeats" "${nn_default[@]}" "${nn_single[@]}" "${ms[@]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); v = [float(x) for x in sys.argv[2:]]
nd, n1, ms = statistics.median(v[:n]), statistics.median(v[n:2 * n]), statistics.median(v[2 * n:])
best = min(nd, n1)
print(f"median: nnunetv2 {nd:.1f} s (-npp 1 -nps 1: {n1:.1f} s), medseg {ms:.1f} s; "
      f"nnunetv2 (faster setting) / medseg = {best / ms:.2f}")
PY
