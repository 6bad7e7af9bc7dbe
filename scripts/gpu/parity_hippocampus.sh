#!/usr/bin/env bash
# Training parity on one GPU: medseg and nnunetv2 2.8.1 on MSD Task04 Hippocampus, 3d_fullres plan, fold 0,
# 10 epochs x 250 iterations each, one after the other on the same GPU. Prints (and writes to $OUT) each
# framework's epoch times, the part of each spent waiting for the data loader, and its fold-0 validation Dice
# (final weights, mirroring, original geometry) after the same number of iterations.
#
# On the GPU machine (no network): carry .gpu (scripts/gpu/make_bundle.sh builds it), then
#   bash scripts/gpu/parity_hippocampus.sh
# Takes about 6 minutes on an H100/H200 with 16 cores. Env knobs (for a quick CPU rehearsal of the script):
#   EPOCHS (10), MEDSEG_EXTRA (extra medseg-train overrides), NNUNET_TRAINER (nnUNetTrainer_10epochs),
#   NNUNET_TIMEOUT (seconds, 0 = none), NP (processes for preprocessing, 16), DATA (Task04 folder).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/parity_out}"
WORK="${WORK:-/tmp/parity}"
EPOCHS="${EPOCHS:-10}"
NP="${NP:-16}"
NNUNET_TRAINER="${NNUNET_TRAINER:-nnUNetTrainer_10epochs}"
NNUNET_TIMEOUT="${NNUNET_TIMEOUT:-0}"
PY="${PY:-python3}"
mkdir -p "$OUT" "$WORK"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

if [ -z "${DATA:-}" ]; then
  bash .gpu/unpack.sh
  DATA=/tmp/data/Task04_Hippocampus
fi
export PYTHONPATH="${SITE:-/tmp/site}:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import torch, monai, lightning, nnunetv2, importlib.metadata as m
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"device {dev}; torch {torch.__version__}; lightning {lightning.__version__}; monai {monai.__version__}; "
      f"nnunetv2 {m.version('nnunetv2')}")
EOF

# ---- medseg -------------------------------------------------------------------------------------------------
t0=$(date +%s.%N)
"$PY" -m medseg.cli.train data=msd data.root="$DATA" trainer.max_epochs="$EPOCHS" callbacks.progress=plain \
  num_processes="$NP" paths.output="$WORK/medseg_out" paths.preprocessed="$WORK/medseg_pre" \
  hydra.run.dir="$WORK/medseg_hydra" ${MEDSEG_EXTRA:-} 2>&1 | tee "$OUT/medseg.log" || echo "medseg failed"
echo "medseg wall $(elapsed "$t0") s" | tee -a "$OUT/medseg.log"
metrics=$(find "$WORK/medseg_out" -path '*fold_0/metrics.json' | head -1)
[ -n "$metrics" ] && cp "$metrics" "$OUT/medseg_metrics.json"

# ---- nnU-Net ------------------------------------------------------------------------------------------------
export nnUNet_raw="$WORK/nn_raw" nnUNet_preprocessed="$WORK/nn_pre" nnUNet_results="$WORK/nn_results"
rm -rf "$nnUNet_raw" && "$PY" "$REPO/benchmarks/nnunet_raw.py" "$DATA" "$nnUNet_raw" > /dev/null
nn() {  # run an nnU-Net console entry point by module (the bundle installs no scripts)
  local mod=$1 fn=$2; shift 2
  "$PY" -c "import sys; from $mod import $fn as f; sys.argv = ['nnunet'] + sys.argv[1:]; f()" "$@"
}
t0=$(date +%s.%N)
nn nnunetv2.experiment_planning.plan_and_preprocess_entrypoints plan_and_preprocess_entry \
  -d 4 -c 3d_fullres -np "$NP" -npfp "$NP" > "$OUT/nnunet_plan.log" 2>&1 || { tail -20 "$OUT/nnunet_plan.log"; exit 1; }
echo "nnunet plan+preprocess $(elapsed "$t0") s"
limit=()
[ "$NNUNET_TIMEOUT" != 0 ] && limit=(timeout "$NNUNET_TIMEOUT")
# nnUNetv2_train, plus one line per epoch splitting its training time into waiting for data and steps
"${limit[@]}" "$PY" "$REPO/scripts/gpu/nnunet_timed_training.py" 4 3d_fullres 0 -tr "$NNUNET_TRAINER" 2>&1 | tee "$OUT/nnunet.log" || echo "nnU-Net training stopped ($?)"
echo "nnunet wall $(elapsed "$t0") s" | tee -a "$OUT/nnunet.log"
summary=$(ls "$nnUNet_results"/Dataset004_Hippocampus/"$NNUNET_TRAINER"__nnUNetPlans__3d_fullres/fold_0/validation/summary.json 2>/dev/null || true)
[ -n "$summary" ] && cp "$summary" "$OUT/nnunet_summary.json"

"$PY" "$REPO/scripts/gpu/parity_report.py" "$OUT" | tee "$OUT/report.md"
