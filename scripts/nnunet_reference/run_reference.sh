#!/usr/bin/env bash
# Regenerate medseg's nnU-Net reference plans (tests/planning/fixtures/nnunet_*.json) with the real nnunetv2 2.8.1.
#
# Prerequisite (not done here):
#   python3.11 -m venv /tmp/nnunet_venv
#   /tmp/nnunet_venv/bin/pip install torch==2.13.0 nnunetv2==2.8.1
# Install both in ONE pip call: installing nnunetv2 in a second call lets pip pick torchvision 0.29 (via timm), which
# needs torch>=2.14 and silently replaces the CPU torch 2.13.0 by a multi-GB CUDA build.  With the single call pip
# picks torchvision 0.28.0, whose import fails against torch 2.13.0+cpu ("operator torchvision::nms does not
# exist"); that only breaks nnU-Net's Primus trainers, planning is unaffected.  The plans do not depend on the
# torch version (checked: torch 2.14.1 and 2.13.0 gave byte-identical fixtures for aniso_mri and mri_mask).
#
# Usage: scripts/nnunet_reference/run_reference.sh [dataset ...]
#   datasets: aniso_mri ct large_lowres mri_mask hippocampus (default: all)
# Env overrides: VENV (/tmp/nnunet_venv), WORK (/tmp/nnunet_ref), HIPPO (<repo>/../shared/data/Task04_Hippocampus)
# Runs single-process (-np 1, 1 thread); total ~10-15 min on 2 cores, ~0.4 GB of data under $WORK.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-/tmp/nnunet_venv}"
WORK="${WORK:-/tmp/nnunet_ref}"
HIPPO="${HIPPO:-$(cd "$REPO/.." && pwd)/shared/data/Task04_Hippocampus}"
OUT="$REPO/tests/planning/fixtures"
PY="$VENV/bin/python"

export nnUNet_raw="$WORK/nnUNet_raw"
export nnUNet_preprocessed="$WORK/nnUNet_preprocessed"
export nnUNet_results="$WORK/nnUNet_results"
# keep CPU use modest: one worker, one thread (the planner sets torch threads to nnUNet_n_proc_DA)
export nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$OUT"

"$PY" -c "import importlib.metadata as m; v=m.version('nnunetv2'); assert v=='2.8.1', v"

declare -A NAME=( [aniso_mri]=Dataset501_AnisoMRI [ct]=Dataset502_SynthCT [large_lowres]=Dataset503_LargeLowres
                  [mri_mask]=Dataset504_MRIMask [hippocampus]=Dataset004_Hippocampus )
declare -A ID=( [aniso_mri]=501 [ct]=502 [large_lowres]=503 [mri_mask]=504 [hippocampus]=4 )
# planners per dataset: default everywhere, ResEnc M/L everywhere too (cheap)
PLANNERS=(ExperimentPlanner nnUNetPlannerResEncM nnUNetPlannerResEncL)
declare -A PLANS_OF=( [ExperimentPlanner]=nnUNetPlans [nnUNetPlannerResEncM]=nnUNetResEncUNetMPlans
                      [nnUNetPlannerResEncL]=nnUNetResEncUNetLPlans )

make_hippocampus_raw() {
  # The MSD folder is read-only and has no imagesTs, so nnUNetv2_convert_MSD_dataset cannot be used; build the
  # equivalent raw layout (what the converter would produce for 3D single-channel images) with symlinks.
  local dst="$nnUNet_raw/Dataset004_Hippocampus"
  [ -f "$dst/dataset.json" ] && return 0
  mkdir -p "$dst/imagesTr" "$dst/labelsTr"
  local f b
  for f in "$HIPPO"/imagesTr/*.nii.gz; do
    b="$(basename "$f" .nii.gz)"; case "$b" in .*|_*) continue;; esac
    ln -sf "$f" "$dst/imagesTr/${b}_0000.nii.gz"
  done
  for f in "$HIPPO"/labelsTr/*.nii.gz; do
    b="$(basename "$f")"; case "$b" in .*|_*) continue;; esac
    ln -sf "$f" "$dst/labelsTr/$b"
  done
  "$PY" - "$HIPPO/dataset.json" "$dst/dataset.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
out = {"channel_names": d["modality"], "labels": {v: int(k) for k, v in d["labels"].items()},
       "numTraining": len(d["training"]), "file_ending": ".nii.gz", "name": d.get("name", "Hippocampus")}
json.dump(out, open(sys.argv[2], "w"), indent=2)
EOF
}

DATASETS=("$@")
[ ${#DATASETS[@]} -eq 0 ] && DATASETS=(aniso_mri ct large_lowres mri_mask hippocampus)

for ds in "${DATASETS[@]}"; do
  echo "=== $ds (${NAME[$ds]})"
  if [ "$ds" = hippocampus ]; then
    make_hippocampus_raw
  else
    nice -n 10 "$PY" "$HERE/make_datasets.py" --raw "$nnUNet_raw" --only "$ds"
  fi
  nice -n 10 "$VENV/bin/nnUNetv2_extract_fingerprint" -d "${ID[$ds]}" -np 1 --clean
  plans=()
  for pl in "${PLANNERS[@]}"; do
    # save_plans() merges configurations of an existing plans file: start from scratch
    rm -f "$nnUNet_preprocessed/${NAME[$ds]}/${PLANS_OF[$pl]}.json"
    nice -n 10 "$VENV/bin/nnUNetv2_plan_experiment" -d "${ID[$ds]}" -pl "$pl" > "$WORK/plan_${ds}_${pl}.log" 2>&1 \
      || { tail -30 "$WORK/plan_${ds}_${pl}.log"; exit 1; }
    plans+=("${PLANS_OF[$pl]}")
  done
  "$PY" "$HERE/export_fixtures.py" --raw "$nnUNet_raw" --preprocessed "$nnUNet_preprocessed" --out "$OUT" \
    --dataset "$ds:${NAME[$ds]}" --plans "${plans[@]}"
done
