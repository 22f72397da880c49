#!/usr/bin/env bash
# Fetches ONNX Runtime's GPU build from its pinned PyPI wheel (scripts/ort-gpu.txt, sha256
# checked by pip) and unpacks its four libraries into DEST (default .ort-gpu/):
#   libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so,
#   libonnxruntime_providers_cuda.so, libonnxruntime_providers_tensorrt.so
# (they must sit in one folder: the core library loads the providers from beside itself).
# With --cuda-runtime it also unpacks the CUDA 13 runtime libraries (cudart, cuBLAS, cuFFT,
# cuRAND, NVRTC, nvJitLink, cuDNN 9; about 1.3 GB of wheels) into DEST/cuda/, for a machine
# or image that has the NVIDIA driver but no CUDA toolkit. TensorRT is not on PyPI (only stub
# packages are): its provider loads only where TensorRT's own libraries are installed.
# Only pip talks to the network, and only to PyPI.
set -euo pipefail
DEST=.ort-gpu
RUNTIME=0
for a in "$@"; do
  case "$a" in
    --cuda-runtime) RUNTIME=1 ;;
    -*) echo "fetch-ort-gpu: unknown option $a" >&2; exit 2 ;;
    *) DEST=$a ;;
  esac
done
cd "$(dirname "$0")/.."
PINS=scripts/ort-gpu.txt
VERSION=1.31.1
LIB=libonnxruntime.so.$VERSION
if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
  echo "fetch-ort-gpu: only x86_64 Linux is set up" >&2
  exit 1
fi
PY=$(command -v python3 || command -v python) || { echo "fetch-ort-gpu: python3 with pip is needed" >&2; exit 1; }
need_ort=1; [ -f "$DEST/$LIB" ] && [ -f "$DEST/libonnxruntime_providers_cuda.so" ] && need_ort=0
need_cuda=$RUNTIME; [ -f "$DEST/cuda/libcudart.so.13" ] && [ -f "$DEST/cuda/libcudnn.so.9" ] && need_cuda=0
[ "$need_ort" = 0 ] && [ "$need_cuda" = 0 ] && exit 0

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One requirements file per part, each line still hash-pinned.
grep '^onnxruntime-gpu==' "$PINS" >"$tmp/ort.txt"
grep '^nvidia-' "$PINS" >"$tmp/cuda.txt"
fetch() {
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --dest "$tmp/wheels" -r "$1"
}
mkdir -p "$DEST"
if [ "$need_ort" = 1 ]; then
  fetch "$tmp/ort.txt"
  "$PY" - "$tmp"/wheels/onnxruntime_gpu-*.whl "$DEST" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            with z.open(name) as src, open(os.path.join(dest, base + ".part"), "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(os.path.join(dest, base + ".part"), 0o755)
            os.replace(os.path.join(dest, base + ".part"), os.path.join(dest, base))
PY
  echo "fetch-ort-gpu: ONNX Runtime $VERSION (CUDA 13) in $DEST/$LIB"
fi
if [ "$need_cuda" = 1 ]; then
  fetch "$tmp/cuda.txt"
  mkdir -p "$DEST/cuda"
  "$PY" - "$DEST/cuda" "$tmp"/wheels/nvidia_*.whl <<'PY'
import os, re, shutil, sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if name.startswith("nvidia/") and "/lib/" in name and re.search(r"\.so(\.\d+)*$", base):
                with z.open(name) as src, open(os.path.join(dest, base + ".part"), "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(os.path.join(dest, base + ".part"), os.path.join(dest, base))
PY
  echo "fetch-ort-gpu: CUDA 13 runtime ($(ls "$DEST/cuda" | wc -l) libraries, $(du -sh "$DEST/cuda" | cut -f1)) in $DEST/cuda"
fi
