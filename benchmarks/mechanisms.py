"""Throughput of the training mechanisms: random warp, each reconstruction loss, LRD and EMA.

    python benchmarks/mechanisms.py [--batch 8] [--repeats 5] [--device auto]

Shapes: pixels at 128/256/512 px (3 ch) and taef2 latents of those images (32 ch x 16/32/64 px).
Baselines measured in the same run:
- random_warp vs a bare ``grid_sample`` with a precomputed grid (the cost of drawing the random grid);
- each loss (forward + backward) vs MSE;
- ``LRDropout.step`` and ``EMA.update`` vs a plain ``Adam.step`` on the same parameters.
Figures are the best of ``--repeats`` samples after one warm-up; on a shared CPU they are still noisy.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from stagewise.device import pick_device
from stagewise.train.ema import EMA
from stagewise.train.losses import LOSSES
from stagewise.train.lrd import LRDropout
from stagewise.train.warp import WarpConfig, random_warp, warp_grid

SHAPES = [("pixels 128", 3, 128), ("pixels 256", 3, 256), ("pixels 512", 3, 512),
          ("taef2 128", 32, 16), ("taef2 256", 32, 32), ("taef2 512", 32, 64)]  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, min_seconds: float = 0.05) -> float:
    """Seconds per call: the best of ``repeats`` samples, each averaging as many calls as fill
    ``min_seconds``. The minimum, not the median, because other work on a shared machine only adds time."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def bench_warp_and_losses(batch: int, repeats: int, device: torch.device) -> None:
    print(f"\nrandom_warp and losses, batch {batch}, images/s (ratio to the baseline of the row)")
    header = f"{'shape':<12} {'C x px':>8} {'grid_sample':>12} {'random_warp':>16}"
    header += "".join(f" {name:>16}" for name in LOSSES)
    print(header)
    gen = torch.Generator(device=device).manual_seed(0)
    cfg = WarpConfig()
    for label, channels, px in SHAPES:
        x = torch.rand(batch, channels, px, px, device=device) * 2 - 1
        target = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
        grid = warp_grid(batch, px, px, gen, cfg, device)
        base = timed(lambda: F.grid_sample(x, grid, padding_mode="border", align_corners=False), device, repeats)
        warp = timed(lambda: random_warp(x, gen, cfg), device, repeats)
        row = f"{label:<12} {f'{channels}x{px}':>8} {batch / base:>12.0f} {batch / warp:>9.0f} ({warp / base:4.1f}x)"

        def loss_step(fn):
            pred = x.clone().requires_grad_(True)
            fn(pred, target).backward()

        mse_s = timed(lambda: loss_step(LOSSES["mse"]), device, repeats)
        for name, fn in LOSSES.items():
            seconds = mse_s if name == "mse" else timed(lambda fn=fn: loss_step(fn), device, repeats)
            row += f" {batch / seconds:>9.0f} ({seconds / mse_s:4.1f}x)"
        print(row, flush=True)


def bench_optimizer_mechanisms(repeats: int, device: torch.device) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)]).to(device)  # 4.2 M params
    n_params = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    lrd = LRDropout(0.3, torch.Generator(device=device).manual_seed(0))
    ema = EMA(model, halflife_kimg=10.0)
    adam_s = timed(opt.step, device, repeats)
    lrd_s = timed(lambda: lrd.step(opt), device, repeats)
    ema_s = timed(lambda: ema.update(model, 8), device, repeats)
    print(f"\noptimizer-side mechanisms on {n_params / 1e6:.1f} M parameters, ms per step")
    print(f"Adam.step           {adam_s * 1e3:8.2f}")
    print(f"LRDropout.step      {lrd_s * 1e3:8.2f}  ({lrd_s / adam_s:.2f}x Adam.step; includes the Adam step)")
    print(f"EMA.update          {ema_s * 1e3:8.2f}  ({ema_s / adam_s:.2f}x Adam.step)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per figure; the best is shown (default 5)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_warp_and_losses(args.batch, args.repeats, device)
    bench_optimizer_mechanisms(args.repeats, device)


if __name__ == "__main__":
    main()
