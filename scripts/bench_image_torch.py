"""flowtrain's image flows written in PyTorch, for the side-by-side training benchmark.

The same functions as `flowtrain train --family glow` and `--family realnvp_image` (with their
defaults: affine couplings, LU 1x1 convolutions, no learned prior, actnorm after RealNVP's
couplings) and the same recipe, trained on the rows `flowtrain splits` wrote, so that test
bits/dim are on identical inputs:

- logit pre-processing with alpha = 0.05 of the pixel range widened by half a grey level;
- squeeze (channel 4c + 2i + j holds pixel (2y + i, 2x + j) of channel c), factor-out of the
  second half of the channels, unsqueeze, a standard normal base;
- Glow step: actnorm (initialised from the first batch), W = P L (U + diag(sign e^s)) from a
  random rotation, a channel coupling; RealNVP: checkerboard couplings, squeeze, channel
  couplings (alternating halves), each followed by actnorm, 2K checkerboard couplings last;
- couplings as flowtrain writes them: the conditioner sees all C channels with the moved ones
  zeroed and emits (t, h) for all C; y = (x + t) sigmoid(h + 2) on the moved elements;
  conditioner 3x3 conv -> ReLU -> 1x1 conv -> ReLU -> 3x3 conv (zero-initialised), weights
  and biases uniform in +-1/sqrt(fan_in);
- Adam (0.9, 0.999, 1e-8), lr with a linear warm-up of 100 steps then cosine decay to 1% of
  the peak at the last step, global gradient-norm clip 10, batches of per-epoch shuffles
  running across epochs, fresh uniform dequantisation noise every step, validation every
  `--eval-every` steps and the best state restored before the test.

A step (what `--steps` counts and the median times) is drawing the batch, forward, backward,
clipping and the Adam update. Writes a JSON summary (`--out`).

Usage: bench_image_torch.py SPLITS_DIR --family glow --layers 4 --levels 2 --hidden 32
       --steps 3000 --threads 1 [--eval-every 100] [--seed 0] [--out summary.json]
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# OpenMP and MKL read their thread counts once, when torch loads.
_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
import torch  # noqa: E402

ALPHA = 0.05


def conv(cin, cout, k, zero):
    c = torch.nn.Conv2d(cin, cout, k, padding=k // 2)
    bound = 1.0 / math.sqrt(cin * k * k)
    with torch.no_grad():
        if zero:
            c.weight.zero_()
            c.bias.zero_()
        else:
            c.weight.uniform_(-bound, bound)
            c.bias.uniform_(-bound, bound)
    return c


class Coupling(torch.nn.Module):
    def __init__(self, shape, mask, flip, hidden):
        super().__init__()
        c, h, w = shape
        ch = torch.arange(c).view(c, 1, 1)
        y = torch.arange(h).view(1, h, 1)
        x = torch.arange(w).view(1, 1, w)
        kept = ((y + x) % 2 == 0) if mask == "checkerboard" else (ch < c // 2)
        kept = kept.expand(c, h, w) != flip
        self.register_buffer("keep", kept.float().unsqueeze(0))
        self.register_buffer("moved", 1.0 - self.keep)
        self.c = c
        self.net = torch.nn.Sequential(conv(c, hidden, 3, False), torch.nn.ReLU(),
                                       conv(hidden, hidden, 1, False), torch.nn.ReLU(),
                                       conv(hidden, 2 * c, 3, True))

    def forward(self, x):
        kept = x * self.keep
        h = self.net(kept)
        t, s = h[:, :self.c], h[:, self.c:]
        ls = torch.nn.functional.logsigmoid(s + 2.0)
        y = (x + t) * ls.exp()
        return kept + y * self.moved, (ls * self.moved).flatten(1).sum(1)


class ActNorm(torch.nn.Module):
    def __init__(self, c, spatial):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(c))
        self.log_scale = torch.nn.Parameter(torch.zeros(c))
        self.spatial = spatial
        self.initialized = False

    def forward(self, x):
        if not self.initialized and self.training:
            with torch.no_grad():
                per = x.transpose(0, 1).reshape(x.shape[1], -1)
                mean = per.mean(1)
                std = ((per - mean[:, None]) ** 2).mean(1).sqrt()
                self.bias.copy_(-mean)
                self.log_scale.copy_(-(std + 1e-6).log())
            self.initialized = True
        z = (x + self.bias.view(1, -1, 1, 1)) * self.log_scale.exp().view(1, -1, 1, 1)
        return z, self.spatial * self.log_scale.sum().expand(x.shape[0])


class InvConv(torch.nn.Module):
    def __init__(self, c, spatial, gen):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        d = torch.diagonal(upper)
        self.register_buffer("p", p.float())
        self.register_buffer("sign", torch.sign(d).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(c, c), -1))
        self.register_buffer("upper_mask", torch.triu(torch.ones(c, c), 1))
        self.register_buffer("eye", torch.eye(c))
        self.lower = torch.nn.Parameter(lower.float())
        self.upper = torch.nn.Parameter(upper.float())
        self.log_s = torch.nn.Parameter(d.abs().log().float())
        self.spatial = spatial

    def forward(self, x):
        l = self.lower * self.lower_mask + self.eye
        u = self.upper * self.upper_mask + torch.diag(self.sign * self.log_s.exp())
        w = self.p @ l @ u
        z = torch.nn.functional.conv2d(x, w[:, :, None, None])
        return z, self.spatial * self.log_s.sum().expand(x.shape[0])


def squeeze(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(z):
    n, c4, h, w = z.shape
    c = c4 // 4
    return z.reshape(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)


class Level(torch.nn.Module):
    def __init__(self, family, shape, level, levels, layers, hidden, gen):
        super().__init__()
        c, h, w = shape
        last = level + 1 == levels
        self.pre = torch.nn.ModuleList()
        if family == "realnvp_image":
            for i in range(2 * layers if last else layers):
                self.pre.append(Coupling(shape, "checkerboard", i % 2 == 1, hidden))
                self.pre.append(ActNorm(c, h * w))
        self.squeezes = not (family == "realnvp_image" and last)
        self.steps = torch.nn.ModuleList()
        self.inner = None
        if not self.squeezes:
            return
        s = (4 * c, h // 2, w // 2)
        for i in range(layers):
            if family == "glow":
                self.steps.append(ActNorm(s[0], s[1] * s[2]))
                self.steps.append(InvConv(s[0], s[1] * s[2], gen))
                self.steps.append(Coupling(s, "channel", False, hidden))
            else:
                self.steps.append(Coupling(s, "channel", i % 2 == 1, hidden))
                self.steps.append(ActNorm(s[0], s[1] * s[2]))
        if not last:
            self.keep = s[0] // 2
            self.inner = Level(family, (self.keep, s[1], s[2]), level + 1, levels, layers, hidden, gen)

    def forward(self, x):
        ld = torch.zeros(x.shape[0], dtype=x.dtype)
        for b in self.pre:
            x, d = b(x)
            ld = ld + d
        if not self.squeezes:
            return x, ld
        x = squeeze(x)
        for b in self.steps:
            x, d = b(x)
            ld = ld + d
        if self.inner is not None:
            h, d = self.inner(x[:, :self.keep])
            x = torch.cat([h, x[:, self.keep:]], 1)
            ld = ld + d
        return unsqueeze(x), ld


class Flow(torch.nn.Module):
    def __init__(self, family, shape, low, high, levels, layers, hidden, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.low, self.high = low, high
        self.a = (1 - 2 * ALPHA) / (high - low)
        self.shape = shape
        self.body = Level(family, shape, 0, levels, layers, hidden, gen)

    def log_prob(self, x):
        x = x.view(-1, *self.shape)
        p = (x - self.low) * self.a + ALPHA
        lp, lq = p.log(), (1 - p).log()
        z = lp - lq
        ld = (math.log(self.a) - lp - lq).flatten(1).sum(1)
        z, d = self.body(z)
        z = z.flatten(1)
        base = -0.5 * (z * z).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
        return base + ld + d


def learning_rate(step, total, peak, warmup=100, min_ratio=0.01):
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - min(warmup, step)) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def mean_nll(flow, x, chunk=1024):
    flow.eval()
    with torch.no_grad():
        total = sum(float(flow.log_prob(x[i:i + chunk]).double().sum()) for i in range(0, len(x), chunk))
    flow.train()
    return -total / len(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("splits")
    ap.add_argument("--family", choices=["glow", "realnvp_image"], default="glow")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = json.load(open(os.path.join(args.splits, "splits.json")))
    shape = tuple(info["image"])
    step = max(info["dequantization_steps"])
    low, high = info["range"][0] - step / 2, info["range"][1] + step / 2
    load = lambda name: torch.from_numpy(np.load(os.path.join(args.splits, name)).astype(np.float32))
    train, val, test = load("train.npy"), load("val.npy"), load("test.npy")
    flow = Flow(args.family, shape, low, high, args.levels, args.layers, args.hidden, args.seed)
    params = sum(p.numel() for p in flow.parameters())
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(train), generator=gen), 0
    times, history = [], []
    best = (math.inf, 0, None)
    started = time.perf_counter()
    for k in range(args.steps):
        t0 = time.perf_counter()
        idx = []
        while len(idx) < args.batch_size:
            if pos == len(order):
                order, pos = torch.randperm(len(train), generator=gen), 0
            take = min(args.batch_size - len(idx), len(order) - pos)
            idx.extend(order[pos:pos + take].tolist())
            pos += take
        x = train[idx]
        x = x + step * (torch.rand(x.shape, generator=gen) - 0.5)
        loss = -flow.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        for g in opt.param_groups:
            g["lr"] = learning_rate(k, args.steps, args.lr)
        opt.step()
        times.append(time.perf_counter() - t0)
        if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
            v = mean_nll(flow, val)
            history.append({"step": k + 1, "seconds": sum(times), "val_nll": v})
            if v < best[0]:
                best = (v, k + 1, {n: t.detach().clone() for n, t in flow.state_dict().items()})
    wall = time.perf_counter() - started
    flow.load_state_dict(best[2])
    test_nll = mean_nll(flow, test)
    dim = int(np.prod(shape))
    summary = {
        "system": "pytorch", "torch": torch.__version__, "family": args.family,
        "threads": args.threads, "parameters": params, "steps": args.steps,
        "best_step": best[1], "median_step_ms": float(np.median(times[20:] or times)) * 1e3,
        "train_seconds": sum(times), "wall_seconds": wall, "validation_nll": best[0],
        "test_nll": test_nll, "test_bits_per_dim": test_nll / (dim * math.log(2)),
        "history": history,
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), file=sys.stderr)


if __name__ == "__main__":
    torch.set_num_interop_threads(1)
    main()
