"""The write side at camera rate: sustained MB/s of the stores a live run writes.

Usage::

    nice -n 10 python -m benchmarks.bench_writers                 # 200 frames, 2048x2048
    python -m benchmarks.bench_writers --frames 40 --size 512 --no-write   # a quick look
    python -m benchmarks.bench_writers --dir /mnt/fast/tmp         # another disk

For each store and pixel type, `--frames` frames of `--size`^2 go to a fresh temporary
folder under `--dir` (default: the system's temp dir) as fast as they can be written,
then every file is fsynced; the folder is deleted before the next row.

- cTIRF stores (`ctirf_live.inference.writers`): `OmeTiffResultWriter` (pwrite at plane
  offsets) and `OmeZarrResultWriter` (yaozarrs + tensorstore, one chunk per plane),
  given float32 results as the live worker gives them, so converting to float16/uint16
  (`encoding`, with its clip count) is inside the time;
- the disk alone: O_DIRECT sequential writes of float32-frame-sized blocks (the ceiling);
- the raw sink (ome-writers, which pymmcore-plus writes raw frames with): every
  installed backend (tifffile for OME-TIFF; tensorstore, zarr-python, acquire-zarr for
  OME-Zarr), given frames already in the stored type.

Per row: `accepted` = stored bytes / time until the last write returned (page cache
included; ome-writers queues frames in memory, so its figure is only the queue's),
`sustained` = stored bytes / time until the data was on the disk (close +
fsync), and the frames/s that implies. The question the issue asks: does float32
2048^2 at 100 frames/s (1678 MB/s) keep up, and which setting would. Also the
conversion alone (ms per frame). Writes the "## Writers" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import useq

from benchmarks.results import RESULTS, update_section
from ctirf_live.inference.encoding import Encoding
from ctirf_live.inference.writers import OmeTiffResultWriter, OmeZarrResultWriter

SECTION = "Writers"
CAMERA_FPS = 100
MB = 1e6


@dataclass
class Row:
    store: str
    dtype: str
    frames: int
    nbytes: int
    accepted_s: float
    sustained_s: float
    note: str = ""

    @property
    def accepted(self) -> float:
        return self.nbytes / MB / self.accepted_s

    @property
    def sustained(self) -> float:
        return self.nbytes / MB / self.sustained_s

    @property
    def fps(self) -> float:
        return self.frames / self.sustained_s


def frames_like_ctirf(size: int, count: int = 4, seed: int = 0) -> list[np.ndarray]:
    """A few distinct float32 frames in camera counts (100..~6000), cycled while writing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    out = []
    for i in range(count):
        structure = 2500 * (1 + np.sin(40 * xx + i) * np.cos(33 * yy - i))
        out.append((structure + rng.gamma(4.0, 120.0, (size, size))).astype(np.float32))
    return out


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (or `path` itself) to the disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def stored_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def timed(write: Callable[[int], None], close: Callable[[], None], n: int, path: Path,
          ) -> tuple[float, float]:
    """(seconds until the last write returned, seconds until it was all on the disk)."""
    t0 = time.perf_counter()
    for i in range(n):
        write(i)
    accepted = time.perf_counter() - t0
    close()
    fsync_tree(path)
    return accepted, time.perf_counter() - t0


def bench_ctirf(kind: str, dtype: str, frames: list[np.ndarray], n: int, folder: Path) -> Row:
    """One of our cTIRF stores, fed float32 results."""
    size = frames[0].shape[-1]
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": n})
    suffix = ".ome.tiff" if kind == "tiff" else ".ome.zarr"
    cls = OmeTiffResultWriter if kind == "tiff" else OmeZarrResultWriter
    writer = cls(folder / f"ctirf{suffix}", encoding=Encoding(dtype))  # type: ignore[arg-type]
    writer.open(seq, (size, size), pixel_size_um=0.1)
    accepted, sustained = timed(
        lambda i: writer.write({"t": i}, frames[i % len(frames)]), writer.close, n, writer.path
    )
    clipped = writer.encoding.clipped_pixels
    note = f"{clipped} px clipped" if clipped else ""
    name = "ctirf OmeTiffResultWriter" if kind == "tiff" else "ctirf OmeZarrResultWriter"
    return Row(name, dtype, n, n * size * size * np.dtype(dtype).itemsize, accepted,
               sustained, note)


def bench_disk(n: int, frame_bytes: int, folder: Path) -> Row:
    """The disk alone: `n` sequential O_DIRECT writes of one frame's bytes (no page cache,
    next to no CPU), the ceiling any store can reach here."""
    import mmap

    block = max(frame_bytes // 4096, 1) * 4096
    buffer = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buffer.write(np.random.default_rng(0).bytes(block))
    path = folder / "disk.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    try:
        accepted, sustained = timed(lambda i: os.pwrite(fd, buffer, i * block),
                                    lambda: None, n, path)
    finally:
        os.close(fd)
    return Row("disk alone (O_DIRECT)", "bytes", n, n * block, accepted, sustained)


def ome_writers_backends() -> list[tuple[str, str]]:
    """(format, backend) of every ome-writers backend installed here."""
    modules = {"tifffile": "tifffile", "tensorstore": "tensorstore", "zarr-python": "zarr",
               "acquire-zarr": "acquire_zarr"}
    found = [("ome-tiff", "tifffile")] if importlib.util.find_spec("tifffile") else []
    for backend in ("tensorstore", "zarr-python", "acquire-zarr"):
        if importlib.util.find_spec(modules[backend]):
            found.append(("ome-zarr", backend))
    return found


def bench_raw(fmt: str, backend: str, dtype: str, frames: list[np.ndarray], n: int,
              folder: Path) -> Row:
    """ome-writers (the raw sink) with one backend, fed frames already in `dtype`."""
    from ome_writers import (
        AcquisitionSettings,
        OmeTiffFormat,
        OmeZarrFormat,
        create_stream,
        dims_from_standard_axes,
    )

    size = frames[0].shape[-1]
    typed = [f.astype(dtype) for f in frames]
    path = folder / f"raw{'.ome.tiff' if fmt == 'ome-tiff' else '.ome.zarr'}"
    form = OmeTiffFormat(backend=backend) if fmt == "ome-tiff" else OmeZarrFormat(
        backend=backend)  # type: ignore[arg-type]
    settings = AcquisitionSettings(
        root_path=str(path),
        dimensions=dims_from_standard_axes({"t": n, "y": size, "x": size}),
        dtype=dtype,
        format=form,
        overwrite=True,
    )
    stream = create_stream(settings)
    accepted, sustained = timed(
        lambda i: stream.append(typed[i % len(typed)]), stream.close, n, path
    )
    return Row(f"raw ome-writers {backend}", dtype, n, n * size * size * np.dtype(dtype).itemsize,
               accepted, sustained)


def encode_ms(frames: list[np.ndarray], dtype: str, repeats: int = 10) -> float:
    """Median ms to convert one float32 frame (with the clip count)."""
    enc = Encoding(dtype)  # type: ignore[arg-type]
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        enc.encode(frames[i % len(frames)])
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def disk_of(folder: Path) -> str:
    """The device and file system `folder` is on, from /proc/mounts (Linux)."""
    best, where = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fs = line.split()[:3]
            if str(folder.resolve()).startswith(mount) and len(mount) > len(best):
                best, where = mount, f"{dev} ({fs}, mounted on {mount})"
    except OSError:
        pass
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = parser.parse_args()
    n, size = args.frames, args.size
    need = n * size * size * 4 * 1.2
    free = shutil.disk_usage(args.dir).free
    if free < need + 2**30:
        raise SystemExit(f"{args.dir} has {free / 1e9:.1f} GB free; one row needs "
                         f"{need / 1e9:.1f} GB (+1 GB): use fewer --frames or another --dir")
    frames = frames_like_ctirf(size)
    plan: list[tuple[str, Callable[[Path], Row]]] = [
        ("disk", lambda f: bench_disk(n, size * size * 4, f))
    ]
    stores = {"tiff": ("float32", "uint16"), "zarr": ("float32", "float16", "uint16")}
    for kind, dtypes in stores.items():
        for dtype in dtypes:
            plan.append((f"{kind} {dtype}",
                         lambda f, k=kind, d=dtype: bench_ctirf(k, d, frames, n, f)))
    for fmt, backend in ome_writers_backends():  # raw frames are uint16; tensorstore, which
        # could take cTIRF too, in every type (OME-TIFF has no float16)
        dtypes = ("uint16", "float32", "float16") if backend == "tensorstore" else ("uint16",)
        for dtype in dtypes:
            plan.append((f"{backend} {dtype}",
                         lambda f, a=fmt, b=backend, d=dtype: bench_raw(a, b, d, frames, n, f)))
    rows: list[Row] = []
    for label, run in plan:
        folder = Path(tempfile.mkdtemp(prefix="bench_writers_", dir=args.dir))
        try:
            rows.append(run(folder))
            r = rows[-1]
            print(f"{r.store:32s} {r.dtype:8s} accepted {r.accepted:7.0f} MB/s  sustained "
                  f"{r.sustained:7.0f} MB/s  {r.fps:6.1f} frames/s {r.note}", flush=True)
        except Exception as exc:  # a backend that cannot take this dtype: say so, go on
            print(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    conversions = {d: encode_ms(frames, d) for d in ("float16", "uint16")}
    text = report(rows, conversions, n, size, args.dir)
    print(text)
    if not args.no_write:
        update_section(SECTION, text, RESULTS)
        print(f"wrote the {SECTION!r} section of {RESULTS}")


def report(rows: list[Row], conversions: dict[str, float], n: int, size: int,
           folder: Path) -> str:
    need = {d: size * size * np.dtype(d).itemsize * CAMERA_FPS / MB
            for d in ("float32", "float16", "uint16")}
    lines = [
        f"`nice -n 10 python -m benchmarks.bench_writers --frames {n} --size {size}` on "
        f"{date.today().isoformat()}: {n} frames of {size}x{size} per row, written as fast as "
        f"they go into a fresh folder on **this VM's disk** ({disk_of(folder)}; a shared "
        f"virtual disk, not a microscope PC's NVMe), then fsynced; {os.cpu_count()} cores "
        f"shared with two training runs, {platform.python_version()}. At {CAMERA_FPS} "
        f"frames/s a {size}^2 stream needs {need['float32']:.0f} MB/s as float32, "
        f"{need['uint16']:.0f} MB/s as float16/uint16.",
        "",
        "| store | dtype | accepted MB/s | sustained MB/s | frames/s sustained | "
        f"keeps {CAMERA_FPS} fps |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = "yes" if r.fps >= CAMERA_FPS else "no"
        note = f" ({r.note})" if r.note else ""
        lines.append(f"| {r.store} | {r.dtype}{note} | {r.accepted:.0f} | {r.sustained:.0f} | "
                     f"{r.fps:.1f} | {ok} |")
    lines += [
        "",
        "Conversion from the float32 result (numpy, one thread, with the clip count): "
        + ", ".join(f"{d} {ms:.1f} ms/frame" for d, ms in conversions.items()) + ".",
        "",
    ]
    disk = next((r for r in rows if r.store.startswith("disk")), None)
    if disk:
        lines.append(
            f"The disk alone takes {disk.sustained:.0f} MB/s ({disk.fps:.0f} "
            f"float32 {size}^2 frames/s). Where a store stays well under that, the limit was "
            "the CPU this process got (copying into the page cache, conversion, chunk and "
            "OME bookkeeping), not the disk."
        )
        lines.append("")
    ctirf = [r for r in rows if r.store.startswith("ctirf")]
    f32 = [r for r in ctirf if r.dtype == "float32"]
    best = max(ctirf, key=lambda r: r.fps) if ctirf else None
    if f32 and best:
        verdict = "keeps" if max(r.fps for r in f32) >= CAMERA_FPS else "does not keep"
        lines.append(
            f"float32 {size}^2 at {CAMERA_FPS} frames/s {verdict} up on this disk (best "
            f"float32 store {max(r.fps for r in f32):.0f} frames/s); the fastest cTIRF "
            f"setting here is {best.store} {best.dtype} at {best.fps:.0f} frames/s. "
            f"Halving the bytes (uint16 or float16) halves what the disk must take; where even "
            f"that is short, cTIRF has to be stored at a reduced rate (the preview policy "
            f"keeps raw frames complete and stores the cTIRF frames the model finishes)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
