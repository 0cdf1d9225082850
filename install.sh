#!/usr/bin/env bash
# Install ddpmlab into ./.venv (created if missing).
#   bash install.sh          the package and the `ddpm` command
#   bash install.sh --test   plus the test dependencies (pytest, diffusers as a test oracle)
# On a machine without an NVIDIA GPU the CPU build of PyTorch is installed first, so that
# pip does not pull the multi-GB CUDA build. Set TORCH_SPEC to choose another build
# (e.g. TORCH_SPEC="torch==2.13.0" with PIP_INDEX_URL pointing at a CUDA wheel index).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    $PIP install -q "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install -q torch                      # CUDA build
  else
    $PIP install -q "torch==2.13.0"            # CPU build where the index provides one
  fi
fi
EXTRA=""
[ "${1:-}" = "--test" ] && EXTRA="[test]"
$PIP install -q -e ".${EXTRA}"
echo "ddpmlab installed in $VENV (activate with: source $VENV/bin/activate)"
