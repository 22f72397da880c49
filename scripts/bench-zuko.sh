#!/usr/bin/env bash
# Neural spline flows' training speed beside zuko's (scripts/bench_zuko.py), in a virtual
# environment with pinned PyTorch and zuko from PyPI: for this benchmark only, never for
# `make test` (the PyPI torch wheel brings NVIDIA's CUDA libraries, ~5 GB installed).
# Usage: scripts/bench-zuko.sh FLOWTRAIN [BENCHMARKS.md]
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
OUT=${2:-BENCHMARKS.md}
VENV=${TORCH_VENV:-.torch-venv}
TORCH=2.15.0
ZUKO=1.6.0
if ! "$VENV/bin/python" -c "import torch, zuko, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or zuko.__version__ != '$ZUKO')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "torch==$TORCH" "zuko==$ZUKO"
fi
"$VENV/bin/python" scripts/bench_zuko.py "$FLOWTRAIN" runs/zuko --out "$OUT"
