#!/usr/bin/env bash
# Plan + preprocess (3d_fullres) of MSD Task04 Hippocampus: medseg-plan vs nnUNetv2_plan_and_preprocess, same
# machine, same run, 2 processes each, from an empty output folder every time; prints each time, the medians and
# the ratio. nnunetv2 2.8.1 runs from its own virtual environment ($NNUNET_VENV, created if missing).
# Usage: benchmarks/plan_preprocess.sh [path/to/Task04_Hippocampus] [repeats]
set -euo pipefail
data=$(cd "${1:-../shared/data/Task04_Hippocampus}" && pwd)
repeats=${2:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
. "$(dirname "$0")/nnunet_venv.sh"  # sets $venv
# nnU-Net raw layout of the same files (symlinks; the data folder is never written)
python3 "$(dirname "$0")/nnunet_raw.py" "$data" "$work/raw" > /dev/null
export nnUNet_raw="$work/raw" nnUNet_results="$work/results"
seconds() { local t0=$(date +%s.%N); "$@" > "$work/last.log" 2>&1 || { cat "$work/last.log"; exit 1; }; echo "$(date +%s.%N) - $t0" | bc; }
medseg_times=(); nnunet_times=()
for i in $(seq "$repeats"); do
  rm -rf "$work/pp_nnunet" "$work/pp_medseg"
  export nnUNet_preprocessed="$work/pp_nnunet"
  t=$(seconds "$venv/bin/nnUNetv2_plan_and_preprocess" -d 4 -c 3d_fullres -np 2 -npfp 2); nnunet_times+=("$t")
  t=$(seconds medseg-plan data=msd data.root="$data" paths.preprocessed="$work/pp_medseg" num_processes=2 \
        hydra.run.dir="$work/hydra"); medseg_times+=("$t")
  echo "run $i: nnunetv2 ${nnunet_times[-1]} s, medseg ${medseg_times[-1]} s"
done
python3 - "${#medseg_times[@]}" "${medseg_times[@]}" "${nnunet_times[@]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); m = [float(x) for x in sys.argv[2:2 + n]]; u = [float(x) for x in sys.argv[2 + n:]]
mm, mu = statistics.median(m), statistics.median(u)
print(f"median: medseg {mm:.1f} s, nnunetv2 {mu:.1f} s; medseg/nnunetv2 = {mm / mu:.3f} ({mu / mm:.1f}x faster)")
PY
