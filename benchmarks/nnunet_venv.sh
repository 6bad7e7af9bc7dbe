# Sourced by the benchmark scripts that run nnunetv2 beside medseg: sets $venv to nnunetv2 2.8.1's own virtual
# environment ($NNUNET_VENV, default /tmp/nnunet_venv), creating it on first use.
venv=${NNUNET_VENV:-/tmp/nnunet_venv}
if [ ! -x "$venv/bin/nnUNetv2_predict" ]; then
  python3.11 -m venv "$venv"
  # one call, so that pip keeps the CPU torch wheel (a second call would let torchvision pull a CUDA torch)
  "$venv/bin/pip" install -q torch==2.13.0 nnunetv2==2.8.1
fi
