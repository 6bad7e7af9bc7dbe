#!/usr/bin/env bash
# Label schemes on real data: Hippocampus fold 0 trained three ways with the cpu_hippocampus experiment, the
# same budget and seed: ordinary labels, the same labels as nnU-Net regions (hippocampus = [1, 2], posterior =
# [2]), and sparse annotation (every 3rd slice annotated, the rest the ignore label). Each run's final validation
# predictions (44 held-out cases, original geometry) are scored against the FULL reference labels, per region
# and per label (medseg-evaluate per_label=true), so the three are compared on the same question.
# Usage: benchmarks/label_variants.sh [Task04 folder] [work dir] [extra medseg-train overrides...]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$(cd "${1:-$REPO/../shared/data/Task04_Hippocampus}" && pwd)"
WORK="$(mkdir -p "${2:-/tmp/label_variants}" && cd "${2:-/tmp/label_variants}" && pwd)"
[ -d "$WORK/raw" ] || python "$REPO/benchmarks/label_variants_hippocampus.py" "$DATA" "$WORK/raw"
cd "$WORK"
for dataset in Dataset004_Labels Dataset005_Regions Dataset006_Sparse; do
  start=$(date +%s)
  medseg-train experiment=cpu_hippocampus data=nnunet_raw data.root="$WORK/raw/$dataset" fold=0 \
    callbacks.progress=plain "${@:3}" > "$WORK/$dataset.log" 2>&1
  fold=$(dirname "$(find "$WORK/outputs/$dataset" -path '*fold_0/metrics.json' | head -1)")
  # the full reference labels of the held-out cases, beside their predictions
  rm -rf "$WORK/ref_$dataset" && mkdir "$WORK/ref_$dataset"
  for pred in "$fold"/validation/*.nii.gz; do ln -s "$DATA/labelsTr/$(basename "$pred")" "$WORK/ref_$dataset/"; done
  medseg-evaluate pred="$fold/validation" ref="$WORK/ref_$dataset" labels="$WORK/raw/Dataset005_Regions/dataset.json" \
    per_label=true output="$WORK/eval_$dataset" > /dev/null
  echo "$dataset: $(( $(date +%s) - start )) s"
done
python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| training labels | hippocampus [1, 2] | posterior [2] | Anterior (label 1) | Posterior (label 2) |")
print("|---|---|---|---|---|")
for name in ("Dataset004_Labels", "Dataset005_Regions", "Dataset006_Sparse"):
    dice = json.loads((work / f"eval_{name}" / "summary.json").read_text())["dice"]
    print(f"| {name} | " + " | ".join(f"{dice[k]:.4f}" for k in ("hippocampus", "posterior", "label_1", "label_2")) + " |")
PY
