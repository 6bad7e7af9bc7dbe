#!/usr/bin/env bash
# Learning parity on CPU: medseg and nnunetv2 2.8.1 trained side by side on Hippocampus fold 0 with the same plan
# (3d_fullres [40, 56, 40], base features 8: 8-16-32-64, batch 4, the plan's batch Dice), nnU-Net's recipe (SGD
# lr 1e-2 momentum 0.99 Nesterov, poly, Dice+CE with deep supervision, nnU-Net's augmentation) and the same budget,
# for several budgets and seeds in one run. Reports the final validation Dice per class (44 held-out cases, final
# weights, mirroring, original geometry): mean and spread over seeds, and how often each class was learned.
#
# Usage: benchmarks/nnunet_parity_cpu.sh [Task04 folder] [work dir]
# Env: BUDGETS (iterations, "600 1500"), ITERS (per epoch, 100), SEEDS ("12345 1 2"), FRAMEWORKS ("medseg nnunet"),
#      NNUNET_VENV (/tmp/nnunet_venv, made by benchmarks/nnunet_venv.sh), MEDSEG_EXTRA (extra medseg overrides).
# Each (framework, budget, seed) writes $WORK/results/<framework>_<budget>_<seed>.json; finished ones are kept, so
# an interrupted run continues. About 10 minutes per 600 iterations per framework on 2 idle cores.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$(cd "${1:-$REPO/../shared/data/Task04_Hippocampus}" && pwd)"
WORK="$(mkdir -p "${2:-/tmp/parity_cpu}" && cd "${2:-/tmp/parity_cpu}" && pwd)"
BUDGETS="${BUDGETS:-600 1500}"
ITERS="${ITERS:-100}"
SEEDS="${SEEDS:-12345 1 2}"
FRAMEWORKS="${FRAMEWORKS:-medseg nnunet}"
NNUNET_VENV="${NNUNET_VENV:-/tmp/nnunet_venv}"
mkdir -p "$WORK/results" "$WORK/logs"
MEDSEG_TRAIN="${MEDSEG_TRAIN:-$(command -v medseg-train)}"

export nnUNet_raw="$WORK/nn_raw" nnUNet_preprocessed="$WORK/nn_pre" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}"
nnpy="$NNUNET_VENV/bin/python"
if [[ " $FRAMEWORKS " == *" nnunet "* && ! -f "$nnUNet_preprocessed/Dataset004_Hippocampus/nnUNetPlans_cpu8.json" ]]; then
  rm -rf "$nnUNet_raw" && "$nnpy" "$REPO/benchmarks/nnunet_raw.py" "$DATA" "$nnUNet_raw" > /dev/null
  nnUNet_results="$WORK/nn_results" "$NNUNET_VENV/bin/nnUNetv2_plan_and_preprocess" -d 4 -c 3d_fullres -np 2 -npfp 2 \
    > "$WORK/logs/nnunet_plan.log" 2>&1
  # the same plan as medseg's planner.base_features=8 planner.batch_size=4: nnU-Net's own, narrower and batch 4
  "$nnpy" - "$nnUNet_preprocessed/Dataset004_Hippocampus" <<'PY'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
plans = json.loads((folder / "nnUNetPlans.json").read_text())
plans["plans_name"] = "nnUNetPlans_cpu8"
config = plans["configurations"]["3d_fullres"]
stages = config["architecture"]["arch_kwargs"]["n_stages"]
config["architecture"]["arch_kwargs"]["features_per_stage"] = [min(8 * 2**i, 320) for i in range(stages)]
config["batch_size"] = 4
(folder / "nnUNetPlans_cpu8.json").write_text(json.dumps(plans, indent=2))
print("nnU-Net plan:", config["patch_size"], config["architecture"]["arch_kwargs"]["features_per_stage"],
      "batch", config["batch_size"], "batch_dice", config["batch_dice"])
PY
fi

for budget in $BUDGETS; do
  epochs=$((budget / ITERS))
  for seed in $SEEDS; do
    for fw in $FRAMEWORKS; do
      result="$WORK/results/${fw}_${budget}_${seed}.json"
      [ -f "$result" ] && continue
      log="$WORK/logs/${fw}_${budget}_${seed}.log"
      start=$(date +%s)
      if [ "$fw" = medseg ]; then
        name="parity_${budget}_${seed}"
        "$MEDSEG_TRAIN" data=msd data.root="$DATA" trainer=cpu planner.base_features=8 planner.batch_size=4 \
          sampling.iterations_per_epoch="$ITERS" trainer.max_epochs="$epochs" seed="$seed" experiment_name="$name" \
          paths.output="$WORK/medseg_out" paths.preprocessed="$WORK/medseg_pre" callbacks.progress=plain \
          hydra.run.dir="$WORK/hydra/$name" ${MEDSEG_EXTRA:-} > "$log" 2>&1
        metrics="$WORK/medseg_out/$name/unet__dice_ce/fold_0/metrics.json"
        python3 - "$metrics" "$result" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
m = json.loads(open(sys.argv[1]).read())
json.dump({"dice": m["dice"], "wall_s": int(sys.argv[3])}, open(sys.argv[2], "w"))
PY
      else
        nnUNet_results="$WORK/nn_results/${budget}_${seed}" "$nnpy" "$REPO/benchmarks/nnunet_train_budget.py" \
          4 3d_fullres 0 nnUNetPlans_cpu8 "$epochs" "$ITERS" "$seed" cpu > "$log" 2>&1
        summary=$(sed -n 's/^summary: //p' "$log")
        "$nnpy" - "$summary" "$DATA/dataset.json" "$result" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
summary, names = json.loads(open(sys.argv[1]).read()), json.loads(open(sys.argv[2]).read())["labels"]
dice = {names[k]: v["Dice"] for k, v in summary["mean"].items()}
json.dump({"dice": dice, "wall_s": int(sys.argv[4])}, open(sys.argv[3], "w"))
PY
      fi
      echo "$fw budget $budget seed $seed: $(cat "$result")"
    done
  done
done

python3 "$REPO/benchmarks/parity_cpu_report.py" "$WORK/results" | tee "$WORK/report.md"
