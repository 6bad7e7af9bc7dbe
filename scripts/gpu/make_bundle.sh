#!/usr/bin/env bash
# Build the bundle for the GPU machine (Python 3.12, x86-64, no network) in .gpu/ (git-ignored):
#   .gpu/site.tar.xz         site/: the packages medseg and nnU-Net need beyond the machine's preinstalled ones
#   .gpu/hippocampus.tar.xz  Task04_Hippocampus/ (dataset.json, imagesTr, labelsTr as uncompressed .nii)
#   .gpu/unpack.sh           run there from the repo root: bash .gpu/unpack.sh
#
#   scripts/gpu/make_bundle.sh          build the bundle
#   scripts/gpu/make_bundle.sh --sim    check the package list on this machine instead: the same site for
#                                       Python 3.11 (SIM_DIR/site311), a venv (SIM_DIR/venv) with the CPU torch
#                                       and the preinstalled list, imports, a miniature of medseg-train and of
#                                       nnU-Net (convert, plan + preprocess, train), data from .gpu/unpack.sh
#   scripts/gpu/make_bundle.sh --all    both
#   scripts/gpu/make_bundle.sh --sim-env  only the simulated machine of --sim (site, venv, stand-ins, bundle
#                                       unpacked, import check), for scripts/gpu/rehearse_cpu.sh
#
# Environment: PIP (default /tmp/venv/bin/pip, else a venv of its own), BUNDLE_WORK (scratch, default
# /tmp/medseg-gpu-bundle), MEDSEG_HIPPOCAMPUS (default <repo>/../shared/data/Task04_Hippocampus), SIM_DIR
# (default /tmp/gpusim), XZ_THREADS (default 2), SIM_TRAIN_S (seconds of nnU-Net training in --sim, default 240).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=$ROOT/.gpu
PIP=${PIP:-/tmp/venv/bin/pip}
WORK=${BUNDLE_WORK:-/tmp/medseg-gpu-bundle}
HIPPO_SRC=${MEDSEG_HIPPOCAMPUS:-$ROOT/../shared/data/Task04_Hippocampus}
SIM=${SIM_DIR:-/tmp/gpusim}
XZ_THREADS=${XZ_THREADS:-2}
SIM_TRAIN_S=${SIM_TRAIN_S:-240}

MODE=bundle
case "${1:-}" in
  "") ;;
  --sim) MODE=sim ;;
  --all) MODE=all ;;
  --sim-env) MODE=sim-env ;;
  -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "usage: $0 [--sim|--all|--sim-env]" >&2; exit 2 ;;
esac

# Binary (or pure-Python) wheels from the index, for the target interpreter.
WHEEL_PINS=(
  monai==1.6.1 nibabel==5.4.2 SimpleITK==2.5.3 hydra-core==1.3.2 omegaconf==2.3.0 mambapy==1.2.0
  nnunetv2==2.8.1 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.14.1 ndindex==1.10.1
  numexpr==2.14.2 connected-components-3d==4.1.1 dynamic_network_architectures==0.4.4 graphviz==0.21
)
# Published as sdists only: built here as pure-Python wheels.
SDIST_PINS=(acvl_utils==0.2.6 antlr4-python3-runtime==4.9.3)
PLATFORMS=(
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any
)

# pip, without the warnings about the local file:// extra indexes in this machine's pip config
pip_() {
  local rc=0
  "$PIP" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) || rc=$?
  return "$rc"
}
log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'make_bundle: %s\n' "$*" >&2; exit 1; }
if [[ ! -x $PIP ]]; then  # no such pip here: one in a venv of its own (it only downloads and unpacks)
  [[ -x $WORK/pip-venv/bin/pip ]] || { mkdir -p "$WORK" && python3 -m venv "$WORK/pip-venv"; } || die "no pip: set PIP"
  PIP=$WORK/pip-venv/bin/pip
fi

# build_site PYVER DEST: the pinned packages for CPython PYVER, unpacked into DEST, stripped.
build_site() {
  local pyver=$1 dest=$2
  local wh=$WORK/wheels-py$pyver pure=$WORK/wheels-pure
  mkdir -p "$wh" "$pure"
  log "wheels for Python $pyver -> $wh"
  pip_ download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${PLATFORMS[@]}" -d "$wh" "${WHEEL_PINS[@]}"
  pip_ wheel -q --no-deps -w "$pure" "${SDIST_PINS[@]}"
  local w
  for w in "$pure"/*.whl; do
    case "$(basename "$w")" in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;; *) die "not pure Python: $w" ;; esac
  done
  log "install into $dest"
  rm -rf "$dest"
  pip_ install -q --no-deps --no-compile --no-index --find-links "$wh" --find-links "$pure" \
    --target "$dest" --python-version "$pyver" --implementation cp --only-binary=:all: "${PLATFORMS[@]}" \
    "${WHEEL_PINS[@]}" "${SDIST_PINS[@]}"
  strip_site "$dest"
}

# Drop what is never used at runtime: byte code, type stubs, test suites, C++/CUDA sources that MONAI only
# compiles on request (monai/csrc; the wheel has none today), console scripts, blosc2's static library, and the
# debug sections that some extensions ship (cc3d's is 19 MB with them, 2.4 MB without); nothing else of the
# shared libraries is touched.
strip_site() {
  local d=$1 so
  if command -v strip >/dev/null && command -v readelf >/dev/null; then
    while IFS= read -r -d '' so; do
      if readelf -S "$so" 2>/dev/null | grep -q '\.debug_'; then strip --strip-debug "$so"; fi
    done < <(find "$d" -type f -name '*.so*' -print0)
  else
    echo "make_bundle: no strip/readelf: debug sections kept (a larger site.tar.xz)" >&2
  fi
  find "$d" -depth -type d -name __pycache__ -exec rm -rf {} +
  find "$d" -type f \( -name '*.pyc' -o -name '*.pyi' -o -name py.typed \) -delete
  find "$d" -depth -type d -name tests -not -path '*.dist-info*' -exec rm -rf {} +
  rm -rf "$d/bin" "$d/monai/csrc" "$d/nibabel/testing"
  rm -rf "$d/blosc2/lib/libblosc2.a" "$d/blosc2/lib/cmake" "$d/blosc2/lib/pkgconfig"  # build-time files only
}

# tar_xz SRC_PARENT NAME OUTFILE: a reproducible tar of SRC_PARENT/NAME, xz -9.
tar_xz() {
  local parent=$1 name=$2 out=$3
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$parent" -cf - "$name" \
    | xz -9 -T"$XZ_THREADS" > "$out.part"
  mv "$out.part" "$out"
}

build_hippocampus() {
  [[ -f $HIPPO_SRC/dataset.json && -d $HIPPO_SRC/imagesTr && -d $HIPPO_SRC/labelsTr ]] \
    || die "no MSD Task04_Hippocampus at $HIPPO_SRC (set MEDSEG_HIPPOCAMPUS)"
  local stage=$WORK/hippocampus/Task04_Hippocampus f rel n=0
  log "Hippocampus from $HIPPO_SRC"
  rm -rf "$WORK/hippocampus"
  mkdir -p "$stage/imagesTr" "$stage/labelsTr" "$stage/imagesTs"  # nnU-Net's MSD converter needs imagesTs
  cp "$HIPPO_SRC/dataset.json" "$stage/"
  [[ -f $HIPPO_SRC/README.md ]] && cp "$HIPPO_SRC/README.md" "$stage/"
  for f in "$HIPPO_SRC"/imagesTr/*.nii.gz "$HIPPO_SRC"/labelsTr/*.nii.gz; do
    case "$(basename "$f")" in .*|_*) continue ;; esac
    rel=${f#"$HIPPO_SRC"/}
    gzip -dc "$f" > "$stage/${rel%.gz}"
    n=$((n + 1))
  done
  (( n > 0 )) || die "no .nii.gz files in $HIPPO_SRC"
  tar_xz "$WORK/hippocampus" Task04_Hippocampus "$OUT/hippocampus.tar.xz"
}

write_unpack() {
  cat > "$OUT/unpack.sh" <<'EOF'
#!/usr/bin/env bash
# Run from the repo root on the GPU machine: bash .gpu/unpack.sh
# site.tar.xz -> $SITE_PARENT/site (default /tmp/site), hippocampus.tar.xz -> $DATA_DIR/Task04_Hippocampus
# (default /tmp/data), every .nii re-gzipped to .nii.gz (what dataset.json names), then
# scripts/gpu/check_imports.py: what a parity run imports, triton too where torch sees a GPU (CHECK_TRITON=no
# leaves it out). UNPACK_CHECK=0 skips that check; PYTHON (default python3) is the interpreter it uses.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SITE_PARENT=${SITE_PARENT:-/tmp}
DATA_DIR=${DATA_DIR:-/tmp/data}
PYTHON=${PYTHON:-python3}
SITE=$SITE_PARENT/site
TASK=$DATA_DIR/Task04_Hippocampus
die() { echo "unpack.sh: FAILED: $*" >&2; exit 1; }
for f in site.tar.xz hippocampus.tar.xz; do [[ -s $HERE/$f ]] || die "missing $HERE/$f"; done
[[ ${UNPACK_CHECK:-1} == 0 || -d src/medseg ]] || die "run it from the repo root (no src/medseg in $PWD)"
unxz_to() {  # unxz_to FILE DIR: FILE (tar.xz) unpacked into DIR
  if command -v xz >/dev/null; then xz -dc "$1" | tar -xmf - -C "$2"
  else "$PYTHON" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1" | tar -xmf - -C "$2"
  fi
}
t0=$SECONDS
rm -rf "$SITE" "$TASK"
mkdir -p "$SITE_PARENT" "$DATA_DIR"
unxz_to "$HERE/site.tar.xz" "$SITE_PARENT" & p1=$!
unxz_to "$HERE/hippocampus.tar.xz" "$DATA_DIR" & p2=$!
wait "$p1" || die "site.tar.xz did not unpack"
wait "$p2" || die "hippocampus.tar.xz did not unpack"
mkdir -p "$TASK/imagesTs"
find "$TASK" -type f -name '*.nii' -print0 | xargs -0 -r -n 8 -P 16 gzip -1 -n || die "gzip"
[[ -z $(find "$TASK" -name '*.nii' -print -quit) ]] || die "uncompressed .nii left in $TASK"
ni=$(find "$TASK/imagesTr" -name '*.nii.gz' | wc -l); nl=$(find "$TASK/labelsTr" -name '*.nii.gz' | wc -l)
(( ni > 0 && ni == nl )) || die "imagesTr has $ni cases, labelsTr $nl"
[[ -f $TASK/dataset.json && -d $SITE/nnunetv2 && -d $SITE/monai ]] || die "incomplete unpack"
# nnU-Net's preprocessing imports distutils.file_util.copy_file; Python 3.12 has distutils only through
# setuptools (which torch requires). Where python3 has none, a stand-in for that one function goes into site/.
if command -v "$PYTHON" >/dev/null && ! "$PYTHON" -c 'import distutils.file_util' 2>/dev/null; then
  mkdir -p "$SITE/distutils"
  echo '"""Stand-in written by .gpu/unpack.sh: this Python has no distutils (no setuptools)."""' > "$SITE/distutils/__init__.py"
  cat > "$SITE/distutils/file_util.py" <<'PY'
"""Stand-in written by .gpu/unpack.sh: the copy_file that nnU-Net's preprocessing imports."""
import os
import shutil


def copy_file(src, dst, preserve_mode=1, preserve_times=1, update=0, link=None, verbose=1, dry_run=0):
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src))
    if update and os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
        return dst, 0
    if not dry_run:
        (shutil.copy2 if preserve_times else shutil.copy)(src, dst)
    return dst, 1
PY
  echo "unpack.sh: python3 has no distutils (no setuptools): wrote a stand-in for distutils.file_util to $SITE"
fi
if [[ ${UNPACK_CHECK:-1} != 0 ]]; then
  [[ -f scripts/gpu/check_imports.py ]] || die "no scripts/gpu/check_imports.py in $PWD"
  PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" scripts/gpu/check_imports.py \
    || die "import check: the modules named above (PYTHONPATH=$SITE:$PWD/src)"
fi
echo "unpacked in $((SECONDS - t0)) s: $SITE, $TASK ($ni cases)"
echo "export PYTHONPATH=$SITE:$PWD/src"
EOF
  chmod +x "$OUT/unpack.sh"
}

build_bundle() {
  mkdir -p "$OUT" "$WORK"
  build_site 3.12 "$WORK/py3.12/site"
  log "site.tar.xz"
  tar_xz "$WORK/py3.12" site "$OUT/site.tar.xz"
  build_hippocampus
  write_unpack
  log "sizes"
  du -sh "$WORK/py3.12/site" | sed 's/^/unpacked site: /'
  ls -l "$OUT"
  local s h
  s=$(stat -c %s "$OUT/site.tar.xz"); h=$(stat -c %s "$OUT/hippocampus.tar.xz")
  awk -v s="$s" -v h="$h" 'BEGIN { printf "site.tar.xz %.1f MiB + hippocampus.tar.xz %.1f MiB = %.1f MiB\n", s/2^20, h/2^20, (s+h)/2^20 }'
}

# ---- local simulation of the GPU machine (Python 3.11, CPU torch) ----
PREINSTALLED=(
  torch==2.13.0 lightning==2.6.6 pytorch-lightning==2.6.6 numpy scipy pandas matplotlib seaborn scikit-image
  scikit-learn tqdm tifffile einops requests pyyaml httpx rich msgpack threadpoolctl imageio networkx pillow
  tensorboard packaging typing-extensions py-cpuinfo cloudpickle
)

# find_py X.Y: a working pythonX.Y (PATH, then pyenv's versions)
find_py() {
  local c
  for c in "python$1" "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/$1"*/bin/"python$1"; do
    if "$c" -c '' >/dev/null 2>&1; then command -v "$c"; return 0; fi
  done
  return 1
}

# The stand-ins that the simulated machine needs on PYTHONPATH ($SIM/standins): timm is preinstalled on the GPU
# machine, here it cannot be (PyPI's torchvision does not load beside the CPU torch), and nnU-Net's search for a
# trainer class by name imports every trainer module on its way, the Primus ones (timm) among them. A
# sitecustomize answers that one import in every process of the simulation, loader workers included.
write_standins() {
  mkdir -p "$SIM/standins"
  cat > "$SIM/standins/sitecustomize.py" <<'PY'
"""Simulated GPU machine only (scripts/gpu/make_bundle.sh --sim): a stand-in for timm where none is installed."""
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

if importlib.util.find_spec("timm") is None:
    def _stand_in(name):
        # a class for any name imported from it; none for dunders, which torch.compile (dynamo) inspects
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

    class TimmStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "timm" or name.startswith("timm."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):
            m = types.ModuleType(spec.name)
            m.__path__ = []
            m.__getattr__ = _stand_in
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, TimmStandIn())
PY
}

# sim_env: Python 3.11 site with the bundle's pins ($SIM/site311), a venv with the CPU torch and the preinstalled
# list ($SIM/venv), the stand-ins, the bundle unpacked ($SIM/data), and the import check that unpack.sh runs.
sim_env() {
  build_site 3.11 "$SIM/site311"
  if [[ ! -x $SIM/venv/bin/python ]]; then
    log "venv $SIM/venv (CPU torch + the preinstalled list)"
    "$(find_py 3.11)" -m venv "$SIM/venv" || die "no python3.11"
    "$SIM/venv/bin/pip" install -q "${PREINSTALLED[@]}"
  fi
  write_standins
  local py=$SIM/venv/bin/python
  export PYTHONDONTWRITEBYTECODE=1

  if [[ -f $OUT/site.tar.xz && -f $OUT/hippocampus.tar.xz ]]; then write_unpack; else build_bundle; fi
  # its site is for Python 3.12: the import check runs below, on the 3.11 site
  log "unpack.sh into $SIM/unpacked and $SIM/data"
  (cd "$ROOT" && SITE_PARENT=$SIM/unpacked DATA_DIR=$SIM/data UNPACK_CHECK=0 bash "$OUT/unpack.sh")

  # The Python 3.12 site itself: its compiled modules and the pure-Python ones that need no torch.
  log "Python 3.12 imports from the bundle's site (venv $SIM/venv312: numpy and blosc2's dependencies)"
  if [[ ! -x $SIM/venv312/bin/python ]]; then
    "$(find_py 3.12)" -m venv "$SIM/venv312" || die "no python3.12"
    "$SIM/venv312/bin/pip" install -q numpy msgpack httpx rich threadpoolctl pyyaml packaging typing-extensions
  fi
  PYTHONPATH=$SIM/unpacked/site "$SIM/venv312/bin/python" -c "import SimpleITK, nibabel, blosc2, numexpr, ndindex, cc3d, omegaconf, hydra, graphviz, antlr4, sys; import numpy as np; a = blosc2.asarray(np.arange(1000.).reshape(10, 100)); assert float(a[5, 7]) == 507.0; sitk = SimpleITK; assert sitk.GetArrayFromImage(sitk.Image(4, 5, 6, sitk.sitkUInt8)).shape == (6, 5, 4); m = np.zeros((8, 8, 8), np.uint8); m[1:3, 1:3, 1:3] = 1; m[5:7, 5:7, 5:7] = 1; assert cc3d.connected_components(m).max() == 2; assert numexpr.evaluate('2 * a', local_dict={'a': np.arange(3)}).tolist() == [0, 2, 4]; assert ndindex.ndindex((slice(0, 4), 1)).newshape((10, 5)) == (4,); print('Python', sys.version.split()[0], 'imports OK: SimpleITK', sitk.Version_VersionString(), 'blosc2', blosc2.__version__)"

  log "import check (scripts/gpu/check_imports.py, as unpack.sh runs it) on Python 3.11 with site311"
  (cd "$ROOT" && PYTHONPATH=$SIM/site311:$ROOT/src:$SIM/standins "$py" scripts/gpu/check_imports.py --triton no) \
    || die "import check failed"
  # and that it fails, naming the module, when one is missing (here: the whole site, and triton)
  local miss
  miss=$(cd "$ROOT" && PYTHONPATH=$ROOT/src:$SIM/standins "$py" scripts/gpu/check_imports.py --triton yes 2>&1) \
    && die "import check passed without the site"
  grep -q 'FAILED import nnunetv2.run.run_training' <<<"$miss" && grep -q 'FAILED import triton' <<<"$miss" \
    || die "import check did not name the missing modules: $miss"
  echo "import check without the site: exit non-zero, $(grep -c FAILED <<<"$miss") modules named"
  printf '\nsimulated machine: PY=%s SITE=%s PYTHONPATH=%s, data %s\n' "$py" "$SIM/site311" "$SIM/standins" \
    "$SIM/data/Task04_Hippocampus"
}

simulate() {
  sim_env
  local py=$SIM/venv/bin/python
  export PYTHONPATH=$SIM/site311:$ROOT/src:$SIM/standins

  log "medseg-train debug=fast"
  rm -rf "$SIM/out" "$SIM/mdata"
  (cd "$SIM" && "$py" -m medseg.cli.train debug=fast paths.output="$SIM/out" paths.data="$SIM/mdata" \
    paths.preprocessed="$SIM/out/preprocessed")

  log "nnU-Net: convert, plan + preprocess, train (1-epoch trainer, stopped after $SIM_TRAIN_S s)"
  rm -rf "$SIM/nn"
  mkdir -p "$SIM/nn/raw" "$SIM/nn/preprocessed" "$SIM/nn/results"
  export nnUNet_raw=$SIM/nn/raw nnUNet_preprocessed=$SIM/nn/preprocessed nnUNet_results=$SIM/nn/results
  export nnUNet_n_proc_DA=2 nnUNet_compile=false
  cd "$SIM"
  "$py" -c "import sys; from nnunetv2.dataset_conversion.convert_MSD_dataset import entry_point as m; sys.argv = ['x', '-i', '$SIM/data/Task04_Hippocampus', '-overwrite_id', '4', '-np', '2']; m()"
  "$py" -c "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry as m; sys.argv = ['x', '-d', '4', '-c', '3d_fullres', '-np', '2', '--verify_dataset_integrity']; m()"
  # train_step wrapped to print one line per finished iteration (nnU-Net itself only logs per epoch)
  local rc=0 its
  timeout -k 30 "$SIM_TRAIN_S" "$py" -u -c "
import sys
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as T
step = T.train_step
def train_step(self, batch):
    r = step(self, batch)
    print('SIM: iteration done, loss %.4f' % r['loss'], flush=True)
    return r
T.train_step = train_step
from nnunetv2.run.run_training import run_training_entry as m
sys.argv = ['x', '4', '3d_fullres', '0', '-tr', 'nnUNetTrainer_1epoch', '-device', 'cpu']
m()" > "$SIM/nn/train.log" 2>&1 || rc=$?
  tail -n 25 "$SIM/nn/train.log"
  its=$(grep -c '^SIM: iteration done' "$SIM/nn/train.log" || true)
  if grep -q Traceback "$SIM/nn/train.log"; then die "nnU-Net training failed (rc $rc), see $SIM/nn/train.log"; fi
  # 124: stopped by the timeout as planned (143/137: the same TERM/KILL seen through the shell)
  [[ $rc == 0 || $rc == 124 || $rc == 143 || $rc == 137 ]] || die "nnU-Net training exited with $rc, see $SIM/nn/train.log"
  (( its >= 1 )) || die "nnU-Net training finished no iteration in $SIM_TRAIN_S s, see $SIM/nn/train.log"
  echo "nnU-Net: $its training iterations in $SIM_TRAIN_S s (rc $rc: stopped by the timeout as planned)"
  log "simulation passed"
}

case $MODE in
  bundle) build_bundle ;;
  sim) simulate ;;
  sim-env) sim_env ;;
  all) build_bundle; simulate ;;
esac
