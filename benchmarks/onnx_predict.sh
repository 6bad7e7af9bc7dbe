#!/usr/bin/env bash
# Prediction of 40 Hippocampus volumes on the CPU with the same weights three ways, same run, same machine:
# medseg-predict backend=torch, medseg-predict backend=onnxruntime (the networks exported to ONNX by medseg-export
# format=onnx, run by onnxruntime inside medseg's sliding window) and, where nnunetv2 2.8.1's virtual environment
# exists ($NNUNET_VENV, default /tmp/nnunet_venv; it is not created here), nnUNetv2_predict with the weights copied
# into nnU-Net's own network. Each command timed from process start to exit, runs alternating; prints each time,
# the medians and the ratios, and whether the torch and onnxruntime label maps are identical voxel for voxel.
#
# The setup is predict_hippocampus.sh's (its inputs, its one-iteration checkpoint, predict_make_models.py's weight
# copy for nnU-Net); the torch and onnxruntime runs read the same medseg-export archive / ONNX export of it.
# All: overlap (step) 0.5, Gaussian weighting, mirroring on all 3 axes.
# Usage: benchmarks/onnx_predict.sh [path/to/Task04_Hippocampus] [repeats] [cases]
set -euo pipefail
data=$(cd "${1:-../shared/data/Task04_Hippocampus}" && pwd)
repeats=${2:-3}
cases=${3:-40}
here=$(cd "$(dirname "$0")" && pwd)
bin=$(dirname "$(command -v medseg-predict)")
py="$bin/python"  # medseg's interpreter
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # anything written to a relative default path lands here
run_quiet() { "$@" > "$work/setup.log" 2>&1 || { cat "$work/setup.log"; exit 1; }; }
venv=${NNUNET_VENV:-/tmp/nnunet_venv}
nnunet=false
[ -x "$venv/bin/nnUNetv2_predict" ] && nnunet=true

echo "== model"
# as predict_hippocampus.sh: plan, preprocess and one training iteration give a checkpoint carrying its plan
run_quiet "$bin/medseg-train" data=msd data.root="$data" trainer.max_epochs=1 sampling.iterations_per_epoch=1 \
  validation.final=false validation.max_cases_per_epoch=1 paths.output="$work/medseg_out" \
  paths.preprocessed="$work/medseg_pre"
run="$work/medseg_out/Task04_Hippocampus/unet__dice_ce"
fold="$run/fold_0"
# a finished fold is one with metrics.json; validation.final=false leaves it out, and a timing run needs no score
echo '{"fold": 0, "note": "one-iteration benchmark weights"}' > "$fold/metrics.json"
"$bin/medseg-export" run_dir="$run" output="$work/hippo.zip" | tail -1
"$bin/medseg-export" run_dir="$work/hippo.zip" output="$work/onnx" format=onnx name=hippo | tail -1

if $nnunet; then
  raw=$("$py" "$here/nnunet_raw.py" "$data" "$work/raw")
  export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/nnunet_pp" nnUNet_results="$work/nnunet_results"
  run_quiet "$venv/bin/nnUNetv2_extract_fingerprint" -d 4 -np 2
  run_quiet "$venv/bin/nnUNetv2_plan_experiment" -d 4
  nn_plans="$nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans.json"
  "$py" "$here/predict_make_models.py" compare-plans "$nn_plans" "$work/medseg_pre/Task04_Hippocampus/plans.json"
  "$py" "$here/predict_make_models.py" medseg-logits "$fold/checkpoints/last.ckpt" "$work/medseg_logits.pt" \
    2> /dev/null
  "$venv/bin/python" "$here/predict_make_models.py" nnunet-folder "$fold/checkpoints/last.ckpt" "$nn_plans" \
    "$raw/dataset.json" "$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres" \
    "$work/medseg_logits.pt"
else
  echo "(no nnunetv2 at $venv: nnUNetv2_predict left out)"
fi

in="$work/in"
mkdir -p "$in"
for f in $(ls "$data"/imagesTr/*.nii.gz | sort | head -n "$cases"); do
  ln -s "$f" "$in/$(basename "$f" .nii.gz)_0000.nii.gz"
done
echo "== $(ls "$in" | wc -l) inputs: $(ls "$in" | head -1) ... $(ls "$in" | tail -1)"

seconds() { local t0; t0=$(date +%s.%N); "$@" > "$work/last.log" 2>&1 || { cat "$work/last.log"; exit 1; }
            echo "$(date +%s.%N) - $t0" | bc; }
common=(input="$in" overlap=0.5 mirror_axes=all device=cpu paths.output="$work/medseg_predict")
t_torch=(); t_onnx=(); t_nn=()
for i in $(seq "$repeats"); do
  rm -rf "$work"/out_*
  t_torch+=("$(seconds "$bin/medseg-predict" model_file="$work/hippo.zip" backend=torch output="$work/out_torch" \
    "${common[@]}")")
  t_onnx+=("$(seconds "$bin/medseg-predict" model_file="$work/onnx/hippo.json" backend=onnxruntime \
    output="$work/out_onnx" "${common[@]}")")
  if $nnunet; then
    t_nn+=("$(seconds "$venv/bin/nnUNetv2_predict" -i "$in" -o "$work/out_nn" -d 4 -c 3d_fullres -f 0 \
      -step_size 0.5 -device cpu --disable_progress_bar -npp 1 -nps 1)")
  fi
  echo "run $i: medseg torch ${t_torch[-1]} s, medseg onnxruntime ${t_onnx[-1]} s${t_nn:+, nnunetv2 ${t_nn[-1]} s}"
done

echo "== outputs (last run)"
"$py" - "$in" "$work/out_torch" "$work/out_onnx" "$work/out_nn" <<'PY'
import sys
from pathlib import Path
import nibabel as nib
import numpy as np
inputs = sorted(Path(sys.argv[1]).glob("*_0000.nii.gz"))
torch_dir, onnx_dir, nn_dir = (Path(d) for d in sys.argv[2:])
differ = same_nn = total = 0
identical = 0
for f in inputs:
    case = f.name[:-len("_0000.nii.gz")]
    a = np.asarray(nib.load(torch_dir / f"{case}.nii.gz").dataobj)
    b = np.asarray(nib.load(onnx_dir / f"{case}.nii.gz").dataobj)
    assert a.shape == b.shape == nib.load(f).shape, case
    differ += int((a != b).sum())
    identical += int((a == b).all())
    total += a.size
    if nn_dir.is_dir():
        same_nn += int((np.asarray(nib.load(nn_dir / f"{case}.nii.gz").dataobj) == a).sum())
print(f"torch vs onnxruntime: {identical}/{len(inputs)} label maps identical, {differ} of {total} voxels differ")
if nn_dir.is_dir():
    print(f"voxels with the same label, nnunetv2 vs medseg torch: {same_nn / total:.5f} (informative only; "
          "see predict_hippocampus.sh on mirrored padding)")
PY

"$py" - "$repeats" "${t_torch[@]}" "${t_onnx[@]}" "${t_nn[@]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); v = [float(x) for x in sys.argv[2:]]
torch_s, onnx_s = statistics.median(v[:n]), statistics.median(v[n:2 * n])
line = f"median: medseg torch {torch_s:.1f} s, medseg onnxruntime {onnx_s:.1f} s (onnxruntime / torch = {onnx_s / torch_s:.2f})"
if len(v) > 2 * n:
    nn = statistics.median(v[2 * n:])
    line += f", nnunetv2 -npp 1 -nps 1 {nn:.1f} s (nnunetv2 / medseg torch = {nn / torch_s:.2f})"
print(line)
PY
