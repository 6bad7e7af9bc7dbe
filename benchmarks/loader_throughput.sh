#!/usr/bin/env bash
# Augmented training patches per second from one loader process: medseg vs nnunetv2 2.8.1 (its own venv,
# $NNUNET_VENV), Hippocampus 3d_fullres, same machine, same run, runs alternating; prints each figure, the
# medians and the ratio. Both are preprocessed first (not timed). See loader_throughput.py for what is timed.
# Usage: benchmarks/loader_throughput.sh [path/to/Task04_Hippocampus] [repeats] [batches]
set -euo pipefail
data=$(cd "${1:-../shared/data/Task04_Hippocampus}" && pwd)
repeats=${2:-3}
batches=${3:-50}
here=$(cd "$(dirname "$0")" && pwd)
py=$(dirname "$(command -v medseg-plan)")/python  # medseg's interpreter
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
. "$here/nnunet_venv.sh"  # sets $venv
quiet() { "$@" > "$work/setup.log" 2>&1 || { cat "$work/setup.log"; exit 1; }; }
"$py" "$here/nnunet_raw.py" "$data" "$work/raw" > /dev/null
export nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/nn_pre" nnUNet_results="$work/nn_results"
quiet "$venv/bin/nnUNetv2_plan_and_preprocess" -d 4 -c 3d_fullres -np 2 -npfp 2
quiet medseg-plan data=msd data.root="$data" paths.preprocessed="$work/ms_pre" num_processes=2 hydra.run.dir="$work/hydra"
ms=(); nn=()
for i in $(seq "$repeats"); do
  line=$("$venv/bin/python" "$here/loader_throughput.py" nnunet "$batches" 2> "$work/nn.err" | tail -1) || { cat "$work/nn.err"; exit 1; }
  nn+=("$(echo "$line" | awk '{print $(NF-1)}')"); echo "run $i: $line"
  line=$("$py" "$here/loader_throughput.py" medseg "$data" "$work/ms_pre" "$batches" 2> "$work/ms.err" | tail -1) || { cat "$work/ms.err"; exit 1; }
  ms+=("$(echo "$line" | awk '{print $(NF-1)}')"); echo "run $i: $line"
done
"$py" - "$repeats" "${ms[@]}" "${nn[@]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); v = [float(x) for x in sys.argv[2:]]
ms, nn = statistics.median(v[:n]), statistics.median(v[n:])
print(f"median patches/s: medseg {ms:.1f}, nnunetv2 {nn:.1f}; medseg / nnunetv2 = {ms / nn:.2f}")
PY
