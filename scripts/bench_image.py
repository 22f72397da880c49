"""Image flows: flowtrain beside the same models in PyTorch, on the same machine, alternating.

Two models, both on 8x8 digits (L = 2 levels, width 32, batch 256, the recipe of
scripts/bench_image_torch.py, which is flowtrain's): Glow with K = 4 steps per level and the
multi-scale RealNVP with K = 2. Two measurements, each at 1 and at 2 threads
(`flowtrain train --threads`, `torch.set_num_threads` and OMP/MKL for PyTorch), and
flowtrain once more with no thread count, to show which it picks:

- speed: rounds that alternate the systems (flowtrain, PyTorch, flowtrain, ...), each run
  `--steps` steps; its figure is its median step time (a step draws the batch, runs forward
  and backward and the Adam update), the table's the median over rounds;
- quality at equal time: each system trains for the number of steps its measured speed fits
  into `--budget` seconds (so its cosine schedule ends there), validating every 100 steps with
  the best state restored, once for each of `--seeds` seeds (initialisation, batches and
  noise; the split stays seed 0's: `flowtrain train --split-seed 0`); the test bits/dim are
  on the same test images with the same fixed dequantisation noise (`flowtrain splits`),
  and the table gives their mean over the seeds. These runs train a fixed number of steps,
  so only the speed rounds need the machine to themselves.

Usage: bench_image.py FLOWTRAIN WORKDIR [--out BENCHMARKS.md] [--rounds 3] [--budget 150]
       [--seeds 3]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

import numpy as np

from bench_common import cpu, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = [
    # (name, flowtrain family, layers, speed-run steps)
    ("Glow", "glow", 4, 300),
    ("multi-scale RealNVP", "realnvp_image", 2, 200),
]
COMMON = ["--levels", "2", "--hidden", "32"]


def flowtrain(binary, work, family, layers, threads, steps, eval_every, seed=0):
    """A flowtrain run's summary.json; `threads` None lets flowtrain choose."""
    out = os.path.join(work, f"flowtrain-{family}-t{threads or 'auto'}-{steps}-s{seed}")
    cmd = [binary, "train", "--family", family, "--data", "digits", "--layers", str(layers),
           "--steps", str(steps), "--eval-every", str(eval_every), "--patience", "0",
           *COMMON, "--seed", str(seed), "--split-seed", "0", "--quiet", "--fresh",
           "--out", out]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAYON_NUM_THREADS", "FLOWTRAIN_THREADS")}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def pytorch(splits, work, family, layers, threads, steps, eval_every, seed=0):
    out = os.path.join(work, f"pytorch-{family}-t{threads}-{steps}-s{seed}.json")
    cmd = [sys.executable, os.path.join(HERE, "bench_image_torch.py"), splits, "--family",
           family, "--layers", str(layers), "--steps", str(steps), "--eval-every",
           str(eval_every), "--threads", str(threads), *COMMON, "--seed", str(seed),
           "--out", out]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flowtrain")
    ap.add_argument("work")
    ap.add_argument("--out", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=150.0)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    splits = os.path.join(args.work, "splits")
    subprocess.run([args.flowtrain, "splits", "--data", "digits", "--seed", "0", "--out", splits],
                   check=True, capture_output=True)
    systems = {"flowtrain": lambda *a: flowtrain(args.flowtrain, args.work, *a),
               "PyTorch": lambda *a: pytorch(splits, args.work, *a)}
    ms, params = {}, {}
    for r in range(args.rounds):
        for name, family, layers, steps in MODELS:
            for threads in (1, 2):
                for system, run in systems.items():
                    s = run(family, layers, threads, steps, steps)
                    ms.setdefault((name, threads, system), []).append(s["median_step_ms"])
                    params[(name, system)] = s["parameters"]
                print(f"round {r + 1} {name} {threads} thread(s): "
                      + ", ".join(f"{sy} {ms[(name, threads, sy)][-1]:.1f} ms" for sy in systems),
                      file=sys.stderr)
    median = {k: float(np.median(v)) for k, v in ms.items()}
    auto = {name: flowtrain(args.flowtrain, args.work, family, layers, None, steps, steps)
            for name, family, layers, steps in MODELS}
    timed = {}  # (model, threads, system) -> the runs' summaries, one per seed
    for name, family, layers, _ in MODELS:
        for threads in (1, 2):
            for seed in range(args.seeds):
                for system, run in systems.items():
                    ms_step = median[(name, threads, system)]
                    steps = max(100, int(args.budget * 1e3 / ms_step) // 100 * 100)
                    s = run(family, layers, threads, steps, 100, seed)
                    timed.setdefault((name, threads, system), []).append(s)
                    print(f"{name} {threads} thread(s) {system} seed {seed}: {steps} steps, "
                          f"test {s['test_bits_per_dim']:.4f} bits/dim", file=sys.stderr)
    mean_bpd = {k: float(np.mean([s["test_bits_per_dim"] for s in v])) for k, v in timed.items()}
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    import torch  # noqa: E402 (the venv's, for its version)
    lines = [
        "## Training speed: image flows, flowtrain vs PyTorch",
        "",
        f"Measured {datetime.date.today()} at commit `{rev}` on {cpu()}, with `make bench` "
        "(`scripts/bench-image.sh`: PyTorch "
        f"{torch.__version__.split('+')[0]} on the CPU, eager mode, installed into `.torch-venv` for "
        "the benchmark only). The same models on both sides, written out in "
        "`scripts/bench_image_torch.py`: Glow (K = 4 steps per level) and the multi-scale "
        "RealNVP (K = 2) on 8×8 digits, 2 levels, coupling networks of width 32, logit "
        "pre-processing, batch 256, Adam 1e-3 with 100 warm-up steps and cosine decay, "
        "gradient clip 10; parameter counts below agree. A step draws the batch and runs "
        "forward, backward and the Adam update; each speed run reports its median step, the "
        f"table the median over {args.rounds} rounds that alternate the two systems "
        "(flowtrain, PyTorch, flowtrain, ...). At equal time each system trains the steps its "
        f"measured speed fits into {args.budget:.0f} s (its cosine schedule ends there), "
        "validating every 100 steps with the best state restored, and is scored on the same "
        "test images with the same fixed dequantisation noise (`flowtrain splits`); it does "
        f"so for {args.seeds} seeds (initialisation, batches, noise) on the same split, and "
        "the table gives the mean. Digits are 1,437 training and 180 test images: both systems "
        "overfit past a few thousand steps, and the best state is picked on 180 validation "
        "images, so one seed's test bits/dim differ by a few hundredths from another's (listed "
        "below). `--threads 1` is one thread on both sides (flowtrain sizes candle's pool to "
        "it). The machine is shared: single runs vary by ±20 %, so read the ratios, not the "
        "times.",
        "",
        "| model | threads | flowtrain ms/step | PyTorch ms/step | flowtrain / PyTorch steps/s "
        f"| test bits/dim at equal time, mean of {args.seeds} seeds: flowtrain | PyTorch "
        "| steps (flowtrain / PyTorch) | parameters |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _, _, _ in MODELS:
        for threads in (1, 2):
            a, b = median[(name, threads, "flowtrain")], median[(name, threads, "PyTorch")]
            ta, tb = timed[(name, threads, "flowtrain")][0], timed[(name, threads, "PyTorch")][0]
            fa, fb = mean_bpd[(name, threads, "flowtrain")], mean_bpd[(name, threads, "PyTorch")]
            lines.append(
                f"| {name} | {threads} | {a:.1f} | {b:.1f} | **{b / a:.2f}×** | "
                f"{'**' if fa <= fb else ''}{fa:.4f}{'**' if fa <= fb else ''} | {fb:.4f} | "
                f"{ta['steps']} / {tb['steps']} | {params[(name, 'flowtrain')]:,} / "
                f"{params[(name, 'PyTorch')]:,} |")
    lines += ["", "With no `--threads`, flowtrain timed its first steps on 1 thread and on all "
              "the cores and kept: " + "; ".join(
                  f"{name} {s['threads']} thread(s) ({s['median_step_ms']:.1f} ms/step)"
                  for name, s in auto.items()) + ".",
              "", "Every speed run (ms/step, in the order taken):", ""]
    for name, _, _, _ in MODELS:
        for threads in (1, 2):
            runs = " · ".join(
                f"{sy} " + ", ".join(f"{v:.1f}" for v in ms[(name, threads, sy)]) for sy in systems)
            lines.append(f"- {name}, {threads} thread(s): {runs}")
    lines += ["", "Test bits/dim of every equal-time run, seed by seed (best step in brackets):",
              ""]
    for name, _, _, _ in MODELS:
        for threads in (1, 2):
            runs = " · ".join(
                f"{sy} " + ", ".join(f"{s['test_bits_per_dim']:.4f} ({s['best_step']})"
                                     for s in timed[(name, threads, sy)]) for sy in systems)
            lines.append(f"- {name}, {threads} thread(s): {runs}")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        write_section(args.out, lines[0], section)


if __name__ == "__main__":
    main()
