"""The GPU path measured on whatever device is present (issue 15, item 2), in one short run.

Usage::

    python -m benchmarks.bench_gpu                 # on a CUDA GPU, under 8 minutes
    python -m benchmarks.bench_gpu --compile       # also torch.compile / CUDA graphs
    python -m benchmarks.bench_gpu --quick         # small sizes, for a CPU (rows say CPU)

Measures, each after a warm-up:

1. ET2dNet S0 (shipped `et2dnet_s0_60x_sim`) frames/s at 2048x2048 through the live
   worker's runner (`runners.make_runner`: on CUDA pinned uint16 uploads, copy/compute
   streams, one whole-frame pass, half precision), frames pipelined as the worker does.
   Target >= 100 frames/s (a Zyla 4.2 at full frame).
2. ET3dNet S0 stacks/s at 6x1024x1024 the same way (an untrained ET3dNet S0 unless
   `--model3d` names a checkpoint: speed does not depend on the weights). Target >= 10.
3. Preview latency p50/p95 at 512x512 through a `LiveProcessor` fed at `--preview-fps`
   (`benchmarks.bench_live.stream`). Target p95 <= 50 ms.
4. The hook's added acquisition wall time on the demo rig (simulated camera in real
   time; `benchmarks.bench_live.acquisition_times`). Target <= 2%.

`--quick` shrinks every size (frames 256, stacks 6x128x128, preview 256, short runs) so a
CPU finishes in a few minutes; `--tiny` uses untrained tiny networks (tests). The rows go
into the "## GPU path" table of benchmarks/RESULTS.md, labelled with the device; rows
of other devices already in the table are kept.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_live import acquisition_times, stream
from benchmarks.results import RESULTS, update_section
from ctirf_live.config import Optics
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.runners import make_runner
from ctirf_live.models.etnet import ET2dNet, ET3dNet

SECTION = "GPU path"
MODEL_2D = "et2dnet_s0_60x_sim"
HEADER = "| device | measurement | result | target | met |"


def device_label(device: torch.device) -> str:
    """What the rows are labelled with: the GPU's name, or `CPU (N cores)`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def camera_frames(shape: tuple[int, ...], n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` distinct uint16 Poisson frames or stacks (the camera's dtype)."""
    rng = np.random.default_rng(seed)
    base = rng.poisson(400, shape).astype(np.uint16)
    return [np.roll(base, 7 * i, axis=-1) for i in range(n)]


def throughput(restorer: Restorer, shape: tuple[int, ...], n: int) -> float:
    """Items per second through the live runner, staged one ahead as the worker does."""
    runner = make_runner(restorer)
    items = camera_frames(shape, min(n, 8))
    runner.warmup(shape)
    for item in items[:2]:
        runner.finish(runner.launch(runner.stage(item)))
    t0 = time.perf_counter()
    pending = None
    for i in range(n):
        launched = runner.launch(runner.stage(items[i % len(items)]))
        if pending is not None:
            runner.finish(pending)
        pending = launched
    runner.finish(pending)
    return n / (time.perf_counter() - t0)


def build(dims: int, args: argparse.Namespace, device: str) -> Restorer:
    """The restorer of one measurement (shipped S0 2D, untrained S0 3D, or tiny ones)."""
    common = {"device": device, "compile": args.compile}
    if args.tiny:
        torch.manual_seed(0)
        net = (ET2dNet if dims == 2 else ET3dNet)(Optics(), "tiny")
        return Restorer(net, tile=args.tile, **common)
    if dims == 2:
        return Restorer(args.model2d, tile=args.tile, **common)
    if args.model3d:
        return Restorer(args.model3d, tile=args.tile, **common)
    torch.manual_seed(0)
    return Restorer(ET3dNet(Optics(), "S0"), tile=args.tile, **common)


def merge_rows(old_section: str, label: str, rows: list[str]) -> list[str]:
    """Table rows of other devices from the existing section, then this run's rows."""
    kept = [
        line
        for line in old_section.splitlines()
        if line.startswith("| ") and line != HEADER and not line.startswith(f"| {label} |")
    ]
    return kept + rows


def existing_section(path: Path) -> str:
    """The current text of this benchmark's section ('' if none)."""
    if not path.exists():
        return ""
    text = path.read_text()
    start = text.find(f"## {SECTION}\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (full sizes by default, `--quick` for a CPU)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="small sizes and short runs (CPU)")
    p.add_argument("--tiny", action="store_true", help="untrained tiny networks (tests)")
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA graphs)")
    p.add_argument("--model2d", default=MODEL_2D)
    p.add_argument("--model3d", default=None, help="ET3dNet checkpoint (default: untrained S0)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--results", type=Path, default=RESULTS, help="RESULTS.md to update")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    sizes = {
        "frame": 256 if args.quick else 2048,
        "stack": (6, 128, 128) if args.quick else (6, 1024, 1024),
        "preview": 256 if args.quick else 512,
        "frames": 6 if args.quick else 300,
        "stacks": 3 if args.quick else 60,
        "preview_fps": 2.0 if args.quick else 30.0,
        "preview_s": 4.0 if args.quick else 20.0,
        "acq_frames": 4 if args.quick else 100,
        "acq_exposure": 10.0,
        "acq_repeats": 1 if args.quick else 3,
    }
    for key, value in sizes.items():
        setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> list[str]:
    """Run the four measurements; returns (and records) the table rows."""
    args = parse_args(argv)
    from ctirf_live.models.device import select_device

    device = select_device(args.device)
    label = device_label(device)
    t_start = time.perf_counter()
    r2 = build(2, args, str(device))
    n = args.frame
    fps = throughput(r2, (n, n), args.frames)
    print(f"ET2dNet {n}x{n}: {fps:.1f} frames/s", flush=True)
    r3 = build(3, args, str(device))
    sps = throughput(r3, args.stack, args.stacks)
    stack = "x".join(map(str, args.stack))
    print(f"ET3dNet {stack}: {sps:.2f} stacks/s", flush=True)
    p = args.preview
    live = stream(r2, p, args.preview_fps, args.preview_s)
    print(f"preview {p}x{p}: {live}", flush=True)
    without, hooked, _ = acquisition_times(r2, args.acq_frames, args.acq_exposure, args.acq_repeats)
    added = statistics.median(hooked) / statistics.median(without) - 1
    print(f"hook: {without} vs {hooked} s", flush=True)
    total = time.perf_counter() - t_start
    nets = "tiny (untrained)" if args.tiny else "S0"
    extra = ", torch.compile" if args.compile else ""
    prec = "fp16" if r2.half else "fp32"
    rows = [
        f"| {label} | ET2dNet {nets} frames/s at {n}x{n} ({r2.backend}, {prec}{extra}) | "
        f"{fps:.1f} | >= 100 at 2048x2048 | {_met(fps >= 100, n == 2048)} |",
        f"| {label} | ET3dNet {nets} stacks/s at {stack} ({r3.backend}, {prec}{extra}) | "
        f"{sps:.2f} | >= 10 at 6x1024x1024 | {_met(sps >= 10, args.stack == (6, 1024, 1024))} |",
        f"| {label} | preview latency p50 / p95 at {p}x{p}, {args.preview_fps:g} fps fed | "
        f"{live['latency_p50_ms']:.0f} / {live['latency_p95_ms']:.0f} ms "
        f"({live['processed']} processed, {live['skipped']} skipped) | p95 <= 50 ms at 512x512 | "
        f"{_met(live['latency_p95_ms'] <= 50, p == 512)} |",
        f"| {label} | hook's added acquisition wall time ({args.acq_frames} frames, "
        f"{args.acq_exposure:g} ms, demo rig) | {added * 100:+.1f}% | <= 2% | "
        f"{_met(added <= 0.02, not args.quick)} |",
    ]
    print("\n".join(rows))
    if not args.no_write:
        table = merge_rows(existing_section(args.results), label, rows)
        text = "\n".join(
            [
                f"Command: `python -m benchmarks.bench_gpu{' --quick' if args.quick else ''}` "
                f"(last run {date.today()} on {label}, {total:.0f} s). Each device keeps "
                "its own rows; CPU rows come from `--quick` (small sizes), so they show the "
                "path works, not the GPU targets."
                + (
                    ""
                    if any(not r.startswith("| CPU") for r in table)
                    else " No GPU row yet: run this script where a GPU is available."
                ),
                "",
                HEADER,
                "|---|---|---|---|---|",
                *table,
            ]
        )
        update_section(SECTION, text, args.results)
        print(f"wrote {args.results}")
    return rows


def _met(ok: bool, comparable: bool) -> str:
    """yes/no where the run used the target's size, else n/a."""
    if not comparable:
        return "n/a (other size)"
    return "yes" if ok else "no"


if __name__ == "__main__":
    main()
