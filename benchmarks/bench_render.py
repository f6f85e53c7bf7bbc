"""Benchmark the simulated microscope: time of `snap()` per frame, EPI and TIRF.

Usage::

    python -m benchmarks.bench_render
    python -m benchmarks.bench_render --sizes 512 --repeats 9 --no-write

For each frame size and illumination: the first frame at a new stage position with
empty caches (specimen rasterisation, plane FFTs and OTFs: "cold"), then the median of
``--repeats`` frames each taken one z step (0.2 um) above the last, as in a z-stack
(plane spectra reused, OTFs of new defocus values computed). Prints a table and
writes it to the "## Simulator frame render" section of ``benchmarks/RESULTS.md``
(other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import scipy

from benchmarks.results import RESULTS, update_section
from ctirf_live.sim.sample import cell_at
from ctirf_live.sim.scope import SENSOR_SHAPE, SimulatedMicroscope

SECTION = "## Simulator frame render"


def time_frames(
    size: int, mode: str, repeats: int, seed: int = 0
) -> tuple[float, list[float], list[float]]:
    """(cold s, steady s per frame at one focus, s per frame one z step apart)."""
    scope = SimulatedMicroscope(seed=seed)
    scope.clear_cache(otfs=True)
    cell_at.cache_clear()
    sh, sw = SENSOR_SHAPE
    scope.roi = ((sw - size) // 2, (sh - size) // 2, size, size)
    scope.set_illumination(mode)
    start = time.perf_counter()
    scope.snap()
    cold = time.perf_counter() - start
    steady = []
    for _ in range(repeats):
        start = time.perf_counter()
        scope.snap()
        steady.append(time.perf_counter() - start)
    stepped = []
    for _ in range(repeats):
        scope.z_um += scope.optics.z_step_um
        start = time.perf_counter()
        scope.snap()
        stepped.append(time.perf_counter() - start)
    scope.clear_cache(otfs=True)
    return cold, steady, stepped


def machine() -> str:
    """CPU model and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} CPU cores usable, no GPU used"


def table(rows: list[tuple[int, str, float, list[float], list[float]]]) -> str:
    """Markdown table of the timings."""
    lines = [
        "| frame | mode | cold first frame (s) | steady, same focus: median (min-max) s | "
        "new focus each frame: median (min-max) s |",
        "|---|---|---|---|---|",
    ]
    for size, mode, cold, steady, stepped in rows:
        lines.append(
            f"| {size}x{size} | {mode} | {cold:.2f} | {statistics.median(steady):.3f} "
            f"({min(steady):.3f}-{max(steady):.3f}) | {statistics.median(stepped):.3f} "
            f"({min(stepped):.3f}-{max(stepped):.3f}) |"
        )
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the simulator section of the results file."""
    update_section(SECTION.removeprefix("## "), text, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--modes", nargs="+", default=["EPI", "TIRF"], choices=["EPI", "TIRF"])
    p.add_argument("--repeats", type=int, default=7, help="steady-state frames per case")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            cold, steady, stepped = time_frames(size, mode, args.repeats)
            rows.append((size, mode, cold, steady, stepped))
            median = statistics.median(steady)
            step = statistics.median(stepped)
            print(f"{size}x{size} {mode}: cold {cold:.2f} s, steady {median:.3f} s, z {step:.3f} s")
    text = table(rows)
    print(text)
    if args.no_write:
        return
    command = "python " + " ".join(["benchmarks/bench_render.py", *sys.argv[1:]])
    report = (
        f"Command: `{command}` ({date.today().isoformat()})\n\n"
        f"Machine: {machine()}; numpy {np.__version__}, scipy {scipy.__version__}.\n\n"
        "`SimulatedMicroscope.snap()` (render + camera noise), 60X objective, dense F-actin "
        "slide, centred ROI. Cold: first frame at a new stage position with empty caches "
        "(generate the cells, rasterise the specimen's 47 planes, FFT them, compute the "
        "depth-dependent Gibson-Lanni OTFs for the focus). Steady: median of "
        f"{args.repeats} frames at the same focus (a time-lapse, or any focus met before: "
        "OTFs are cached per emitter height and focus). New focus: each frame one z step "
        "(0.2 um) above the last, a focus never imaged before, so all 47 OTFs are computed "
        "(psfmodels, ~3 ms each). The cores are shared with other processes (a training "
        "run when this was recorded): repeated runs vary up to ~2x."
        "\n\n" + text
    )
    write_section(report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
