"""CPU fast path: `Restorer.restore` on one 512x512 frame, eager vs folded vs ONNX Runtime.

Usage::

    python -m benchmarks.bench_cpu_fastpath
    python -m benchmarks.bench_cpu_fastpath --repeats 3 --stream-seconds 10 --no-write
    python -m benchmarks.bench_cpu_fastpath --compile    # adds torch.compile (minutes)

With the shipped S0 (`et2dnet_s0_60x_sim`), in one process and one after the other:

1. `Restorer.restore` median of `--repeats` calls after two warm-up calls, for
   * eager, tiled as before this path existed (the 16 px edge padding made a 512 frame
     544 px, cut into four 512 px tiles),
   * eager, one pass (a frame that fits the tile runs in one forward pass),
   * BatchNorm folded (`models/fold.py`), one pass,
   * ONNX Runtime for the backbone (PSF convolution in torch), one pass, with the
     export + verification time and the verification error,
   * optionally `torch.compile(dynamic=False)` on the folded backbone (with compile time).
   The issue's target: ONNX <= 0.5x eager (one pass) in the same run.
2. Live latency: `benchmarks.bench_live.stream` feeds 512x512 frames to a
   `LiveProcessor` (preview policy, the worker's default threads) at half the rate the
   fast path sustains; target p50 <= 1.2x the bare `Restorer.restore` time.

Threads: every row uses the live worker's policy (cores - 1, at least 1) unless
`--threads` says otherwise. Writes the "## CPU fast path" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date

import numpy as np
import torch

from benchmarks.bench_live import stream
from benchmarks.results import RESULTS, update_section
from ctirf_live.inference.live import worker_threads
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.tiling import Tile, plan_tiles

SECTION = "CPU fast path"
MODEL = "et2dnet_s0_60x_sim"


class TiledRestorer(Restorer):
    """The tile plan before the one-pass rule: any frame larger than the tile is tiled."""

    def plan(self, shape, tile=None) -> list[Tile]:  # type: ignore[override]
        tile = self.tile if tile is None else tile
        return plan_tiles((int(shape[-2]), int(shape[-1])), tile, min(self.overlap, tile // 2))


def test_frame(size: int, seed: int = 0) -> np.ndarray:
    """A Poisson frame with some structure (with denormals flushed, as `Restorer` does on
    the CPU, speed barely depends on the content: within 5% on uniform noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    signal = 400 + 300 * (np.sin(xx / 9.0) * np.cos(yy / 13.0)) ** 2
    return rng.poisson(signal).astype(np.uint16)


def time_restore(restorer: Restorer, frame: np.ndarray, repeats: int) -> tuple[float, list[float]]:
    """Median and all times (s) of `restorer.restore(frame)` after two warm-up calls."""
    restorer.restore(frame)
    restorer.restore(frame)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        restorer.restore(frame)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help="checkpoint or shipped name")
    p.add_argument("--size", type=int, default=512, help="frame side (px)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per row")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT threads")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--stream-seconds", type=float, default=30.0, help="live stream length")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Time each path, stream through the live hook, print and record the table."""
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    threads = args.threads or worker_threads()
    torch.set_num_threads(threads)
    frame = test_frame(args.size)
    rows: list[tuple[str, float, list[float], str]] = []

    def add(label: str, restorer: Restorer, note: str = "") -> np.ndarray:
        median, times = time_restore(restorer, frame, args.repeats)
        rows.append((label, median, times, note))
        print(f"{label}: {median * 1000:.0f} ms", flush=True)
        return restorer.restore(frame)

    tiled = TiledRestorer(args.model, device="cpu", backend="torch", fold=False)
    n_tiles = len(tiled.plan((args.size + 32, args.size + 32)))
    add(f"eager, {n_tiles} tiles of {tiled.tile} px (before)", tiled)
    eager = Restorer(args.model, device="cpu", backend="torch", fold=False)
    ref = add("eager, one pass", eager)
    folded = Restorer(args.model, device="cpu", backend="torch")
    out = add("BatchNorm folded, one pass", folded)
    fold_err = float(np.abs(out - ref).max() / (ref.max() - ref.min()))
    fast = Restorer(args.model, device="cpu", backend="onnx")
    t0 = time.perf_counter()
    fast.restore(frame)  # exports (or loads the cached graph) and verifies
    setup_s = time.perf_counter() - t0
    verify = next(iter(fast._onnx.errors.values()), None) if fast._onnx else None
    note = f"first call {setup_s:.1f} s (export or cache load)"
    if verify is not None:
        note += f", verified to {verify:.1e} of range"
    out = add("ONNX Runtime backbone + torch PSF, one pass", fast, note)
    onnx_err = float(np.abs(out - ref).max() / (ref.max() - ref.min()))
    if args.compile:
        t0 = time.perf_counter()
        compiled = Restorer(args.model, device="cpu", backend="torch", compile=True)
        compiled.restore(frame)
        compile_s = time.perf_counter() - t0
        add("torch.compile(dynamic=False), folded", compiled, f"compile {compile_s:.0f} s")

    bare = rows[3][1]
    fps = 0.5 / bare
    live = stream(fast, args.size, fps, args.stream_seconds)
    eager_one = rows[1][1]
    lines = [
        f"Command: `python -m benchmarks.bench_cpu_fastpath` ({date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} and ONNX Runtime with {threads} thread(s) (the live "
        f"worker's policy, cores - 1). Load average before the run {load_before:.2f}, after "
        f"{os.getloadavg()[0]:.2f} (1 min); other work on the cores inflates absolute times, "
        "the rows ran one after the other in one process, so their ratios are the figures to read. "
        f"Model: shipped `{args.model}`; one {args.size}x{args.size} uint16 frame; "
        f"median of {args.repeats} `Restorer.restore` calls after two warm-ups.",
        "",
        "| path | median (ms) | vs eager one pass | runs (ms) | notes |",
        "|---|---|---|---|---|",
    ]
    for label, median, times, note in rows:
        lines.append(
            f"| {label} | {median * 1000:.0f} | {median / eager_one:.2f}x | "
            f"{', '.join(f'{t * 1000:.0f}' for t in times)} | {note} |"
        )
    ratio = bare / eager_one
    lines += [
        "",
        f"ONNX path vs eager one pass: **{ratio:.3f}x** (target <= 0.5x: "
        f"{'met' if ratio <= 0.5 else 'not met'}); vs the tiled eager path before: "
        f"{bare / rows[0][1]:.2f}x. Output difference from eager: folded "
        f"{fold_err:.1e}, ONNX {onnx_err:.1e} of the output range.",
        "",
        f"**Live latency** (`benchmarks.bench_live.stream`: {args.size}x{args.size} frames "
        f"at {fps:.2f} fps, half the rate the ONNX path sustains, for "
        f"{args.stream_seconds:g} s, preview policy, ONNX backend, worker threads "
        f"{worker_threads()}): p50 {live['latency_p50_ms']:.0f} ms, p95 "
        f"{live['latency_p95_ms']:.0f} ms, {live['processed']} processed, "
        f"{live['skipped']} skipped; p50 / bare restore = "
        f"**{live['latency_p50_ms'] / 1000 / bare:.2f}x** (target <= 1.2x).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_section(SECTION, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
