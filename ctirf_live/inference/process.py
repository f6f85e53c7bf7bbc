"""Offline processing of image files: OME-TIFF in, cTIRF OME-TIFF out, metadata kept.

Checked before any work: the output never replaces the input, an existing output needs
`overwrite`, and the axes are ones OME knows. Checked after every plane: the model's
output is finite (a broken checkpoint gives NaN), so no NaN file is ever written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff
from ctirf_live.inference.restorer import Restorer, pixel_size_warning

log = logging.getLogger(__name__)


KNOWN_AXES = set("TCZYX")


def _planes_2d(data: np.ndarray) -> np.ndarray:
    return data.reshape((-1, *data.shape[-2:]))


def _finite(out: np.ndarray, i: int) -> np.ndarray:
    if not np.isfinite(out).all():
        raise ValueError(
            f"the model returned NaN or infinite values (plane {i}); the checkpoint may be "
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
) -> np.ndarray:
    """Restore every YX plane (ET2dNet) or every Z stack (ET3dNet) of an array with `axes`."""
    check_axes(axes)
    if restorer.dims == 2:
        planes = _planes_2d(data)
        out = np.empty(planes.shape, np.float32)
        for i, plane in enumerate(planes):
            out[i] = _finite(restorer.restore(plane), i)
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
        out[i] = _finite(restorer.restore(stack), i)
        if progress:
            progress(i + 1, len(stacks))
    return np.moveaxis(out.reshape(moved.shape), -3, z)


def process_file(
    source: str | Path,
    output: str | Path,
    restorer: Restorer,
    progress: Callable[[int, int], None] | None = None,
    *,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Process one TIFF; returns (output path, warnings). Input metadata is carried over."""
    source, output = Path(source), Path(output)
    if output.resolve() == source.resolve():
        raise ValueError(f"the output would replace the input {source}; choose another --out")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    data, info = read_ome_tiff(source)
    check_axes(info.axes)
    warnings: list[str] = []
    if msg := pixel_size_warning(restorer.optics, info.pixel_size_um):
        warnings.append(msg)
        log.warning(msg)
    if restorer.dims == 3 and "Z" in info.axes.upper():
        restorer.check_stack(data.shape[info.axes.upper().index("Z")], info.z_step_um)
    result = process_array(data, info.axes, restorer, progress)
    metadata: dict[str, Any] = {
        **info.metadata,
        "ctirf_processing": {
            **restorer.describe(),
            "source": str(Path(source).resolve()),
            "processed": datetime.now(timezone.utc).isoformat(),
            "warnings": warnings,
        },
    }
    path = write_ome_tiff(
        output,
        result,
        info.axes,
        pixel_size_um=info.pixel_size_um,
        z_step_um=info.z_step_um,
        channel_names=[f"cTIRF({c})" for c in info.channel_names] or None,
        metadata=metadata,
        name=f"cTIRF of {Path(source).name}",
    )
    return path, warnings
