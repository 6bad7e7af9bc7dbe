#!/usr/bin/env bash
# 2D pictures on real data: the Hippocampus pictures of benchmarks/hippocampus_2d.py (one most-labelled slice per
# case, 8-bit) trained as PNG files and as one-slice NIfTI files, configuration=2d, fold 0 (176 training, 44
# held-out pictures), the cpu_hippocampus recipe, the same seed. Predictions of the held-out pictures are written
# in each dataset's own format and scored with medseg-evaluate against its own references.
# Usage: benchmarks/hippocampus_2d.sh [Task04 folder] [work dir] [extra medseg-train overrides...]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$(cd "${1:-$REPO/../shared/data/Task04_Hippocampus}" && pwd)"
WORK="$(mkdir -p "${2:-/tmp/hippocampus_2d}" && cd "${2:-/tmp/hippocampus_2d}" && pwd)"
[ -d "$WORK/raw" ] || python "$REPO/benchmarks/hippocampus_2d.py" "$DATA" "$WORK/raw"
cd "$WORK"
for dataset in Dataset007_HippocampusPNG Dataset008_HippocampusSlice; do
  start=$(date +%s)
  medseg-plan data=nnunet_raw data.root="$WORK/raw/$dataset" planner.base_features=8 > "$WORK/$dataset.plan.log" 2>&1
  medseg-train experiment=cpu_hippocampus data=nnunet_raw data.root="$WORK/raw/$dataset" configuration=2d fold=0 \
    callbacks.progress=plain "${@:3}" > "$WORK/$dataset.log" 2>&1
  fold=$(dirname "$(find "$WORK/outputs/$dataset" -path '*fold_0/metrics.json' | head -1)")
  # the references of the held-out pictures, beside their predictions
  rm -rf "$WORK/ref_$dataset" && mkdir "$WORK/ref_$dataset"
  for pred in "$fold"/validation/hippocampus_*; do ln -s "$WORK/raw/$dataset/labelsTr/$(basename "$pred")" "$WORK/ref_$dataset/"; done
  medseg-evaluate pred="$fold/validation" ref="$WORK/ref_$dataset" labels="$WORK/raw/$dataset/dataset.json" \
    output="$WORK/eval_$dataset" > /dev/null
  echo "$dataset: $(( $(date +%s) - start )) s, $(grep -m1 '^2d:' "$WORK/$dataset.plan.log")"
done
python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| training data | Anterior | Posterior | mean | held-out pictures |")
print("|---|---|---|---|---|")
for name in ("Dataset007_HippocampusPNG", "Dataset008_HippocampusSlice"):
    s = json.loads((work / f"eval_{name}" / "summary.json").read_text())
    d = s["dice"]
    print(f"| {name} | {d['Anterior']:.4f} | {d['Posterior']:.4f} | {s['dice_mean']:.4f} | {s['num_cases']} |")
PY
