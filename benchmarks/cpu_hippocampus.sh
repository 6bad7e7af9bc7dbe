#!/usr/bin/env bash
# Fold 0 of Hippocampus (220 cases, 44 held out) on CPU with the cpu_hippocampus experiment; prints wall
# time and the fold's validation Dice. Usage: benchmarks/cpu_hippocampus.sh [path/to/Task04_Hippocampus] [workdir]
set -euo pipefail
data=${1:-../shared/data/Task04_Hippocampus}
work=${2:-$(mktemp -d)}
data=$(cd "$data" && pwd)
cd "$work"
start=$(date +%s)
medseg-train experiment=cpu_hippocampus data.root="$data" fold=0 ++trainer.enable_progress_bar=false "${@:3}"
end=$(date +%s)
echo "wall seconds: $((end - start)) (plan + preprocess + train + full-volume validation)"
python - "$work" <<'PY'
import json, sys, pathlib
from medseg.atomic import number  # metrics.json writes a Dice that does not exist as null
m = json.loads(next(pathlib.Path(sys.argv[1]).glob("outputs/*/unet__dice_ce/fold_0/metrics.json")).read_text())
print("validation Dice per class:", {k: round(number(v), 4) for k, v in m["dice"].items()},
      "mean:", round(number(m["dice_mean"]), 4), "cases:", m["num_cases"])
PY
