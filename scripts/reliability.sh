#!/usr/bin/env bash
# The reliability report: the request parsers' properties over FUZZ_CASES cases each,
# schemathesis over openapi.yaml with CONTRACT_EXAMPLES examples per operation (another seed
# than `make test`'s), the soak for SOAK_SECONDS, and the fault tests, all in release builds;
# their summaries go to BENCHMARKS.md's "Reliability" section. Any failure stops the script
# before the report is written.
# Usage: scripts/reliability.sh [BENCHMARKS.md]
set -euo pipefail
OUT=${1:-BENCHMARKS.md}
LOG=runs/reliability
FUZZ_CASES=${FUZZ_CASES:-200000}
CONTRACT_EXAMPLES=${CONTRACT_EXAMPLES:-300}
CONTRACT_SEED=${CONTRACT_SEED:-2}
SOAK_SECONDS=${SOAK_SECONDS:-180}
mkdir -p "$LOG"
# Build first, so the timings below are the checks' own.
cargo nextest run --release -p flowserve --no-run
run() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" 2>&1 | tee "$LOG/$name.log"
  echo "elapsed: $((SECONDS - start)) s" >> "$LOG/$name.log"
}
run fuzz env PROPTEST_CASES="$FUZZ_CASES" cargo nextest run --release -p flowserve --lib api::fuzz --no-capture
run contract env CONTRACT_EXAMPLES="$CONTRACT_EXAMPLES" CONTRACT_SEED="$CONTRACT_SEED" \
  cargo nextest run --release -p flowserve --test openapi --no-capture
run soak env SOAK_SECONDS="$SOAK_SECONDS" cargo nextest run --release -p flowserve --test soak --no-capture
run faults cargo nextest run --release -p flowserve --test faults --no-capture
.test-venv/bin/python scripts/reliability_report.py "$LOG" "$OUT" \
  --fuzz-cases "$FUZZ_CASES" --contract-examples "$CONTRACT_EXAMPLES" --contract-seed "$CONTRACT_SEED" \
  --soak-seconds "$SOAK_SECONDS"
