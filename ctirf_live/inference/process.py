"""Offline processing of image files: OME-TIFF in, cTIRF OME-TIFF out, metadata kept."""

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


def _planes_2d(data: np.ndarray) -> np.ndarray:
    return data.reshape((-1, *data.shape[-2:]))


def process_array(
    data: np.ndarray,
    axes: str,
    restorer: Restorer,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Restore every YX plane (ET2dNet) or every Z stack (ET3dNet) of an array with `axes`."""
    if not axes.endswith("YX"):
        raise ValueError(f"images must end in Y, X axes; this file has axes {axes!r}")
    if restorer.dims == 2:
        planes = _planes_2d(data)
        out = np.empty(planes.shape, np.float32)
        for i, plane in enumerate(planes):
            out[i] = restorer.restore(plane)
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
        out[i] = restorer.restore(stack)
        if progress:
            progress(i + 1, len(stacks))
    return np.moveaxis(out.reshape(moved.shape), -3, z)


def process_file(
    source: str | Path,
    output: str | Path,
    restorer: Restorer,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, list[str]]:
    """Process one TIFF; returns (output path, warnings). Input metadata is carried over."""
    data, info = read_ome_tiff(source)
    warnings: list[str] = []
    if msg := pixel_size_warning(restorer.optics, info.pixel_size_um):
        warnings.append(msg)
        log.warning(msg)
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
