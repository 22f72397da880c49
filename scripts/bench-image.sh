#!/usr/bin/env bash
# Image flows' training beside the same models in PyTorch (scripts/bench_image.py drives
# scripts/bench_image_torch.py), with the pinned PyTorch of scripts/torch-venv.sh (for this
# benchmark only, never for `make test`). BUDGET sets the seconds of each equal-time run,
# SEEDS how many seeds each system trains at equal time.
# Usage: scripts/bench-image.sh FLOWTRAIN [BENCHMARKS.md]
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
OUT=${2:-BENCHMARKS.md}
PY=$(scripts/torch-venv.sh)
"$PY" scripts/bench_image.py "$FLOWTRAIN" runs/image-vs-torch --out "$OUT" ${BUDGET:+--budget "$BUDGET"} \
  ${SEEDS:+--seeds "$SEEDS"}
