#!/usr/bin/env bash
# From cross-validation to the deployed model on real data: Hippocampus, 5 folds of `2d` and of `3d_fullres` with
# the cpu_hippocampus network on a short schedule (EPOCHS x ITERS iterations of batch 4 per fold), each fold keeping
# its held-out probabilities; then medseg-select ranks 2d, 3d_fullres and their ensemble. Last, the selection's
# recipe (medseg-predict with the chosen runs, the validation's overlap and mirroring, no post-processing) is run
# on fold 0's held-out cases with fold 0's models, and its Dice is compared with the ensemble's out-of-fold Dice
# on those cases as selection computed it from the stored probabilities (target: within 1e-4).
# Usage: benchmarks/select_hippocampus.sh [Task04 folder] [work dir] [extra medseg-train overrides...]
# Env: EPOCHS (3), ITERS (100), FOLDS (0,1,2,3,4), BATCH_2D (160)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$(cd "${1:-$REPO/../shared/data/Task04_Hippocampus}" && pwd)"
WORK="$(mkdir -p "${2:-/tmp/select_hippocampus}" && cd "${2:-/tmp/select_hippocampus}" && pwd)"
EPOCHS="${EPOCHS:-3}"; ITERS="${ITERS:-100}"; FOLDS="${FOLDS:-0,1,2,3,4}"
EXPERIMENT="$WORK/outputs/Task04_select"
cd "$WORK"
start=$(date +%s)
# 2d: 160 slices per batch, the voxels of the 3d batch (4 x [40, 56, 40] = 160 x [56, 40]); the plan's 2d batch (309)
# is sized for a GPU, and planner.batch_size forces 3d_fullres only
for configuration in 3d_fullres 2d; do
  batch=$([ "$configuration" = 2d ] && echo "sampling.batch_size=${BATCH_2D:-160}" || echo "sampling.batch_size=null")
  medseg-train -m experiment=cpu_hippocampus data.root="$DATA" configuration="$configuration" fold="$FOLDS" "$batch" \
    trainer.max_epochs="$EPOCHS" sampling.iterations_per_epoch="$ITERS" validation.save_probabilities=true \
    experiment_name=Task04_select paths.output="$WORK/outputs" paths.preprocessed="$WORK/preprocessed" \
    callbacks.progress=plain hydra.sweep.dir="$WORK/multirun/$configuration" "${@:3}" > "$WORK/train_$configuration.log" 2>&1
done
echo "training and validation of both configurations: $(( $(date +%s) - start )) s"
start=$(date +%s)
medseg-select experiment_dir="$EXPERIMENT" > "$WORK/select.log" 2>&1
echo "selection: $(( $(date +%s) - start )) s"
cat "$EXPERIMENT/selection.md"

# the recipe on fold 0's held-out cases, with fold 0's models (what held those cases out)
python3 - "$EXPERIMENT" "$DATA" "$WORK" <<'PY'
import json, shlex, subprocess, sys
from pathlib import Path
import numpy as np
from medseg.datasets.io import read_label
from medseg.evaluation.cv_summary import nanmean
from medseg.evaluation.metrics import case_dice

experiment, data, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
selection = json.loads((experiment / "selection.json").read_text())
ensemble = next(r for r in selection["ranking"] if len(r["runs"]) == 2)
runs = [experiment / r for r in ensemble["runs"]]
cases = sorted(p.name[: -len(".nii.gz")] for p in (runs[0] / "fold_0" / "validation").glob("*.nii.gz"))
listing = work / "fold0_cases.txt"
listing.write_text("".join(f"{data / 'imagesTr' / c}.nii.gz\n" for c in cases))
recipe = selection["recipe"]["predict"]
mirror = next(a for a in shlex.split(recipe) if a.startswith("mirror_axes="))
overlap = next(a for a in shlex.split(recipe) if a.startswith("overlap="))
out = work / "recipe_fold0"
command = ["medseg-predict", "ckpt_dir=[" + ",".join(str(r / "fold_0") for r in runs) + "]", f"input={listing}",
           f"output={out}", overlap, mirror, "postprocessing=false", "overwrite=true"]
print("recipe on fold 0:", " ".join(command))
subprocess.run(command, check=True, capture_output=True)
means = []
for c in cases:
    pred, _ = read_label(out / f"{c}.nii.gz")
    ref, _ = read_label(data / "labelsTr" / f"{c}.nii.gz")
    means.append(nanmean(list(case_dice(pred, ref, {1: "Anterior", 2: "Posterior"}).values())))
measured, selected = float(np.mean(means)), ensemble["per_fold"]["0"]
print(f"ensemble {ensemble['candidate']} on fold 0's {len(cases)} held-out cases: recipe {measured:.6f}, "
      f"selection (stored probabilities) {selected:.6f}, difference {measured - selected:+.2e}")
PY
