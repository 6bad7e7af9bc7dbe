#!/usr/bin/env bash
# Training parity on one GPU: medseg against nnunetv2 2.8.1 on MSD Task04 Hippocampus, 3d_fullres plan, fold 0,
# 10 epochs x 250 iterations per run, like with like in two modes:
#   eager     medseg compile=false   nnU-Net nnUNet_compile=f
#   compiled  medseg compile=true    nnU-Net nnUNet_compile=t  (torch.compile: CUDA and triton; nnU-Net 2.8.1
#                                    compiles by default on CUDA and never on CPU)
# Runs one after another on the same GPU (per mode: medseg, then nnU-Net) and writes to $OUT the logs, the
# result files and report.md (parity_report.py): per framework and mode the median epoch time, the data wait in
# it, the peak GPU memory and the fold-0 validation Dice per class and mean (final weights, mirroring, original
# geometry), and the medseg / nnU-Net ratios of eager against eager and compiled against compiled.
# Where the compiled mode cannot run (no CUDA, no triton) its runs are skipped and report.md says why.
# Exits 1 if a run that was not skipped failed (report.md is written all the same).
#
# On the GPU machine (no network): carry .gpu (scripts/gpu/make_bundle.sh builds it), then
#   bash scripts/gpu/parity_hippocampus.sh
# Env knobs:
#   MODES ("eager compiled"), FRAMEWORKS ("medseg nnunet"): a subset, e.g. to spread the runs over several calls;
#     parity_report.py OUT1 OUT2 ... then reports them together
#   EPOCHS (10), NNUNET_TRAINER (nnUNetTrainer_10epochs; its epochs must be EPOCHS), MEDSEG_EXTRA (extra
#   medseg-train overrides), NNUNET_ITERATIONS (iterations per nnU-Net epoch instead of 250: rehearsals only),
#   NNUNET_DEVICE (cuda where torch sees one, else cpu), NNUNET_TIMEOUT (seconds per nnU-Net training, 0 = none),
#   NP (processes for preprocessing, 16), DATA (Task04 folder; unset: .gpu/unpack.sh's /tmp/data/...),
#   PY (python3), SITE (the bundle's site, /tmp/site), OUT (/tmp/parity_out), WORK (/tmp/parity),
#   COMPILED_ON_CPU (1: run the compiled mode without CUDA too; medseg compiles there, nnU-Net stays eager and
#   report.md says so). scripts/gpu/rehearse_cpu.sh runs all of it on CPU with a tiny budget.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/parity_out}"
WORK="${WORK:-/tmp/parity}"
MODES="${MODES:-eager compiled}"
FRAMEWORKS="${FRAMEWORKS:-medseg nnunet}"
EPOCHS="${EPOCHS:-10}"
NP="${NP:-16}"
NNUNET_TIMEOUT="${NNUNET_TIMEOUT:-0}"
PY="${PY:-python3}"
export NNUNET_TRAINER="${NNUNET_TRAINER:-nnUNetTrainer_10epochs}" NNUNET_ITERATIONS="${NNUNET_ITERATIONS:-}"
mkdir -p "$OUT" "$WORK"
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
for m in $MODES; do case $m in eager|compiled) ;; *) echo "MODES: unknown mode $m" >&2; exit 2 ;; esac; done
for f in $FRAMEWORKS; do case $f in medseg|nnunet) ;; *) echo "FRAMEWORKS: unknown $f" >&2; exit 2 ;; esac; done
case $NNUNET_TRAINER in  # nnU-Net's fixed-length trainers: the same number of epochs as medseg
  "nnUNetTrainer_${EPOCHS}epoch" | "nnUNetTrainer_${EPOCHS}epochs") ;;
  nnUNetTrainer_*epoch | nnUNetTrainer_*epochs) echo "$NNUNET_TRAINER does not train EPOCHS=$EPOCHS epochs" >&2; exit 2 ;;
esac

# The import check (unpack.sh runs it) leaves triton to the compiled mode's own check below, which skips the
# compiled runs rather than failing the eager ones.
if [ -z "${DATA:-}" ]; then
  PYTHON="$PY" CHECK_TRITON=no bash .gpu/unpack.sh
  DATA=/tmp/data/Task04_Hippocampus SITE=/tmp/site
  export PYTHONPATH="$SITE:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="${SITE:-/tmp/site}:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" scripts/gpu/check_imports.py --triton no
fi
rm -f "$OUT"/*.skipped
cp "$DATA/dataset.json" "$OUT/dataset.json"  # label names for the report
"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import importlib.metadata as m, os, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
try:
    triton = m.version("triton")
except m.PackageNotFoundError:
    triton = "none"
print(f"device {dev}, {os.cpu_count()} CPUs; torch {torch.__version__}; triton {triton}; lightning "
      f"{m.version('lightning')}; monai {m.version('monai')}; nnunetv2 {m.version('nnunetv2')}")
EOF
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
NNUNET_DEVICE="${NNUNET_DEVICE:-$([ "$CUDA" = 1 ] && echo cuda || echo cpu)}"
EPOCHS="$EPOCHS" MODES="$MODES" FRAMEWORKS="$FRAMEWORKS" NNUNET_DEVICE="$NNUNET_DEVICE" MEDSEG_EXTRA="${MEDSEG_EXTRA:-}" \
  "$PY" -c '
import json, os, sys
keys = ("EPOCHS", "MODES", "FRAMEWORKS", "MEDSEG_EXTRA", "NNUNET_TRAINER", "NNUNET_ITERATIONS", "NNUNET_DEVICE")
json.dump({k.lower(): os.environ.get(k, "") for k in keys}, sys.stdout)' > "$OUT/settings.json"

# ---- compiled mode: possible here? ----------------------------------------------------------------------------
skip_compiled=""
case " $MODES " in *" compiled "*)
  if [ "$CUDA" != 1 ] && [ "${COMPILED_ON_CPU:-0}" != 1 ]; then
    skip_compiled="no CUDA device: nnU-Net 2.8.1 never compiles on CPU (nnUNetTrainer._do_i_compile), so there is no compiled pair to compare (COMPILED_ON_CPU=1 runs it anyway)"
  elif [ "$CUDA" = 1 ] && ! err=$("$PY" -c 'import triton' 2>&1); then
    skip_compiled="triton does not import, torch.compile cannot build GPU kernels: $(tail -1 <<<"$err")"
  fi
esac
if [ -n "$skip_compiled" ]; then
  echo "$skip_compiled" > "$OUT/compiled.skipped"
  echo "compiled runs skipped: $skip_compiled"
fi

failed=()
run_medseg() {  # run_medseg MODE
  local mode=$1 compile=false t0 metrics
  if [ "$mode" = compiled ]; then compile=true; fi
  rm -rf "$WORK/medseg_$mode"
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # MEDSEG_EXTRA: several overrides
  if ! "$PY" -m medseg.cli.train data=msd data.root="$DATA" trainer.max_epochs="$EPOCHS" callbacks.progress=plain \
      compile="$compile" num_processes="$NP" paths.output="$WORK/medseg_$mode/out" \
      paths.preprocessed="$WORK/medseg_pre" hydra.run.dir="$WORK/medseg_$mode/hydra" ${MEDSEG_EXTRA:-} \
      2>&1 | tee "$OUT/medseg_$mode.log"; then
    echo "medseg $mode failed" | tee -a "$OUT/medseg_$mode.log"; failed+=("medseg $mode")
  fi
  echo "medseg $mode wall $(elapsed "$t0") s" | tee -a "$OUT/medseg_$mode.log"
  metrics=$(find "$WORK/medseg_$mode/out" -path '*fold_0/metrics.json' 2>/dev/null | head -1)
  if [ -n "$metrics" ]; then
    cp "$metrics" "$OUT/medseg_${mode}_metrics.json"
    cp "$(dirname "$metrics")/config.yaml" "$OUT/medseg_${mode}_config.yaml"
  fi
}

nnunet_prepared=0
prepare_nnunet() {
  export nnUNet_raw="$WORK/nn_raw" nnUNet_preprocessed="$WORK/nn_pre"
  rm -rf "$nnUNet_raw" "$nnUNet_preprocessed"
  "$PY" "$REPO/benchmarks/nnunet_raw.py" "$DATA" "$nnUNet_raw" > /dev/null
  local t0
  t0=$(date +%s.%N)
  # an nnU-Net console entry point by module (the bundle installs no scripts)
  "$PY" -c "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry as f; sys.argv = ['nnunet'] + sys.argv[1:]; f()" \
    -d 4 -c 3d_fullres -np "$NP" -npfp "$NP" > "$OUT/nnunet_plan.log" 2>&1 || { tail -20 "$OUT/nnunet_plan.log"; return 1; }
  echo "nnunet plan+preprocess $(elapsed "$t0") s" | tee -a "$OUT/nnunet_plan.log"
}

run_nnunet() {  # run_nnunet MODE
  local mode=$1 flag=f t0 summary limit=()
  if [ "$mode" = compiled ]; then flag=t; fi
  if [ "$nnunet_prepared" = 0 ]; then
    if prepare_nnunet; then nnunet_prepared=1; else nnunet_prepared=failed; fi
  fi
  if [ "$nnunet_prepared" != 1 ]; then
    echo "nnU-Net $mode: not run, plan+preprocess failed" | tee "$OUT/nnunet_$mode.log"; failed+=("nnunet $mode"); return
  fi
  export nnUNet_results="$WORK/nn_results_$mode"
  rm -rf "$nnUNet_results"
  if [ "$NNUNET_TIMEOUT" != 0 ]; then limit=(timeout "$NNUNET_TIMEOUT"); fi
  t0=$(date +%s.%N)
  # nnUNetv2_train, plus per-epoch lines splitting its training time into waiting for data and steps
  if ! nnUNet_compile=$flag "${limit[@]}" "$PY" "$REPO/scripts/gpu/nnunet_timed_training.py" 4 3d_fullres 0 \
      -tr "$NNUNET_TRAINER" -device "$NNUNET_DEVICE" 2>&1 | tee "$OUT/nnunet_$mode.log"; then
    echo "nnU-Net $mode failed" | tee -a "$OUT/nnunet_$mode.log"; failed+=("nnunet $mode")
  fi
  echo "nnunet $mode wall $(elapsed "$t0") s" | tee -a "$OUT/nnunet_$mode.log"
  summary="$nnUNet_results/Dataset004_Hippocampus/${NNUNET_TRAINER}__nnUNetPlans__3d_fullres/fold_0/validation/summary.json"
  if [ -f "$summary" ]; then cp "$summary" "$OUT/nnunet_${mode}_summary.json"; fi
}

for mode in $MODES; do
  if [ "$mode" = compiled ] && [ -n "$skip_compiled" ]; then continue; fi
  for fw in $FRAMEWORKS; do
    rm -f "$OUT/${fw}_${mode}".* "$OUT/${fw}_${mode}"_*
    echo "== $fw $mode"
    "run_$fw" "$mode"
  done
done

"$PY" "$REPO/scripts/gpu/parity_report.py" "$OUT" --json "$OUT/report.json" | tee "$OUT/report.md"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
