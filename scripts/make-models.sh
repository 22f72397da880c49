#!/usr/bin/env bash
# Rebuilds the bundled model packages in models/ from fixed seeds.
# Usage: scripts/make-models.sh [path/to/flowtrain] [models-dir]   (ONLY=name: just that one)
# shuttle needs `make data` (scripts/fetch-data.sh) first.
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
MODELS=${2:-models}
RUNS=${RUNS:-runs/models}

# name | flowtrain arguments
while IFS='|' read -r name args; do
  [ -z "$name" ] && continue
  [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ] && continue
  echo "== $name: flowtrain train $args"
  # shellcheck disable=SC2086
  "$FLOWTRAIN" train $args --name "$name" --out "$RUNS/$name" --fresh --quiet
  mkdir -p "$MODELS/$name/1"
  rm -f "$MODELS/$name/1/"*
  cp "$RUNS/$name"/{flow.json,encode.onnx,decode.onnx,reference.bin} "$MODELS/$name/1/"
done <<'LIST'
moons|--family realnvp --data moons --layers 6 --hidden 64 --steps 4000 --seed 1
wine|--family realnvp --data wine --layers 5 --hidden 100 --batch-norm true --steps 4000 --eval-every 50 --patience 20 --seed 1
wine_maf|--family maf --data wine --layers 5 --hidden 100 --batch-norm true --permutation reverse --steps 4000 --eval-every 50 --patience 20 --seed 1
shuttle|--preset anomaly --data .data/shuttle_normal.csv --seed 1
digits|--family glow --data digits --layers 4 --levels 2 --hidden 32 --steps 1500 --eval-every 100 --patience 5 --seed 1
wine_by_quality|--family maf --data wine --context quality:categorical --layers 5 --hidden 100 --batch-norm true --permutation reverse --steps 4000 --eval-every 50 --patience 20 --seed 1
digits_by_label|--family glow --data digits --context label:categorical --layers 4 --levels 2 --hidden 32 --steps 1500 --eval-every 100 --patience 5 --seed 1
wine_nsf|--family nsf --data wine --layers 5 --hidden 100 --batch-norm true --permutation lu --batch-size 100 --lr 1e-4 --steps 20000 --eval-every 50 --patience 10 --seed 1
wine_maf_spline|--family maf --transform spline --data wine --layers 5 --hidden 100 --batch-norm true --permutation reverse --batch-size 100 --lr 1e-4 --steps 20000 --eval-every 50 --patience 10 --seed 1
LIST
echo "bundled packages are in $MODELS/"
