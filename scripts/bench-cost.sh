#!/usr/bin/env bash
# Packages for the MAF/IAF cost table (benches/cost.rs): at D = 8 (wine quality without
# three columns) and D = 32 (the top half of the 8x8 digits), a MAF fitted by maximum
# likelihood and an IAF distilled from it. Usage: scripts/bench-cost.sh FLOWTRAIN DIR
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
DIR=${2:-runs/cost}
COMMON="--layers 5 --hidden 100 --hidden-layers 2 --batch-norm true --batch-size 256 --seed 0 --quiet --fresh"
WINE8=(--data wine --drop-columns "free sulfur dioxide,total sulfur dioxide,pH")
BOTTOM=$(printf 'pixel_%d_%d,' $(for r in 4 5 6 7; do for c in 0 1 2 3 4 5 6 7; do echo "$r $c"; done; done))
DIGITS32=(--data digits --drop-columns "${BOTTOM%,}")
rm -rf "$DIR/models"
for d in 8 32; do
  if [ "$d" = 8 ]; then DATA=("${WINE8[@]}"); else DATA=("${DIGITS32[@]}"); fi
  # shellcheck disable=SC2086
  "$FLOWTRAIN" train --family maf "${DATA[@]}" --steps 1000 --eval-every 100 $COMMON \
    --out "$DIR/maf$d" --name "maf$d"
  # shellcheck disable=SC2086
  "$FLOWTRAIN" train --family iaf "${DATA[@]}" --teacher "$DIR/maf$d" --steps 1000 --eval-every 100 $COMMON \
    --out "$DIR/iaf$d" --name "iaf$d"
  for m in maf iaf; do
    mkdir -p "$DIR/models/$m$d/1"
    cp "$DIR/$m$d"/{flow.json,encode.onnx,decode.onnx} "$DIR/models/$m$d/1/"
  done
done
