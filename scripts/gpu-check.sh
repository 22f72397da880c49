#!/usr/bin/env bash
# The GPU check: CUDA parity and speed of every bundled model on a CUDA machine, written into
# BENCHMARKS.md by benches/gpu.rs. Built here, run there; the machine we check on is offline
# and takes at most 64 MiB per call (the working tree included), so the payload travels in
# parts, each sha256-checked, while the machine stays warm between calls.
#
#   scripts/gpu-check.sh prepare      here: release builds of the server and the check, ONNX
#                                     Runtime's CUDA build (make ort-gpu), packed with xz into
#                                     .gpu-carry/part-NN (56 MiB each) + SHA256SUMS; prints the
#                                     calls to make
#   scripts/gpu-check.sh stash        there, one call per part (carry .gpu-carry/part-NN): moves
#                                     the part to /tmp/gpu-check
#   scripts/gpu-check.sh run [secs]   there, with the last part: rejoins and checks the parts,
#                                     unpacks, finds the CUDA 13 runtime (NVIDIA's PyPI wheels,
#                                     as torch installs them, or .ort-gpu/cuda), runs the check,
#                                     copies BENCHMARKS.md and the log to $OUT
#
# On a machine with the payload already in place (a workstation with a GPU), `run` works from
# the local builds: scripts/gpu-check.sh run --local
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
STASH=/tmp/gpu-check
PART_BYTES=$((56 << 20))
say() { echo "gpu-check: $*" >&2; }

# The CUDA runtime's library folders: NVIDIA's wheels in any Python's site-packages, or ours.
cuda_lib_path() {
  local dirs=()
  for py in python3 /usr/bin/python3 /usr/local/bin/python3; do
    command -v "$py" >/dev/null || continue
    while IFS= read -r d; do dirs+=("$d"); done < <("$py" - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for r in sorted(roots):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(d)
PY
)
  done
  [ -d .ort-gpu/cuda ] && dirs+=("$PWD/.ort-gpu/cuda")
  local IFS=:
  echo "${dirs[*]}"
}

case "${1:-}" in
prepare)
  make ort-gpu
  cargo build --release -p flowserve
  cargo bench --bench gpu --no-run 2>/dev/null
  bench=$(cargo bench --bench gpu --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])' | tail -1)
  [ -x "$bench" ] || { say "no bench binary"; exit 1; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/stage/bin" "$CARRY/stage/ort"
  cp target/release/flowserve "$CARRY/stage/bin/flowserve"
  cp "$bench" "$CARRY/stage/bin/gpu-bench"
  strip --strip-debug "$CARRY/stage/bin/flowserve" "$CARRY/stage/bin/gpu-bench"
  cp .ort-gpu/libonnxruntime*.so* "$CARRY/stage/ort/"
  say "packing $(du -sh "$CARRY/stage" | cut -f1) with xz (a few minutes)"
  tar -C "$CARRY/stage" -cf - . | xz -T0 -6 >"$CARRY/payload.tar.xz"
  rm -rf "$CARRY/stage"
  (cd "$CARRY" && split -b "$PART_BYTES" -d payload.tar.xz part- && rm payload.tar.xz \
    && sha256sum part-* >SHA256SUMS)
  grep -qxF "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
  parts=("$CARRY"/part-*)
  say "${#parts[@]} parts in $CARRY ($(du -sh "$CARRY" | cut -f1)); the device calls, back to back:"
  for ((i = 0; i < ${#parts[@]}; i++)); do
    p=${parts[$i]}
    if ((i < ${#parts[@]} - 1)); then
      echo "  run(carry=[\"$p\", \"$CARRY/SHA256SUMS\"], command=\"scripts/gpu-check.sh stash\", timeout_s=120)"
    else
      echo "  run(carry=[\"$p\", \"$CARRY/SHA256SUMS\"], command=\"scripts/gpu-check.sh run 3\", timeout_s=540)"
    fi
  done
  ;;
stash)
  mkdir -p "$STASH"
  cp "$CARRY"/SHA256SUMS "$STASH/"
  for p in "$CARRY"/part-*; do mv "$p" "$STASH/"; done
  say "stashed: $(ls "$STASH" | tr '\n' ' ')"
  ;;
run)
  shift
  local_run=0
  [ "${1:-}" = --local ] && { local_run=1; shift; }
  secs=${1:-3}
  out=${OUT:-$PWD/runs/gpu-check}
  mkdir -p "$out"
  if [ "$local_run" = 1 ]; then
    ort=$PWD/.ort-gpu
    server=target/release/flowserve
    bench=$(ls -t target/release/deps/gpu-* | grep -v '\.d$' | head -1)
  else
    mkdir -p "$STASH"
    [ -d "$CARRY" ] && for p in "$CARRY"/part-* "$CARRY"/SHA256SUMS; do [ -e "$p" ] && mv "$p" "$STASH/"; done
    (cd "$STASH" && sha256sum -c SHA256SUMS) || { say "a part is missing or damaged"; exit 1; }
    mkdir -p "$STASH/x"
    cat "$STASH"/part-* | xz -d | tar -C "$STASH/x" -xf -
    ort=$STASH/x/ort
    mkdir -p target/release
    cp "$STASH/x/bin/flowserve" target/release/flowserve
    bench=$STASH/x/bin/gpu-bench
  fi
  export ORT_DYLIB_PATH=$ort/libonnxruntime.so.1.31.1
  export LD_LIBRARY_PATH="$(cuda_lib_path)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "ONNX Runtime $ORT_DYLIB_PATH; CUDA libraries from $LD_LIBRARY_PATH"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  set +e
  # DEVICE=cpu dry-runs every step on a machine without a GPU (the "GPU" side on the CPU).
  "$bench" --root "$PWD" --models models --seconds "$secs" --device "${DEVICE:-cuda}" \
    --out "${BENCH_OUT:-BENCHMARKS.md}" 2>&1 | tee "$out/gpu-check.log"
  rc=${PIPESTATUS[0]}
  set -e
  cp "${BENCH_OUT:-BENCHMARKS.md}" "$out/BENCHMARKS.md"
  say "exit $rc; BENCHMARKS.md and gpu-check.log in $out"
  exit "$rc"
  ;;
*)
  sed -n '2,20p' "$0" >&2
  exit 2
  ;;
esac
