#!/usr/bin/env bash
# Install ddpmlab into ./.venv (created if missing).
#   bash install.sh          the package and the `ddpm` command
#   bash install.sh --test   plus the test dependencies (pytest, diffusers as a test oracle, gradio and
#                            selenium for the demo page; its browser test also needs chromium + chromedriver)
#                            and mkdocs-material for the docs site (mkdocs build --strict)
# PyTorch comes first:
#   - with an NVIDIA GPU (nvidia-smi works): the default build from your package index (CUDA);
#   - without one: a CPU build. If your index's torch is not a CPU build (on Linux the standard
#     index serves the multi-GB CUDA build), it comes from TORCH_INDEX_URL (default: PyTorch's
#     CPU wheel index); where that index cannot be reached, the index's own build is installed
#     and the script says so.
#   - TORCH_SPEC overrides everything (e.g. TORCH_SPEC="torch==2.13.0" with PIP_INDEX_URL set).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true

index_torch_is_cpu() {
  # resolve torch==$TORCH_VERSION against the configured indexes without installing it
  local report
  report=$(mktemp)
  $PIP install -q --dry-run --ignore-installed --no-deps --report "$report" "torch==$TORCH_VERSION" >/dev/null 2>&1 || {
    rm -f "$report"; return 1; }
  "$VENV/bin/python" - "$report" <<'PY'
import json, sys
items = json.load(open(sys.argv[1])).get("install", [])
version = items[0]["metadata"]["version"] if items else ""
sys.exit(0 if "+cpu" in version or sys.platform == "darwin" else 1)
PY
  local rc=$?
  rm -f "$report"
  return $rc
}

install_cpu_torch() {
  if index_torch_is_cpu; then
    $PIP install -q "torch==$TORCH_VERSION"
  elif $PIP install -q --timeout 20 --retries 1 --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION" 2>/dev/null; then
    :
  else
    echo "install.sh: $TORCH_INDEX_URL could not be reached; installing the torch build your index serves" >&2
    $PIP install -q "torch==$TORCH_VERSION"
  fi
}

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    $PIP install -q "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install -q torch                      # CUDA build
  else
    install_cpu_torch
  fi
fi
"$VENV/bin/python" -c "import torch; c = torch.version.cuda; print(f'torch {torch.__version__}: ' + (f'CUDA {c} build' if c else 'CPU build'))"
EXTRA=""
[ "${1:-}" = "--test" ] && EXTRA="[test,demo,docs]"  # demo: `ddpm demo` and its browser test; docs: mkdocs (CI)
$PIP install -q -e ".${EXTRA}"
echo "ddpmlab installed in $VENV (activate with: source $VENV/bin/activate)"
