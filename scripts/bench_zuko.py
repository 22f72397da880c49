"""Training speed of flowtrain's neural spline flows beside zuko's of the same size.

Both sides train the same architecture on the same standardised wine rows (11 features): 5
spline transforms of 8 bins on [-5, 5] (zuko's bound), conditioners with 2 hidden layers of
100 ReLU units, orders reversed between transforms, batch 256, Adam 1e-3, no batch norm.
Two pairs:

- coupling NSF: `flowtrain train --family nsf --permutation reverse` beside
  `zuko.flows.NSF(passes=2)` (zuko's coupling form of its masked transform);
- autoregressive NSF: `flowtrain train --family maf --transform spline --permutation reverse`
  beside `zuko.flows.NSF()` (fully autoregressive, zuko's default).

Rounds alternate the systems (flowtrain, zuko, flowtrain, ...) at 1 and at 2 threads
(`RAYON_NUM_THREADS` for flowtrain, `torch.set_num_threads` for PyTorch), so a noisy
neighbour hits both alike. Each run trains `--steps` steps; its time is the median step
(forward, backward and the Adam update of one minibatch) after the first 20. The result is
the median over rounds.

Usage: bench_zuko.py FLOWTRAIN WORKDIR [--out BENCHMARKS.md] [--rounds 3] [--steps 400]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import zuko

from bench_common import cpu, wine_quality, write_section

LAYERS, HIDDEN, BINS, BOUND, BATCH, LR = 5, 100, 8, 5.0, 256, 1e-3
PAIRS = [
    ("coupling NSF", ["--family", "nsf"], {"passes": 2}),
    ("autoregressive NSF", ["--family", "maf", "--transform", "spline"], {}),
]


def flowtrain_step_ms(flowtrain, work, name, args, threads, steps):
    out = os.path.join(work, f"{name.replace(' ', '-')}-t{threads}")
    cmd = [flowtrain, "train", *args, "--data", "wine", "--layers", str(LAYERS),
           "--hidden", str(HIDDEN), "--hidden-layers", "2", "--bins", str(BINS),
           "--tail-bound", str(BOUND), "--permutation", "reverse", "--batch-size", str(BATCH),
           "--lr", str(LR), "--steps", str(steps), "--eval-every", str(steps), "--seed", "0",
           "--quiet", "--fresh", "--out", out]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return s["median_step_ms"], s["parameters"]


def zuko_step_ms(x, kwargs, threads, steps):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    flow = zuko.flows.NSF(x.shape[1], transforms=LAYERS, bins=BINS,
                          hidden_features=(HIDDEN, HIDDEN), **kwargs)
    # zuko's spline bound is 5 by default, as set for flowtrain here; check it.
    for t in flow.transform.transforms:
        assert getattr(t, "univariate", None) is not None
    opt = torch.optim.Adam(flow.parameters(), lr=LR)
    data = torch.tensor(x, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = data[torch.randint(len(data), (BATCH,), generator=gen)]
        loss = -flow().log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in flow.parameters())
    return float(np.median(times[20:])) * 1e3, params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("flowtrain")
    ap.add_argument("work")
    ap.add_argument("--out", default="")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    _, x, _ = wine_quality()
    x = (x - x.mean(0)) / x.std(0)
    ms = {}
    params = {}
    for r in range(args.rounds):
        for name, ft_args, zk in PAIRS:
            for threads in (1, 2):
                a, pa = flowtrain_step_ms(args.flowtrain, args.work, name, ft_args, threads, args.steps)
                b, pb = zuko_step_ms(x, zk, threads, args.steps)
                ms.setdefault((name, threads, "flowtrain"), []).append(a)
                ms.setdefault((name, threads, "zuko"), []).append(b)
                params[name] = (pa, pb)
                print(f"round {r + 1} {name} {threads} thread(s): flowtrain {a:.2f} ms, zuko {b:.2f} ms",
                      file=sys.stderr)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    lines = [
        "## Training speed: neural spline flows, flowtrain vs zuko",
        "",
        f"Measured {datetime.date.today()} at commit `{rev}` on {cpu()}, with `make bench` "
        f"(`scripts/bench-zuko.sh`, which installs PyTorch {torch.__version__.split('+')[0]} and "
        f"zuko {zuko.__version__} into `.torch-venv` for this benchmark only). The same "
        f"architecture on both sides: {LAYERS} spline transforms of {BINS} bins on "
        f"[−{BOUND:g}, {BOUND:g}], conditioners with 2 hidden layers of {HIDDEN} ReLU units, "
        f"orders reversed between transforms, batch {BATCH}, Adam {LR:g}, on the 11 standardised "
        "wine features. Coupling NSF: `flowtrain train --family nsf` beside "
        "`zuko.flows.NSF(passes=2)`; autoregressive NSF: `--family maf --transform spline` beside "
        "`zuko.flows.NSF()`. A step is the forward pass, backward pass and Adam update of one "
        f"minibatch; each run trains {args.steps} steps and reports its median step after the "
        f"first 20; the table gives the median over {args.rounds} rounds that alternate the two "
        "systems, at 1 and at 2 threads. The autoregressive pair is the same network; the "
        "coupling pair is not quite: zuko's coupling is its masked network run in two passes "
        "(every feature in, masked, and parameters out for all of them), flowtrain's coupling "
        "network takes only the kept half and emits only the moved half's parameters, so it is "
        "smaller (the parameters column) — part of its lead is doing less. flowtrain is slower "
        "with 2 threads than with 1 (candle's threads on these small matrices; issue 14's "
        "subject), PyTorch a little faster.",
        "",
        "| flow | threads | flowtrain ms/step | zuko ms/step | flowtrain / zuko steps/s | parameters (flowtrain / zuko) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, _, _ in PAIRS:
        for threads in (1, 2):
            a = float(np.median(ms[(name, threads, "flowtrain")]))
            b = float(np.median(ms[(name, threads, "zuko")]))
            pa, pb = params[name]
            lines.append(f"| {name} | {threads} | {a:.2f} | {b:.2f} | {b / a:.2f}× | {pa:,} / {pb:,} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out:
        write_section(args.out, lines[0], section)



if __name__ == "__main__":
    main()
