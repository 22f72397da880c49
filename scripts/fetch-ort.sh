#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library from the official PyPI wheel (pinned version and
# sha256) and unpacks it into .ort/. Only pip talks to the network, and only to PyPI.
set -euo pipefail

VERSION=1.32.0
WHEEL=onnxruntime-${VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
DEST=${1:-.ort}
LIB=libonnxruntime.so.${VERSION}

if [ -f "$DEST/$LIB" ]; then
  exit 0
fi
if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
  echo "fetch-ort: only x86_64 Linux is set up; set ORT_DYLIB_PATH to an ONNX Runtime >= 1.31 library" >&2
  exit 1
fi
PY=$(command -v python3 || command -v python) || { echo "fetch-ort: python3 with pip is needed" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The wheel is pure C++ inside; asking for the cp311 manylinux build explicitly makes the
# download the same file whatever the local Python is.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 \
  --dest "$tmp" "onnxruntime==${VERSION}"
got=$(sha256sum "$tmp/$WHEEL" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "fetch-ort: $WHEEL has sha256 $got, expected $SHA256; refusing it" >&2
  exit 1
fi
mkdir -p "$DEST"
"$PY" - "$tmp/$WHEEL" "$DEST" "$LIB" <<'PY'
import sys, zipfile, shutil, os
wheel, dest, lib = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    with z.open(f"onnxruntime/capi/{lib}") as src, open(os.path.join(dest, lib + ".part"), "wb") as out:
        shutil.copyfileobj(src, out)
os.replace(os.path.join(dest, lib + ".part"), os.path.join(dest, lib))
PY
echo "fetch-ort: ONNX Runtime ${VERSION} in $DEST/$LIB"
