#!/usr/bin/env bash
# CPU rehearsal of parity_hippocampus.sh, end to end with a tiny budget, on the simulated GPU machine of
# make_bundle.sh --sim-env (the bundle's packages built for Python 3.11, a CPU-torch venv, the bundle's data as
# unpack.sh leaves it): SUBSET cases (30; fold 0 holds out 6), 1 epoch x 2 iterations per run, a 4-feature medseg
# network, nnU-Net's own network. What it checks is the script, not the numbers: all four runs start, train,
# validate and land in report.md.
#   COMPILED_ON_CPU (1): also run the compiled mode (medseg compiles on CPU, nnU-Net stays eager there and
#   report.md says so); 0 skips it as on any machine without CUDA, which report.md says too.
#   SIM_DIR (/tmp/gpusim), REHEARSAL_DIR (/tmp/parity_rehearsal: data subset, work folders, out/ with report.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SIM=${SIM_DIR:-/tmp/gpusim}
R=${REHEARSAL_DIR:-/tmp/parity_rehearsal}
SUBSET=${SUBSET:-30}
if [[ ! -x $SIM/venv/bin/python || ! -d $SIM/site311 || ! -f $SIM/standins/sitecustomize.py \
      || ! -f $SIM/data/Task04_Hippocampus/dataset.json ]]; then
  SIM_DIR=$SIM bash scripts/gpu/make_bundle.sh --sim-env
fi

# the first SUBSET training cases, copied: medseg refuses case paths (symlinks resolved) outside data.root
rm -rf "$R/data"
"$SIM/venv/bin/python" - "$SIM/data/Task04_Hippocampus" "$R/data/Task04_Hippocampus" "$SUBSET" <<'EOF'
import json, shutil, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
meta = json.loads((src / "dataset.json").read_text())
meta["training"] = sorted(meta["training"], key=lambda p: p["image"])[:n]
meta["numTraining"], meta["test"], meta["numTest"] = len(meta["training"]), [], 0
for sub in ("imagesTr", "labelsTr", "imagesTs"):
    (dst / sub).mkdir(parents=True, exist_ok=True)
for pair in meta["training"]:
    for key in ("image", "label"):
        shutil.copy2(src / pair[key], dst / pair[key])
(dst / "dataset.json").write_text(json.dumps(meta, indent=1))
print(f"{len(meta['training'])} cases in {dst}")
EOF

t0=$SECONDS
rc=0
OUT=$R/out WORK=$R/work PY=$SIM/venv/bin/python SITE=$SIM/site311 PYTHONPATH=$SIM/standins \
  DATA=$R/data/Task04_Hippocampus EPOCHS=1 NP=2 nnUNet_n_proc_DA=2 NNUNET_TRAINER=nnUNetTrainer_1epoch \
  NNUNET_ITERATIONS=2 COMPILED_ON_CPU=${COMPILED_ON_CPU:-1} \
  MEDSEG_EXTRA="sampling.iterations_per_epoch=2 planner.base_features=4 validation.iterations=2 trainer.accelerator=cpu" \
  bash scripts/gpu/parity_hippocampus.sh || rc=$?
echo "rehearsal: parity_hippocampus.sh exited $rc after $((SECONDS - t0)) s; report: $R/out/report.md"
exit "$rc"
