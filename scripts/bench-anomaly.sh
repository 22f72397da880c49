#!/usr/bin/env bash
# The one-class anomaly benchmark (scripts/bench_anomaly.py) in its own virtual environment
# with pinned scikit-learn from PyPI; the shuttle table comes from scripts/fetch-data.sh.
# Usage: scripts/bench-anomaly.sh FLOWTRAIN FLOWSERVE [BENCHMARKS.md]
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
FLOWSERVE=${2:-target/release/flowserve}
OUT=${3:-BENCHMARKS.md}
VENV=${BENCH_VENV:-.bench-venv}
SKLEARN=1.7.2
if ! "$VENV/bin/python" -c "import sklearn, sys; sys.exit(sklearn.__version__ != '$SKLEARN')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "scikit-learn==$SKLEARN"
fi
scripts/fetch-data.sh .data shuttle
"$VENV/bin/python" scripts/bench_anomaly.py "$FLOWTRAIN" "$FLOWSERVE" runs/anomaly --out "$OUT"
# Flow families as scorers through POST /score; one of digits' ten held-out classes keeps the
# spline MAF's training time (its 64-feature MADEs are slow in candle) within the hour.
"$VENV/bin/python" scripts/bench_anomaly.py "$FLOWTRAIN" "$FLOWSERVE" runs/anomaly-families --families \
  --flow-seeds 1 --only shuttle,wine,breast_cancer,digits_0 --out "$OUT"
