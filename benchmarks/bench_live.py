"""Benchmark live cTIRF: does the hook slow the acquisition, and how fast does it keep up?

Usage::

    python -m benchmarks.bench_live
    python -m benchmarks.bench_live --variant tiny --stream-seconds 10 --no-write

1. Acquisition wall time with and without the hook, same sequence on the demo rig
   (camera `RealTime` 1, so frames come at camera speed; EPI, 512x512, 50 ms exposure,
   raw OME-TIFF written in both cases), runs alternated, medians compared. The hook
   runs the model in `preview` policy on the same CPU.
2. End-to-end latency (frame arrival in `frameReady` to result) p50/p95 and processed
   frames/s for 512x512 and 2048x2048 frames, ET2dNet S0 and tiny: a feeder thread
   calls `frameReady` at a fixed camera rate with Poisson frames (the simulator itself
   renders a 2048x2048 frame in ~0.5 s, too slow to drive this), `preview` policy.

Prints a table and writes the "## Live processing" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from datetime import date
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
import useq

from benchmarks.results import RESULTS, update_section
from ctirf_live.acquisition.core import open_core
from ctirf_live.acquisition.mda import run_mda
from ctirf_live.config import Optics
from ctirf_live.inference.live import LiveProcessor
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet

SECTION = "Live processing"
DEMO_CFG = Path(__file__).resolve().parents[1] / "acquisition_configs" / "ctirf_demo.cfg"


def make_restorer(variant: str, device: str) -> Restorer:
    """An untrained ET2dNet (speed does not depend on the weights)."""
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), variant), device=device, tile=512, overlap=32)


def acquisition_times(
    restorer: Restorer, frames: int, exposure_ms: float, repeats: int
) -> tuple[list[float], list[float], dict]:
    """Wall times (s) of the same MDA without and with the hook, alternated."""
    seq = useq.MDASequence(
        time_plan={"interval": 0, "loops": frames},
        channels=[{"config": "EPI", "group": "Illumination", "exposure": exposure_ms}],
    )
    without: list[float] = []
    with_hook: list[float] = []
    last: dict = {}
    with open_core(DEMO_CFG) as core, TemporaryDirectory() as tmp:
        core.setProperty("Camera", "RealTime", "1")
        core.mda.run(seq, output=str(Path(tmp) / "warm.ome.tiff"))  # cold slide, caches
        processor = LiveProcessor(restorer, policy="preview")
        processor.warm_up((core.getImageHeight(), core.getImageWidth()))
        with processor:
            for i in range(repeats):
                for hooked in (False, True):
                    raw = str(Path(tmp) / f"raw{i}{int(hooked)}.ome.tiff")
                    handlers = [processor] if hooked else []
                    t0 = time.perf_counter()
                    run_mda(core, seq, handlers=handlers, sinks=[raw])
                    (with_hook if hooked else without).append(time.perf_counter() - t0)
            processor.wait_until_idle(120)
            last = processor.stats.to_dict()
    return without, with_hook, last


def stream(restorer: Restorer, size: int, fps: float, seconds: float) -> dict:
    """Feed `size`^2 frames at `fps` for `seconds`; the processor's final stats."""
    rng = np.random.default_rng(0)
    base = rng.poisson(300, (size, size)).astype(np.uint16)
    seq = useq.MDASequence(time_plan={"interval": 1 / fps, "loops": int(fps * seconds)})
    events = list(seq)
    processor = LiveProcessor(restorer, policy="preview")
    processor.warm_up((size, size))

    def feed() -> None:
        processor.sequenceStarted(seq, {"image_infos": [{"height": size, "width": size}]})
        t0 = time.perf_counter()
        for i, ev in enumerate(events):
            delay = t0 + i / fps - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            processor.frameReady(np.roll(base, i, axis=1), ev, {})
        processor.sequenceFinished(seq)

    with processor:
        feeder = threading.Thread(target=feed)
        feeder.start()
        feeder.join()
        processor.wait_until_idle(600)
    return processor.stats.to_dict()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="S0", help="ET2dNet size for the acquisition runs")
    p.add_argument(
        "--stream-variants", nargs="+", default=["S0", "tiny"], help="ET2dNet sizes streamed"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--frames", type=int, default=30, help="frames per acquisition run")
    p.add_argument("--exposure", type=float, default=50.0, help="camera exposure (ms)")
    p.add_argument("--repeats", type=int, default=3, help="acquisition runs per condition")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--camera-fps", type=float, default=20.0, help="stream rate")
    p.add_argument("--stream-seconds", type=float, default=20.0)
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run both benchmarks, print the table, update RESULTS.md."""
    args = parse_args(argv)
    restorer = make_restorer(args.variant, args.device)
    without, hooked, acq_stats = acquisition_times(
        restorer, args.frames, args.exposure, args.repeats
    )
    ratio = statistics.median(hooked) / statistics.median(without)
    camera_s = args.frames * args.exposure / 1000
    rows = []
    for variant in args.stream_variants:
        model = restorer if variant == args.variant else make_restorer(variant, args.device)
        for size in args.sizes:
            s = stream(model, size, args.camera_fps, args.stream_seconds)
            rows.append((variant, size, s))
            print(f"{variant} {size}x{size}: {s}", flush=True)

    threads = torch.get_num_threads()
    lines = [
        f"Command: `python -m benchmarks.bench_live` ({date.today()})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"usable (torch {torch.__version__}, {threads} threads), device {restorer.device}, "
        "no GPU lent to this session. Models: ET2dNet with untrained weights (speed only), "
        "tile 512, overlap 32. The cores are shared with other processes: repeated runs "
        "vary.",
        "",
        f"**Acquisition with and without the hook** (ET2dNet {args.variant}; demo rig, "
        "camera RealTime 1, "
        f"{args.frames} EPI frames 512x512 at {args.exposure:g} ms = {camera_s:.1f} s of "
        f"exposure, raw OME-TIFF; hook in preview policy on the same CPU; "
        f"{args.repeats} runs each, alternated):",
        "",
        "| | median wall time (s) | runs (s) |",
        "|---|---|---|",
        f"| without hook | {statistics.median(without):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in without)} |",
        f"| with hook | {statistics.median(hooked):.2f} | "
        f"{', '.join(f'{t:.2f}' for t in hooked)} |",
        "",
        f"Ratio with/without: **{ratio:.3f}** (target <= 1.02). Hook over all runs: "
        f"{acq_stats['processed']} frames processed, {acq_stats['skipped']} skipped "
        f"(preview: newest wins), {acq_stats['errors']} errors.",
        "",
        f"**Latency and throughput** (frames fed to `frameReady` at {args.camera_fps:g} fps "
        f"for {args.stream_seconds:g} s, preview policy, CPU; latency percentiles are over "
        "the processed frames, so few samples where the model is slow):",
        "",
        "| model | frame | latency p50 (ms) | latency p95 (ms) | processed fps | processed "
        "| skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, size, s in rows:
        lines.append(
            f"| {variant} | {size}x{size} | {s['latency_p50_ms']:.0f} | "
            f"{s['latency_p95_ms']:.0f} | {s['processed_fps']:.2f} | {s['processed']} | "
            f"{s['skipped']} |"
        )
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_section(SECTION, text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
