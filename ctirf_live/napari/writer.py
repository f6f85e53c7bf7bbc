"""napari writer: an image layer as an OME-TIFF with its scale and name (atomic write)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.data.tiff import write_ome_tiff
from ctirf_live.inference.naming import TIFF_SUFFIXES

DEFAULT_AXES = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}


def layer_axes(ndim: int, meta: dict[str, Any]) -> str:
    """OME axes of a layer: those our reader recorded, else YX / ZYX / TZYX / TCZYX."""
    axes = str((meta.get("metadata") or {}).get("axes") or "")
    if len(axes) == ndim and set(axes) <= set("TCZYX") and axes.endswith("YX"):
        return axes
    if ndim not in DEFAULT_AXES:
        raise ValueError(f"cannot save a {ndim}D layer as OME-TIFF; use 2 to 5 dimensions")
    return DEFAULT_AXES[ndim]


def write_ome_tiff_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: `data` with the layer's scale (um) as pixel size and z step,
    its name as channel name and image name, its ctirf metadata kept. Returns [path]."""
    out = Path(path)
    if not out.name.lower().endswith(TIFF_SUFFIXES):
        out = out.with_name(out.name + ".ome.tiff")
    arr = np.asarray(data)
    if arr.dtype.kind not in "uif":
        raise ValueError(f"cannot save a layer of dtype {arr.dtype} as OME-TIFF")
    axes = layer_axes(arr.ndim, meta)
    scale = list(meta.get("scale") or [1.0] * arr.ndim)
    name = str(meta.get("name") or out.name)
    px = float(scale[-1])
    z_step = float(scale[axes.index("Z")]) if "Z" in axes else None
    ctirf = (meta.get("metadata") or {}).get("ctirf")
    write_ome_tiff(
        out,
        arr,
        axes,
        pixel_size_um=px,
        z_step_um=z_step,
        channel_names=None if "C" in axes else [name],
        metadata={"napari_layer": name, "ctirf": ctirf} if ctirf else {"napari_layer": name},
        name=name,
    )
    return [str(out)]
