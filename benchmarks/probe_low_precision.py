"""Probe: does lower precision make the CPU backbone meet the 0.5x-of-eager target?

Usage::

    python -m benchmarks.probe_low_precision
    python -m benchmarks.probe_low_precision --repeats 3 --no-write

The fp32 ONNX Runtime graph runs the shipped S0 at 0.56-0.65x eager ("CPU fast path");
what is left is the arithmetic itself. This times the backbone alone (the PSF convolution
and normalisation are ~25 ms of a restore either way) on one normalised, reflect-padded
512 px frame (544 px), one after the other in one process, with the live worker's
thread count:

* eager torch, BatchNorm folded, float32 (the reference);
* eager torch under `torch.autocast("cpu", dtype=torch.bfloat16)`;
* eager torch with the weights and input cast to bfloat16;
* ONNX Runtime float32 (the shipped fast path's graph);
* ONNX Runtime int8, static QDQ quantization (per-channel int8 weights, uint8
  activations calibrated on `--calibration` frames) of Conv only, and of Conv, MatMul and
  ConvTranspose.

Each row reports its median time, the ratio to eager float32, and the largest and mean
difference from eager float32 relative to the output's range (the export check of the
fp32 graph allows 1e-4). Writes the "CPU fast path: lower precision (probe)" section of
RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_cpu_fastpath import test_frame
from benchmarks.results import RESULTS, update_section
from ctirf_live.inference.live import worker_threads
from ctirf_live.inference.onnx_backend import OnnxBackbone
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.onnx_export import INPUT_NAME, BackboneMaps, export_backbone_onnx

SECTION = "CPU fast path: lower precision (probe)"
PAD = 16  # Restorer's reflect padding of a 512 px frame


def normalised_input(seed: int, size: int) -> np.ndarray:
    """A test frame scaled by its 98th percentile (Eq. 1) and padded as `Restorer` does."""
    frame = test_frame(size, seed).astype(np.float32)
    norm = np.minimum(frame / np.percentile(frame, 98), 1.0)
    return np.pad(norm, PAD, mode="reflect")[None, None].astype(np.float32)


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of `fn()` after one warm-up call, and its last output."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def quantize(fp32: Path, out: Path, ops: list[str], calibration: list[np.ndarray]) -> Path:
    """Static QDQ int8 quantization of `ops` in the graph at `fp32`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.frames = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            frame = next(self.frames, None)
            return None if frame is None else {INPUT_NAME: frame}

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Frames(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="et2dnet_s0_60x_sim", help="checkpoint or shipped name")
    p.add_argument("--size", type=int, default=512, help="frame side before padding (px)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT threads")
    p.add_argument("--calibration", type=int, default=4, help="int8 calibration frames")
    p.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Time every precision on the same input; print and record the table."""
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    threads = args.threads or worker_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    model = Restorer(args.model, device="cpu", backend="torch").inference_model
    backbone = BackboneMaps(model.backbone).eval()  # the (g, b) maps, as the graph returns
    x = normalised_input(7, args.size)
    xt = torch.from_numpy(x)
    rows: list[tuple[str, float, np.ndarray]] = []

    def add(label: str, fn: Callable[[], np.ndarray]) -> None:
        median, out = timed(fn, args.repeats)
        rows.append((label, median, out))
        print(f"{label}: {median * 1000:.0f} ms", flush=True)

    with torch.inference_mode():
        add("eager float32 (folded)", lambda: backbone(xt).numpy())

        def autocast() -> np.ndarray:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return backbone(xt).float().numpy()

        add("eager, bfloat16 autocast", autocast)
        half = copy.deepcopy(backbone).to(torch.bfloat16)
        xh = xt.to(torch.bfloat16)
        add("eager, bfloat16 weights and input", lambda: half(xh).float().numpy())

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_backbone_onnx(model, Path(tmp) / "fp32.onnx", tuple(x.shape[-2:]))
        session = OnnxBackbone._open(fp32, threads)
        add("ONNX Runtime float32", lambda: session.run(None, {INPUT_NAME: x})[0])
        calibration = [normalised_input(seed, args.size) for seed in range(args.calibration)]
        for ops in (["Conv"], ["Conv", "MatMul", "ConvTranspose"]):
            name = "_".join(ops)
            q = quantize(fp32, Path(tmp) / f"int8_{name}.onnx", ops, calibration)
            qs = OnnxBackbone._open(q, threads)
            add(
                f"ONNX Runtime int8 QDQ ({', '.join(ops)})",
                lambda s=qs: s.run(None, {INPUT_NAME: x})[0],
            )

    ref, eager = rows[0][2], rows[0][1]
    span = float(ref.max() - ref.min())
    table = [
        "| path | median (ms) | vs eager float32 | max / mean difference (of range) |",
        "|---|---|---|---|",
    ]
    for label, median, out in rows:
        diff = np.abs(out.astype(np.float32) - ref)
        table.append(
            f"| {label} | {median * 1000:.0f} | {median / eager:.2f}x | "
            f"{diff.max() / span:.1e} / {diff.mean() / span:.1e} |"
        )
    load_after = os.getloadavg()[0]
    text = "\n".join(
        [
            f"Command: `python -m benchmarks.probe_low_precision` ({date.today()})",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
            f"cores, torch {torch.__version__}, {threads} thread(s); load average before "
            f"{load_before:.2f}, after {load_after:.2f} (1 min): other work on the cores "
            "inflates absolute times, the rows ran one after the other, so read the ratios. "
            f"Backbone alone on one {args.size} px frame padded to {x.shape[-1]} px, median "
            f"of {args.repeats} after a warm-up; int8 calibrated on {args.calibration} frames.",
            "",
            *table,
            "",
        ]
    )
    print(text)
    if not args.no_write:
        update_section(SECTION, text)


if __name__ == "__main__":
    main()
