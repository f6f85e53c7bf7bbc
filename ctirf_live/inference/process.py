"""Offline processing of image files: OME-TIFF in, cTIRF OME-TIFF out, metadata kept.

Every OME series (image) of the input is restored: pymmcore-plus writes one per stage
position, as a folder `raw/` of `raw_p000.ome.tiff`, ... whose files each name all of
them, so the folder or any one of its files gives every position. Only the channels
asked for are restored (default EPI, matched by name, any case; `all` restores every
channel); the others are left out of the output, as in `acquire`'s cTIRF store, and
stay in the input. Output channels are named `cTIRF <channel>` as `acquire` names them.
One series gives one file at the output path; several give the raw store's layout: a
folder named after the output's stem with `<stem>_p000.ome.tiff`, ...

Checked before any work: the output never replaces the input, an existing output needs
`overwrite`, the axes are ones OME knows and the channels asked for exist. Checked after
every plane: the model's output is finite (a broken checkpoint gives NaN), so no NaN
file is ever written. The cTIRF is stored as float32, or as uint16 with a recorded scale
(`encoding`: the input's bit depth sets it, a float input's peak), pixels clipped to the
range counted in the file's metadata and the warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.data.tiff import TiffSeries, read_ome_series, write_ome_tiff
from ctirf_live.inference.consistency import ConsistencyLog, ConsistencyMonitor, sidecar_path
from ctirf_live.inference.encoding import Encoding, check_tiff_dtype, make_encoding
from ctirf_live.inference.naming import ctirf_channel_name, position_files
from ctirf_live.inference.restorer import Restorer, pixel_size_warning

log = logging.getLogger(__name__)


KNOWN_AXES = set("TCZYX")


def _planes_2d(data: np.ndarray) -> np.ndarray:
    return data.reshape((-1, *data.shape[-2:]))


def check_finite(out: np.ndarray, where: str) -> np.ndarray:
    """`out` unchanged, or a one-line error naming `where` the model gave NaN/inf."""
    if not np.isfinite(out).all():
        raise ValueError(
            f"the model returned NaN or infinite values ({where}); the checkpoint may be "
            "broken: choose another --model; nothing was written"
        )
    return out


def check_axes(axes: str) -> None:
    """Raise ValueError unless `axes` are OME axes (T, C, Z, Y, X) ending in Y, X."""
    unknown = sorted(set(axes) - KNOWN_AXES)
    if unknown or not axes.endswith("YX"):
        raise ValueError(
            f"cannot tell what the axes {axes!r} of this file are (expected T, C, Z ending "
            "in Y, X); save it as OME-TIFF from Fiji or napari with named axes"
        )


def process_array(
    data: np.ndarray,
    axes: str,
    restorer: Restorer,
    progress: Callable[[int, int], None] | None = None,
    consistency: ConsistencyLog | None = None,
    series: int = 0,
) -> np.ndarray:
    """Restore every YX plane (ET2dNet) or every Z stack (ET3dNet) of an array with `axes`;
    with a `consistency` log, each plane is also scored (same forward pass) into it."""
    check_axes(axes)
    restore = restorer.restore if consistency is None else _scoring(consistency, series)
    if restorer.dims == 2:
        planes = _planes_2d(data)
        out = np.empty(planes.shape, np.float32)
        for i, plane in enumerate(planes):
            out[i] = check_finite(restore(plane), f"plane {i}")
            if progress:
                progress(i + 1, len(planes))
        return out.reshape(data.shape)
    if "Z" not in axes:
        raise ValueError("ET3dNet needs z-stacks; this file has no Z axis (use an ET2dNet model)")
    z = axes.index("Z")
    moved = np.moveaxis(data, z, -3)
    stacks = moved.reshape((-1, *moved.shape[-3:]))
    out = np.empty(stacks.shape, np.float32)
    for i, stack in enumerate(stacks):
        out[i] = check_finite(restore(stack), f"plane {i}")
        if progress:
            progress(i + 1, len(stacks))
    return np.moveaxis(out.reshape(moved.shape), -3, z)


def _scoring(log_: ConsistencyLog, series: int) -> Callable[[np.ndarray], np.ndarray]:
    """`Restorer.restore` that also logs each YX plane's consistency as (series, plane):
    planes numbered in the order they are restored (ET3dNet: stack after stack)."""
    done = [0]

    def restore(item: np.ndarray) -> np.ndarray:
        scored = log_.monitor.restore(item)
        for plane in scored.planes:
            log_.add({"series": series, "plane": done[0]}, [plane])
            done[0] += 1
        return scored.ctirf

    return restore


ALL_CHANNELS = "all"
TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class _Job:
    """One series to restore: its pixels (channels kept), axes and output channel names."""

    series: TiffSeries
    data: np.ndarray
    axes: str
    channels: list[str]
    source_channels: list[int] | None = None  # indices kept (None: every one)


def read_sources(source: str | Path) -> list[TiffSeries]:
    """Every series of a TIFF, or of the TIFFs in a folder (each file's own series)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no TIFF files in {source}; pass an OME-TIFF or a folder")
        return [s for f in files for s in read_ome_series(f) if s.file.resolve() == f.resolve()]
    return read_ome_series(source)


def select_channels(series: TiffSeries, wanted: Sequence[str]) -> _Job:
    """Keep the channels of `series` named in `wanted` (any case; empty or 'all': every one).

    A file without channel names is restored whole (a plain EPI frame, series or stack).
    """
    info, data, axes = series.info, series.data, series.info.axes.upper()
    check_axes(axes)
    names = list(info.channel_names)
    size_c = data.shape[axes.index("C")] if "C" in axes else 1
    if len(names) != size_c or not any(names):
        return _Job(series, data, axes, [ctirf_channel_name(n) for n in names if n])
    want = {w.casefold() for w in wanted}
    if not want or ALL_CHANNELS in want:
        keep = list(range(size_c))
    else:
        keep = [i for i, n in enumerate(names) if n.casefold() in want]
    if not keep:
        label = info.name or series.file.name
        raise ValueError(
            f"{label} has channels {', '.join(names)}, none of them {', '.join(wanted)}; "
            f"pass --channels {names[0]} (or all)"
        )
    if "C" in axes:
        data = np.take(data, keep, axis=axes.index("C"))
    return _Job(series, data, axes, [ctirf_channel_name(names[i]) for i in keep], keep)


def _planes(job: _Job, dims: int) -> int:
    shape = job.data.shape
    if dims == 2 or "Z" not in job.axes:
        return int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return int(np.prod(shape[:-2])) // shape[job.axes.index("Z")]


def process_file(
    source: str | Path,
    output: str | Path,
    restorer: Restorer,
    progress: Callable[[int, int], None] | None = None,
    *,
    channels: Sequence[str] = ("EPI",),
    overwrite: bool = False,
    consistency: ConsistencyMonitor | bool | None = None,
    ctirf_dtype: str = "float32",
    ctirf_scale: float | None = None,
) -> tuple[Path, list[str]]:
    """Restore every series of a TIFF (or a folder of them); returns (output, warnings).

    The output is the file, or for several series the folder of per-position files.
    Input metadata is carried over per series. Each plane's consistency scores (a
    monitor, False for none, default the model's own calibration) go to
    `<output>.consistency.csv` beside the output, their summary into its metadata, and
    the advice line, when many planes are flagged, to the warnings. `ctirf_dtype` float32
    or uint16 (`ctirf_scale` counts a step; default from the input, see `encoding`).
    """
    check_tiff_dtype(ctirf_dtype)
    make_encoding(ctirf_dtype, ctirf_scale)  # bad values fail before any work
    source, output = Path(source), Path(output)
    sources = read_sources(source)
    store, files = position_files(output, len(sources))
    inputs = {source.resolve(), *(s.file.resolve() for s in sources)}
    if store.resolve() in inputs or any(f.resolve() in inputs for f in files):
        raise ValueError(f"the output would replace the input {source}; choose another --out")
    for target in {store, *files}:
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    jobs = [select_channels(s, channels) for s in sources]
    warnings: list[str] = []
    for job in jobs:
        info = job.series.info
        msg = pixel_size_warning(restorer.optics, info.pixel_size_um)
        if msg and msg not in warnings:
            warnings.append(msg)
            log.warning(msg)
        if restorer.dims == 3 and "Z" in job.axes:
            restorer.check_stack(job.data.shape[job.axes.index("Z")], info.z_step_um)
    total = sum(_planes(job, restorer.dims) for job in jobs)
    done = 0

    def step(i: int, n: int) -> None:
        if progress:
            progress(done + i, total)

    if consistency is None:
        consistency = isinstance(restorer, Restorer)
    if consistency is True:
        consistency = ConsistencyMonitor(restorer)
    log_ = ConsistencyLog(consistency) if consistency else None
    results = []
    for i, job in enumerate(jobs):
        if log_ is not None:  # the file's pixel size, checked against the model's
            log_.monitor.pixel_size_um = job.series.info.pixel_size_um or None
        results.append(process_array(job.data, job.axes, restorer, step, log_, i))
        done += _planes(job, restorer.dims)
    summary = None
    if log_ is not None:
        log_.write_csv(sidecar_path(store))
        summary = {**log_.summary(), "sidecar": sidecar_path(store).name}
        if summary["advice"]:
            warnings.append(summary["advice"])
    peak = max((float(r.max()) for r in results if r.size), default=None)
    encoding = make_encoding(ctirf_dtype, ctirf_scale, input_dtype=jobs[0].data.dtype, peak=peak)
    encoded = [_encode(result, replace(encoding)) for result in results]
    for enc in (e for _, e in encoded):
        if clip := enc.clip_warning():
            warnings.append(clip)
            log.warning(clip)
    for i, (job, (result, enc), file) in enumerate(zip(jobs, encoded, files, strict=True)):
        _write(job, result, file, source, restorer, warnings, i if len(files) > 1 else None,
               summary, enc)
    return store, warnings


def _encode(result: np.ndarray, encoding: Encoding) -> tuple[np.ndarray, Encoding]:
    """The stored form of one series' result, plane by plane (clipping counted per plane)."""
    planes = _planes_2d(result)
    out = np.empty(planes.shape, encoding.numpy_dtype)
    for i, plane in enumerate(planes):
        out[i] = encoding.encode(plane)
    return out.reshape(result.shape), encoding


def _write(
    job: _Job,
    result: np.ndarray,
    file: Path,
    source: Path,
    restorer: Restorer,
    warnings: list[str],
    position: int | None,
    consistency: dict[str, Any] | None = None,
    encoding: Encoding | None = None,
) -> Path:
    info = job.series.info
    metadata: dict[str, Any] = {
        **info.metadata,
        "encoding": (encoding or Encoding()).describe(),  # never the input's own
        "ctirf_processing": {
            **restorer.describe(),
            "source": str(job.series.file.resolve()),
            "series": info.name,
            "channels": job.channels,
            "processed": datetime.now(timezone.utc).isoformat(),
            "warnings": warnings,
            **({"consistency": consistency} if consistency else {}),
        },
    }
    name = info.name if position is not None and info.name else f"cTIRF of {source.name}"
    acquisition = info.acquisition
    return write_ome_tiff(
        file,
        result,
        job.axes,
        pixel_size_um=info.pixel_size_um,
        z_step_um=info.z_step_um,
        channel_names=job.channels or None,
        metadata=metadata,
        name=name,
        optics=acquisition.optics,
        acquired=acquisition.acquired,
        planes=_kept_planes(acquisition.planes, job.source_channels),
    )


def _kept_planes(
    planes: list[dict[str, str]], keep: list[int] | None
) -> list[dict[str, str]] | None:
    """The source's Plane elements (time, exposure, stage position) of the channels
    restored, renumbered as the output's channels; None when it had none."""
    if not planes:
        return None
    if keep is None:
        return planes
    out = []
    for plane in planes:
        c = int(plane.get("TheC", 0))
        if c in keep:
            out.append({**plane, "TheC": str(keep.index(c))})
    return out or None
