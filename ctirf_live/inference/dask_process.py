"""Chunk-wise `ctirf process` with Dask: archives larger than memory, on one machine or many.

Where it runs (`scheduler`): "local", a `distributed.LocalCluster` on this machine (one
worker per GPU, else one per 4 CPU cores, one thread each); a dask.distributed scheduler
address ("tcp://host:8786"; input, output and model must be on paths every worker
sees); "sync", this process with Dask's synchronous scheduler; or a `distributed.Client`.
`choose_scheduler` is the rule `ctirf process` follows by default: OME-Zarr in or out is
processed chunk-wise, on a LocalCluster when the data exceed a quarter of this machine's
memory and in this process otherwise; OME-TIFF to OME-TIFF stays on the in-memory path.

How:

- input: OME-Zarr (an image, or a bioformats2raw collection of series as `acquire`
  writes) or OME-TIFF (every series), read lazily block by block by the workers; the
  channels asked for (as `process_file` selects them), in OME order t, c, z, y, x.
- ET2dNet, per frame. Each frame's scale (its 98th percentile, Eq. 1) is computed first,
  one task per frame, and passed to the frame's blocks, so every block is normalised as
  the whole frame is. A frame no larger than `block` px is one block and is restored
  exactly as the in-memory path does. A larger frame is cut into blocks of at least
  `block` px, each extended by `depth` (the Restorer's tile overlap) on its inner sides
  (`dask.array.map_overlap`), restored with the frame's scale (edges reflect-padded by
  EDGE_PAD as in the Restorer, inner sides by real pixels), and overlap-added across each
  2*depth seam with sin^2 / cos^2 ramps whose sum is one, as tiles blend inside a block.
  Such frames agree with the in-memory result to about the tile-to-tile differences of the
  network, not exactly: a block's tiles are not the whole frame's.
- ET3dNet: one block per whole stack (Z, Y, X), restored by `Restorer.restore` (its Z
  windows and normalisation): the same as the in-memory path.
- one model per worker, loaded on the worker's first block and kept (`worker_restorer`);
  on a LocalCluster with GPUs, worker i uses cuda:i.
- output: OME-Zarr v0.5 (yaozarrs), zarr chunks of one plane and block, written by the
  workers in parallel into `<output>.partial`, renamed into place when complete. Metadata
  as the in-memory writer's: the input's ctirf metadata plus `ctirf_processing` (model,
  optics, PSF, source, series, channels, warnings) as the `ctirf` attribute, channels
  `cTIRF <channel>`, pixel size, z step, display windows from the data.
- not here: the per-plane consistency scores of the in-memory path.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.atomic import atomic_write_json
from ctirf_live.data.normalize import percentile_scale
from ctirf_live.data.tiff import KEY, SeriesLayout, TiffInfo, TiffSeries, read_ome_layout
from ctirf_live.inference.process import (
    TIFF_SUFFIXES,
    check_axes,
    check_finite,
    select_channels,
)
from ctirf_live.inference.restorer import EDGE_PAD, Restorer, pixel_size_warning

INSTALL_HINT = "pip install 'ctirf-live[dask]'"
BLOCK = 2048
"""Default block side (px): frames up to this size are one block each."""
MEMORY_FRACTION = 0.25
"""`auto` goes to a LocalCluster when input + float32 output exceed this share of RAM."""
OME_ORDER = "TCZYX"
SCHEDULERS = ("auto", "none", "sync", "local")
_UNITS_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, None: 1.0}


def _dask() -> Any:
    try:
        import dask.array as da
    except ImportError:
        raise ImportError(f"chunk-wise processing needs Dask: {INSTALL_HINT}") from None
    return da


def is_zarr(path: str | Path) -> bool:
    """Whether `path` names an OME-Zarr store (by suffix, or a folder with zarr metadata)."""
    path = Path(path)
    if path.name.lower().rstrip("/").endswith(".zarr"):
        return True
    return path.is_dir() and any((path / n).is_file() for n in ("zarr.json", ".zattrs", ".zgroup"))


# ------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build its Restorer (small and picklable)."""

    model: str
    device: str = "auto"
    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    threads: int | None = None

    def build(self, device: str | None = None) -> Restorer:
        """A Restorer for this spec on `device` (default the spec's)."""
        return Restorer(
            self.model,
            device=device or self.device,
            tile=self.tile,
            overlap=self.overlap,
            batch_size=self.batch_size,
        )


_MODELS: dict[tuple[ModelSpec, str], tuple[Restorer, threading.Lock]] = {}
_MODELS_LOCK = threading.Lock()


def _current_worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def _worker_device(spec: ModelSpec, worker: Any | None) -> str:
    """cuda:i for LocalCluster worker i (named 0, 1, ...) when the device is auto on GPUs."""
    import torch

    if spec.device != "auto" or worker is None or not torch.cuda.is_available():
        return spec.device
    name = worker.name
    if isinstance(name, int):
        return f"cuda:{name % torch.cuda.device_count()}"
    return spec.device


def worker_restorer(spec: ModelSpec) -> tuple[Restorer, threading.Lock]:
    """This worker's Restorer for `spec` (loaded once per worker, or per process outside
    dask.distributed) and the lock that keeps its worker threads one at a time on it."""
    worker = _current_worker()
    key = (spec, worker.address if worker is not None else f"pid {os.getpid()}")
    with _MODELS_LOCK:
        if key not in _MODELS:
            if spec.threads:
                import torch

                torch.set_num_threads(spec.threads)
            _MODELS[key] = (spec.build(_worker_device(spec, worker)), threading.Lock())
        return _MODELS[key]


# ------------------------------------------------------------------------ reading


def _tiff_block(file: str, index: int, block_info: dict | None = None) -> np.ndarray:
    """The part of TIFF series `index` a dask block covers (read through tifffile's zarr)."""
    import tifffile
    import zarr

    where = tuple(slice(a, b) for a, b in block_info[None]["array-location"])  # type: ignore[index]
    with tifffile.imread(file, series=index, aszarr=True) as store:
        return np.asarray(zarr.open(store, mode="r")[where])


def _tiff_layouts(path: Path) -> list[SeriesLayout]:
    """The series of a TIFF, or of the TIFFs in a folder (each file's own), as `read_sources`."""
    if not path.is_dir():
        return read_ome_layout(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no TIFF files in {path}; pass an OME-TIFF or a folder")
    return [s for f in files for s in read_ome_layout(f) if s.file.resolve() == f.resolve()]


def _tiff_series(path: Path) -> list[TiffSeries]:
    da = _dask()
    out = []
    for s in _tiff_layouts(path):
        chunks = (*(1 for _ in s.shape[:-2]), *s.shape[-2:])
        data = da.map_blocks(
            _tiff_block,
            str(s.file),
            s.index,
            dtype=s.dtype,
            chunks=tuple((c,) * (n // c) for c, n in zip(chunks, s.shape, strict=True)),
            meta=np.empty((0,) * len(s.shape), s.dtype),
        )
        out.append(TiffSeries(data, s.info, s.file))
    return out


def _scale_of(dataset: Any, axes: str, axis: str) -> float | None:
    for t in dataset.coordinateTransformations or []:
        if getattr(t, "type", None) == "scale" and axis in axes:
            return float(t.scale[axes.index(axis)])
    return None


def _zarr_image(group: Path, image: Any, name: str, attrs: dict[str, Any]) -> TiffSeries:
    da = _dask()
    ms = image.multiscales[0]
    axes = "".join(a.name for a in ms.axes).upper()
    units = {a.name.upper(): getattr(a, "unit", None) for a in ms.axes}
    dataset = ms.datasets[0]
    info = TiffInfo(axes=axes, name=name or ms.name or "", metadata=dict(attrs.get(KEY) or {}))
    for axis, field in (("X", "pixel_size_um"), ("Z", "z_step_um")):
        value = _scale_of(dataset, axes, axis)
        if value is not None:
            setattr(info, field, value * _UNITS_UM.get(units.get(axis), 1.0))
    omero = getattr(image, "omero", None)
    if omero is not None and omero.channels:
        info.channel_names = [c.label or "" for c in omero.channels]
    return TiffSeries(da.from_zarr(str(group / dataset.path)), info, group)


def _zarr_series(path: Path) -> list[TiffSeries]:
    import yaozarrs

    try:
        root = yaozarrs.open_group(str(path))
        meta = root.ome_metadata()
    except Exception as exc:  # yaozarrs/pydantic errors of any kind: not an OME-Zarr we read
        raise ValueError(f"{path} is not a readable OME-Zarr ({exc})") from None
    if getattr(meta, "multiscales", None):
        return [_zarr_image(path, meta, "", dict(root.attrs))]
    if getattr(meta, "bioformats2raw_layout", None) is None:
        raise ValueError(f"{path} holds no OME-Zarr image or bioformats2raw series")
    names: list[str] = []
    with contextlib.suppress(Exception):  # the OME group is optional: count 0, 1, ...
        names = list(yaozarrs.open_group(str(path / "OME")).ome_metadata().series)
    if not names:
        names = [str(i) for i in range(10_000) if (path / str(i)).is_dir()]
    out = []
    for name in names:
        group = yaozarrs.open_group(str(path / name))
        out.append(_zarr_image(path / name, group.ome_metadata(), name, dict(group.attrs)))
    if not out:
        raise ValueError(f"{path} holds no series")
    return out


def read_chunked(source: str | Path) -> list[TiffSeries]:
    """Every series of an OME-Zarr store or OME-TIFF (file or folder), pixels as lazy
    dask arrays (`TiffSeries.data`)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    return _zarr_series(source) if is_zarr(source) else _tiff_series(source)


def _ome_order(data: Any, axes: str) -> tuple[Any, str]:
    """`data` transposed to OME order (t, c, z, y, x; those present)."""
    check_axes(axes)
    order = "".join(a for a in OME_ORDER if a in axes)
    return data.transpose([axes.index(a) for a in order]), order


# ------------------------------------------------------------------------ blocks


def axis_chunks(n: int, block: int, depth: int) -> tuple[int, ...]:
    """Chunk sizes along an axis of `n`: `block` each, a short remainder merged into the
    last, so every chunk holds at least 2*depth (its seams' ramps never meet)."""
    size = max(block, 2 * depth)
    count = max(1, n // size)
    sizes = [size] * count
    sizes[-1] += n - size * count
    return tuple(sizes)


def _ramp_weights(lo: int, hi: int, start: int, stop: int, n: int, depth: int) -> np.ndarray:
    """Weights over an extended block [lo, hi) of core [start, stop) on an axis of `n`:
    sin^2 up across the seam at `start`, cos^2 down across the one at `stop`, 1 elsewhere
    and at the frame's edges. A neighbour's ramp is the complement: they sum to one."""
    x = np.arange(lo, hi, dtype=np.float64)
    w = np.ones(hi - lo)
    if start > 0:
        t = np.clip((x - (start - depth) + 0.5) / (2 * depth), 0.0, 1.0)
        w *= np.sin(0.5 * np.pi * t) ** 2
    if stop < n:
        t = np.clip((x - (stop - depth) + 0.5) / (2 * depth), 0.0, 1.0)
        w *= np.cos(0.5 * np.pi * t) ** 2
    return w


def _extent(chunks: tuple[int, ...], i: int, depth: int) -> tuple[int, int, int, int]:
    """(extended start, extended stop, core start, core stop) of chunk `i`."""
    start = sum(chunks[:i])
    stop = start + chunks[i]
    n = sum(chunks)
    return max(0, start - depth), min(n, stop + depth), start, stop


def _meta(data: Any, dtype: Any = np.float32) -> np.ndarray:
    """An empty array of `data`'s rank: tells dask the output type without calling the
    block function (which would load a model where the graph is built)."""
    return np.empty((0,) * data.ndim, dtype)


def _frame_scale(frame: np.ndarray, percentile: float) -> np.ndarray:
    return np.full((1,) * frame.ndim, percentile_scale(frame, percentile))


def _restore_frames(frames: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Whole frames (leading axes of length 1), as the in-memory path restores them."""
    restorer, lock = worker_restorer(spec)
    with lock:
        out = restorer.restore(frames.reshape(frames.shape[-2:]))
    return check_finite(out, "a frame").reshape(frames.shape).astype(np.float32, copy=False)


def _restore_block(
    block: np.ndarray,
    scale: np.ndarray,
    spec: ModelSpec,
    grid: tuple[tuple[int, ...], tuple[int, ...]],
    seam: int,
    block_info: dict | None = None,
) -> np.ndarray:
    """One extended block of a frame (core chunks `grid`, extended by `seam` on inner
    sides), normalised by the frame's scale, restored, rescaled, times its ramps."""
    restorer, lock = worker_restorer(spec)
    iy, ix = block_info[None]["chunk-location"][-2:]  # type: ignore[index]
    y0, y1, cy0, cy1 = _extent(grid[0], iy, seam)
    x0, x1, cx0, cx1 = _extent(grid[1], ix, seam)
    ny, nx = sum(grid[0]), sum(grid[1])
    s = float(scale.ravel()[0])
    norm = np.clip(
        block.reshape(block.shape[-2:]).astype(np.float32) / np.float32(s),
        0,
        restorer.input_ceiling,
    )
    pad = (
        (EDGE_PAD * (y0 == 0), EDGE_PAD * (y1 == ny)),
        (EDGE_PAD * (x0 == 0), EDGE_PAD * (x1 == nx)),
    )
    padded = np.pad(norm, pad, mode="reflect")
    with lock:
        res = restorer.restore_normalised(padded)
    res = res[pad[0][0] : res.shape[0] - pad[0][1], pad[1][0] : res.shape[1] - pad[1][1]]
    check_finite(res, f"block {iy},{ix} of a frame")
    w = np.outer(
        _ramp_weights(y0, y1, cy0, cy1, ny, seam), _ramp_weights(x0, x1, cx0, cx1, nx, seam)
    )
    return (res * w * s).astype(np.float32).reshape(block.shape)


def _overlap_add(core: tuple[int, int, int, int], parts: Sequence[tuple[Any, tuple]]) -> Any:
    """Sum of the weighted extended blocks over one core block (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = core
    out = np.zeros((y1 - y0, x1 - x0), np.float32)
    for ext, (ey0, ex0) in parts:
        e = ext.reshape(ext.shape[-2:])
        ys, ye = max(y0, ey0), min(y1, ey0 + e.shape[0])
        xs, xe = max(x0, ex0), min(x1, ex0 + e.shape[1])
        if ys < ye and xs < xe:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] += e[ys - ey0 : ye - ey0, xs - ex0 : xe - ex0]
    return out


def restore_2d(data: Any, spec: ModelSpec, percentile: float, block: int, compute: Any) -> Any:
    """A dask array (..., Y, X) restored frame by frame with ET2dNet (see the module)."""
    import dask

    da = _dask()
    lead, (ny, nx) = data.shape[:-2], data.shape[-2:]
    ones = (1,) * len(lead)
    depth = max(spec.overlap, EDGE_PAD)
    ychunks, xchunks = axis_chunks(ny, block, depth), axis_chunks(nx, block, depth)
    if len(ychunks) == len(xchunks) == 1:
        frames = data.rechunk((*ones, ny, nx))
        return frames.map_blocks(_restore_frames, spec, dtype=np.float32, meta=_meta(data))
    frames = data.rechunk((*ones, ny, nx))
    scales = frames.map_blocks(
        _frame_scale,
        percentile,
        dtype=np.float64,
        chunks=(*ones, 1, 1),
        meta=_meta(data, np.float64),
    )
    scales = da.from_array(np.asarray(compute(scales)), chunks=1)  # per-frame scale first
    blocks = data.rechunk((*ones, ychunks, xchunks))
    ext_chunks = tuple(
        tuple(e1 - e0 for e0, e1, _, _ in (_extent(ch, i, depth) for i in range(len(ch))))
        for ch in (ychunks, xchunks)
    )
    weighted = da.map_overlap(
        _restore_block,
        blocks,
        scales,
        depth=[{len(lead): depth, len(lead) + 1: depth}, {}],
        boundary="none",
        trim=False,
        align_arrays=False,
        dtype=np.float32,
        meta=_meta(data),
        chunks=(*((1,) * n for n in lead), *ext_chunks),
        spec=spec,
        grid=(ychunks, xchunks),
        seam=depth,
    )
    parts = weighted.to_delayed()
    add = dask.delayed(_overlap_add, pure=True)

    def assemble(index: tuple[int, ...]) -> Any:
        rows = []
        for iy in range(len(ychunks)):
            row = []
            for ix in range(len(xchunks)):
                _, _, y0, y1 = _extent(ychunks, iy, depth)
                _, _, x0, x1 = _extent(xchunks, ix, depth)
                near = [
                    (
                        parts[(*index, jy, jx)],
                        (_extent(ychunks, jy, depth)[0], _extent(xchunks, jx, depth)[0]),
                    )
                    for jy in range(max(0, iy - 1), min(len(ychunks), iy + 2))
                    for jx in range(max(0, ix - 1), min(len(xchunks), ix + 2))
                ]
                tile = da.from_delayed(add((y0, y1, x0, x1), near), (y1 - y0, x1 - x0), np.float32)
                row.append(tile.reshape((*ones, y1 - y0, x1 - x0)))
            rows.append(row)
        return rows

    def nest(prefix: tuple[int, ...]) -> Any:
        if len(prefix) == len(lead):
            return assemble(prefix)
        return [nest((*prefix, i)) for i in range(lead[len(prefix)])]

    return da.block(nest(()))


def _restore_stacks(stacks: np.ndarray, spec: ModelSpec, z: int) -> np.ndarray:
    """Whole stacks (every axis but Z, Y, X of length 1), as the in-memory path does."""
    restorer, lock = worker_restorer(spec)
    stack = np.moveaxis(stacks, z, -3).reshape(stacks.shape[z], *stacks.shape[-2:])
    with lock:
        out = check_finite(restorer.restore(stack), "a stack")
    return np.moveaxis(out.reshape(np.moveaxis(stacks, z, -3).shape), -3, z).astype(np.float32)


def restore_3d(data: Any, axes: str, spec: ModelSpec) -> Any:
    """A dask array with a Z axis restored stack by stack with ET3dNet."""
    if "Z" not in axes:
        raise ValueError("ET3dNet needs z-stacks; this file has no Z axis (use an ET2dNet model)")
    z = axes.index("Z")
    chunks = tuple(n if i == z or i >= data.ndim - 2 else 1 for i, n in enumerate(data.shape))
    return data.rechunk(chunks).map_blocks(
        _restore_stacks, spec, z, dtype=np.float32, meta=_meta(data)
    )


# ------------------------------------------------------------------------ writing


def _image_model(job: Any, axes: str, shape: tuple[int, ...], name: str) -> Any:
    from yaozarrs import DimSpec, v05

    info = job.series.info
    dims = []
    for ax, n in zip(axes.lower(), shape, strict=True):
        if ax == "c":
            dims.append(DimSpec(name="c", size=n, type="channel"))
        elif ax == "t":
            dims.append(DimSpec(name="t", size=n, unit="second", scale=1.0))
        elif ax == "z":
            dims.append(DimSpec(name="z", size=n, unit="micrometer", scale=info.z_step_um or 1.0))
        else:
            px = info.pixel_size_um or 1.0
            dims.append(DimSpec(name=ax, size=n, unit="micrometer", scale=px))
    omero = None
    if job.channels:
        window = v05.OmeroWindow(min=0.0, max=65535.0, start=0.0, end=65535.0)
        omero = v05.Omero(
            channels=[
                v05.OmeroChannel(label=c, color="FFFFFF", window=window) for c in job.channels
            ]
        )
    return v05.Image(multiscales=[v05.Multiscale.from_dims(dims, name=name)], omero=omero)


def _write_block(block: np.ndarray, target: Any, where: tuple, channel: int) -> tuple:
    """Store one block (whole zarr chunks) and return its channel's display statistics."""
    target[where] = block
    sample = block[..., ::4, ::4]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return channel, None
    lo, hi = np.percentile(finite, (0.1, 99.9))
    return channel, (float(finite.min()), float(lo), float(hi), float(finite.max()))


def _write_tasks(result: Any, target: Any, axes: str) -> list[Any]:
    """One delayed write per block of `result` (chunks equal to the target's)."""
    import dask

    write = dask.delayed(_write_block, pure=False)
    offsets = [np.cumsum((0, *c)) for c in result.chunks]
    c_axis = axes.find("C")
    tasks = []
    for index, part in np.ndenumerate(result.to_delayed()):
        where = tuple(slice(int(o[i]), int(o[i + 1])) for o, i in zip(offsets, index, strict=True))
        channel = where[c_axis].start if c_axis >= 0 else 0
        tasks.append(write(part, target, where, channel))
    return tasks


def _set_windows(group: Path, stats: Sequence[tuple]) -> None:
    """Display windows (omero) from the blocks' statistics, as the in-memory writer does."""
    doc = _read_json(group / "zarr.json")
    channels = doc.get("attributes", {}).get("ome", {}).get("omero", {}).get("channels") or []
    merged: dict[int, list[float]] = {}
    for c, s in stats:
        if s is None:
            continue
        old = merged.get(c, s)
        merged[c] = [*map(min, old[:2], s[:2]), *map(max, old[2:], s[2:])]
    for c, (vmin, lo, hi, vmax) in merged.items():
        if c < len(channels):
            end = hi if hi > lo else vmax
            channels[c]["window"] = {"min": vmin, "max": vmax, "start": lo, "end": end}
    atomic_write_json(group / "zarr.json", doc)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def _set_attribute(group: Path, value: dict[str, Any]) -> None:
    doc = _read_json(group / "zarr.json")
    doc.setdefault("attributes", {})[KEY] = value
    atomic_write_json(group / "zarr.json", doc)


def _series_name(name: str, i: int, taken: set[str]) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or f"p{i:03d}"
    if clean in taken or clean == "OME":
        clean = f"p{i:03d}"
    taken.add(clean)
    return clean


# ------------------------------------------------------------------------ scheduling


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def input_bytes(source: str | Path) -> int:
    """What the in-memory path would hold: the input's pixels as float32, twice (in, out)."""
    source = Path(source)
    if is_zarr(source):
        series = [s.data.shape for s in _zarr_series(source)]
    else:
        series = [s.shape for s in _tiff_layouts(source)]
    return sum(2 * 4 * math.prod(shape) for shape in series)


def choose_scheduler(source: str | Path, output: str | Path, scheduler: str = "auto") -> str | None:
    """Where `ctirf process` runs: None for the in-memory path, else a `scheduler` for
    `process_chunked` (see the module docstring for the `auto` rule); names in any case."""
    scheduler = scheduler.lower() if scheduler.lower() in SCHEDULERS else scheduler
    if scheduler not in SCHEDULERS and "://" not in scheduler and ":" not in scheduler:
        raise ValueError(
            f"--scheduler {scheduler!r} is neither {', '.join(SCHEDULERS)} nor an address "
            "like tcp://host:8786"
        )
    zarr_io = is_zarr(source) or is_zarr(output)
    if scheduler == "none":
        if zarr_io:
            raise ValueError("OME-Zarr is processed chunk-wise: drop --scheduler none")
        return None
    if scheduler != "auto":
        if not is_zarr(output):
            raise ValueError("chunk-wise processing writes OME-Zarr: pass -o NAME.ome.zarr")
        return scheduler
    big = input_bytes(source) > MEMORY_FRACTION * _physical_memory()
    if zarr_io:
        if not is_zarr(output):
            raise ValueError("chunk-wise processing writes OME-Zarr: pass -o NAME.ome.zarr")
        return "local" if big else "sync"
    if big:
        raise ValueError(
            f"{source} is larger than a quarter of this machine's memory; write OME-Zarr "
            "(-o NAME.ome.zarr) to process it chunk-wise"
        )
    return None


def _local_workers(workers: int | None) -> int:
    import torch

    if workers:
        return workers
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, (os.cpu_count() or 1) // 4)


class _Runner:
    """Computes delayed tasks on the chosen scheduler, reporting each finished one."""

    def __init__(self, client: Any | None) -> None:
        self.client = client

    def compute(self, tasks: Sequence[Any], progress: Callable[[int], None] | None = None) -> list:
        if self.client is None:
            import dask

            out = []
            for task in tasks:
                out.append(dask.compute(task, scheduler="sync")[0])
                if progress:
                    progress(len(out))
            return out
        from distributed import as_completed

        futures = self.client.compute(list(tasks))
        for done, _ in enumerate(as_completed(futures), 1):
            if progress:
                progress(done)
        return self.client.gather(futures)

    def value(self, array: Any) -> np.ndarray:
        """A (small) dask array computed."""
        return np.asarray(self.compute([array])[0])

    def describe(self) -> str:
        if self.client is None:
            return "this process (dask synchronous scheduler)"
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return f"{self.client.scheduler.address} ({len(workers)} workers)"


@contextlib.contextmanager
def open_scheduler(scheduler: Any = "local", *, workers: int | None = None) -> Iterator[_Runner]:
    """A runner for "sync", "local" (a LocalCluster for the duration), an address, or a
    `distributed.Client` (left open)."""
    if scheduler == "sync":
        _dask()
        yield _Runner(None)
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError(f"a Dask cluster needs dask.distributed: {INSTALL_HINT}") from None
    if isinstance(scheduler, Client):
        yield _Runner(scheduler)
        return
    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=_local_workers(workers), threads_per_worker=1, dashboard_address=None
        )
        with cluster, Client(cluster) as client:
            yield _Runner(client)
        return
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise OSError(
            f"cannot reach the Dask scheduler at {scheduler} ({exc}); start one "
            "(`dask scheduler`, `dask worker ADDRESS`) or use --scheduler local"
        ) from None
    with client:
        yield _Runner(client)


# ------------------------------------------------------------------------ the job


def process_chunked(
    source: str | Path,
    output: str | Path,
    spec: ModelSpec,
    *,
    scheduler: Any = "local",
    channels: Sequence[str] = ("EPI",),
    overwrite: bool = False,
    block: int = BLOCK,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, list[str]]:
    """Restore every series of `source` chunk-wise into the OME-Zarr `output`; returns
    (output, warnings). See the module docstring."""
    source, output = Path(source), Path(output)
    if not is_zarr(output):
        raise ValueError("chunk-wise processing writes OME-Zarr: pass -o NAME.ome.zarr")
    if output.resolve() == source.resolve():
        raise ValueError(f"the output would replace the input {source}; choose another --out")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    if block < 64:
        raise ValueError(f"--block must be at least 64 px, got {block}")
    model_path = spec.model
    if Path(model_path).exists():
        spec = replace(spec, model=str(Path(model_path).resolve()))
    local = replace(spec, device="cpu").build()  # checks and metadata; workers load their own
    jobs = [select_channels(s, channels) for s in read_chunked(source)]
    warnings: list[str] = []
    for job in jobs:
        msg = pixel_size_warning(local.optics, job.series.info.pixel_size_um)
        if msg and msg not in warnings:
            warnings.append(msg)
        if local.dims == 3 and "Z" in job.axes:
            local.check_stack(job.data.shape[job.axes.index("Z")], job.series.info.z_step_um)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with open_scheduler(scheduler, workers=workers) as runner:
            groups, tasks = _prepare(jobs, partial, spec, local, block, runner, warnings, source)
            flat = [t for _, ts in tasks for t in ts]
            report = (lambda n: progress(n, len(flat))) if progress else None
            stats = runner.compute(flat, report)
            where = runner.describe()
        done = 0
        for group, ts in tasks:
            _set_windows(group, stats[done : done + len(ts)])
            done += len(ts)
        for group, meta in groups:
            meta["ctirf_processing"]["scheduler"] = where
            _set_attribute(group, meta)
        if output.exists():
            shutil.rmtree(output)
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output, warnings


def _prepare(
    jobs: Sequence[Any],
    root: Path,
    spec: ModelSpec,
    local: Restorer,
    block: int,
    runner: _Runner,
    warnings: list[str],
    source: Path,
) -> tuple[list[tuple[Path, dict]], list[tuple[Path, list]]]:
    """Create the store and the write tasks: ([(group, metadata)], [(group, tasks)])."""
    from yaozarrs.write.v05 import Bf2RawBuilder, prepare_image

    prepared = []
    for job in jobs:
        data, axes = _ome_order(job.data, job.axes)
        if local.dims == 3:
            result = restore_3d(data, axes, spec)
        else:
            result = restore_2d(data, spec, local.percentile, block, runner.value)
        ny, nx = data.shape[-2:]
        zchunks = (*(1 for _ in data.shape[:-2]), min(block, ny), min(block, nx))
        prepared.append((job, axes, result.rechunk(zchunks), zchunks))
    common = dict(writer="zarr", overwrite=True, compression="none")
    groups, tasks = [], []
    taken: set[str] = set()
    describe = {**local.describe(), "device": spec.device}
    if len(prepared) == 1:
        job, axes, result, zchunks = prepared[0]
        image = _image_model(job, axes, result.shape, f"cTIRF of {source.name}")
        _, arrays = prepare_image(root, image, (result.shape, "float32"), chunks=zchunks, **common)
        targets = [(root, arrays["0"])]
    else:
        if len({z for *_, z in prepared}) > 1:
            raise ValueError(f"the series of {source} differ in shape; process them one by one")
        builder = Bf2RawBuilder(root, chunks=prepared[0][3], **common)
        names = []
        for i, (job, axes, result, _) in enumerate(prepared):
            name = _series_name(job.series.info.name, i, taken)
            names.append(name)
            image = _image_model(job, axes, result.shape, job.series.info.name or name)
            builder.add_series(name, image, [(result.shape, "float32")])
        _, arrays = builder.prepare()
        targets = [(root / n, arrays[f"{n}/0"]) for n in names]
    for (job, axes, result, _), (group, target) in zip(prepared, targets, strict=True):
        info = job.series.info
        meta = {
            **info.metadata,
            "ctirf_processing": {
                **describe,
                "source": str(job.series.file.resolve()),
                "series": info.name,
                "channels": job.channels,
                "processed": datetime.now(timezone.utc).isoformat(),
                "warnings": warnings,
                "chunked": {"block": block, "depth": max(spec.overlap, EDGE_PAD)},
            },
        }
        groups.append((group, meta))
        tasks.append((group, _write_tasks(result, target, axes)))
    return groups, tasks
