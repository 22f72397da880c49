#!/usr/bin/env bash
# Neural spline flows' training speed beside zuko's (scripts/bench_zuko.py), with the pinned
# PyTorch and zuko of scripts/torch-venv.sh (for this benchmark only, never for `make test`).
# Usage: scripts/bench-zuko.sh FLOWTRAIN [BENCHMARKS.md]
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
OUT=${2:-BENCHMARKS.md}
PY=$(scripts/torch-venv.sh)
"$PY" scripts/bench_zuko.py "$FLOWTRAIN" runs/zuko --out "$OUT"
