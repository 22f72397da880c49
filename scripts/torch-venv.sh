#!/usr/bin/env bash
# Pinned PyTorch and zuko from PyPI in a virtual environment, for the benchmarks that run
# beside them (scripts/bench-zuko.sh, scripts/bench-image.sh): never for `make test` (the
# PyPI torch wheel brings NVIDIA's CUDA libraries, ~5 GB installed). Prints the venv's python.
# Usage: scripts/torch-venv.sh [VENV]
set -euo pipefail
VENV=${1:-${TORCH_VENV:-.torch-venv}}
TORCH=2.15.0
ZUKO=1.6.0
if ! "$VENV/bin/python" -c "import torch, zuko, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or zuko.__version__ != '$ZUKO')" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet "torch==$TORCH" "zuko==$ZUKO" >&2
fi
echo "$VENV/bin/python"
