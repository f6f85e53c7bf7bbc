"""Benchmark the EViT-UNet variants: parameters, GFLOPs and forward time per frame.

Usage::

    python -m benchmarks.bench_backbone --variants tiny S0 --device cpu
    python -m benchmarks.bench_backbone --device cuda --write

With ``--write`` the table (and the ET2dNet training-step rate, S0, batch 4) goes into
the "Backbone speed" section of ``benchmarks/RESULTS.md``.

Forward pass, batch 1, ``torch.no_grad``, eval mode, after a warm-up run; the reported
time is the median of ``--repeats`` runs. The large frame (2048 x 2048 by default) is
only timed when its estimate (area ratio x the small-frame time, attention cost being
linear in area) fits in ``--max-seconds``; otherwise the table says so.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from benchmarks.results import update_section
from ctirf_live.config import LossWeights, Optics
from ctirf_live.models.etnet import ET2dNet
from ctirf_live.models.evit_unet import VARIANTS, EViTUNet, count_parameters, estimate_flops
from ctirf_live.training.losses import HybridLoss


def time_forward(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median forward time in milliseconds after one warm-up run."""

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    with torch.no_grad():
        model(x)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--size", type=int, default=512, help="side of the small frame")
    p.add_argument("--large", type=int, default=2048, help="side of the large frame (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        help="skip the large frame when its estimated time exceeds this",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--train-crops", type=int, nargs="*", default=[256, 512])
    p.add_argument("--write", action="store_true", help="record the results in RESULTS.md")
    return p.parse_args(argv)


def train_steps_per_s(device: torch.device, crop: int, steps: int = 4) -> float:
    """ET2dNet S0 hybrid-loss training steps per second (batch 4, AdamW), after a warm-up."""
    model = ET2dNet(Optics(), "S0").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    loss_fn = HybridLoss(LossWeights())
    x = torch.rand(4, 1, crop, crop, device=device)
    y = torch.rand(4, 1, crop, crop, device=device)

    def step() -> None:
        out = model(x)
        loss, _ = loss_fn(out.ctirf, y, out.recon, x, out.g, out.b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Print one table row per variant."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    s, big = args.size, args.large
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = (
        f"{'variant':>8} {'params(M)':>10} {f'GFLOPs@{s}':>12} {f'ms@{s}':>10} {f'ms@{big}':>12}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.variants:
        model = EViTUNet(name).eval()
        params = count_parameters(model) / 1e6
        gflops = estimate_flops(model, (1, 1, s, s)) / 1e9
        model.to(device)
        ms_small = time_forward(model, torch.rand(1, 1, s, s, device=device), args.repeats)
        large = "-"
        if big > 0:
            estimate_s = ms_small * (big / s) ** 2 / 1e3
            if estimate_s <= args.max_seconds:
                x = torch.rand(1, 1, big, big, device=device)
                large = f"{time_forward(model, x, 1):.0f}"
            else:
                large = f"skip(~{estimate_s:.0f}s)"
        print(
            f"{name:>8} {params:>10.2f} {gflops:>12.1f} {ms_small:>10.1f} {large:>12}", flush=True
        )
        rows.append(f"| {name} | {params:.2f} | {gflops:.1f} | {ms_small:.0f} | {large} |")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rates = []
    for crop in args.train_crops:
        rate = train_steps_per_s(device, crop)
        print(f"training S0 batch 4 crop {crop}: {rate:.2f} steps/s", flush=True)
        rates.append(f"| {crop}x{crop} | {rate:.2f} | {4 * rate:.1f} |")
    if args.write:
        _write(args, device, rows, rates)


def _write(
    args: argparse.Namespace, device: torch.device, rows: list[str], rates: list[str]
) -> None:
    s, big = args.size, args.large
    where = platform.processor() or platform.machine()
    command = f"python -m benchmarks.bench_backbone --device {device} --write"
    text = f"""Command: `{command}` ({date.today()})

Machine: {where}, device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads.
EViT-UNet forward, batch 1, no_grad, median of {args.repeats} after a warm-up; the
{big}x{big} frame is timed once, and skipped when its estimate exceeds
{args.max_seconds:g} s. GFLOPs counted with torch's FlopCounterMode.

| variant | parameters (M) | GFLOPs at {s}x{s} | ms per {s}x{s} | ms per {big}x{big} |
|---|---|---|---|---|
{chr(10).join(rows)}

ET2dNet S0 training (hybrid loss, AdamW, batch 4):

| crop | steps/s | crops/s |
|---|---|---|
{chr(10).join(rates)}
"""
    update_section(f"Backbone speed ({device.type})", text)


if __name__ == "__main__":
    main()
