"""OME-TIFF reading and writing with ctirf-live metadata.

Files open in Fiji, napari and tifffile: physical pixel sizes and channel names are
OME fields; everything else ctirf-live records (acquisition state, registration,
model provenance) is one JSON document in an OME MapAnnotation (namespace
`ctirf-live`, key `ctirf`). Writes are atomic: a temporary file in the same folder is
fsynced and renamed, so an interrupted write never leaves a truncated image behind.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ctirf_live.atomic import atomic_write, atomic_write_json

__all__ = ["TiffInfo", "atomic_write_json", "read_ome_tiff", "write_ome_tiff"]

NAMESPACE = "ctirf-live"
KEY = "ctirf"


@dataclass
class TiffInfo:
    """What `read_ome_tiff` recovers besides the pixels."""

    axes: str
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    channel_names: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def write_ome_tiff(
    path: str | Path,
    data: np.ndarray,
    axes: str,
    *,
    pixel_size_um: float | None = None,
    z_step_um: float | None = None,
    channel_names: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write `data` (axes such as 'YX', 'CYX', 'ZYX', 'TZCYX') as an OME-TIFF, atomically."""
    path = Path(path)
    data = np.asarray(data)
    if data.ndim != len(axes):
        raise ValueError(f"data has {data.ndim} dimensions but axes {axes!r} has {len(axes)}")
    ome: dict[str, Any] = {"axes": axes}
    if name:
        ome["Name"] = name
    if pixel_size_um:
        ome.update(
            PhysicalSizeX=float(pixel_size_um),
            PhysicalSizeXUnit="µm",
            PhysicalSizeY=float(pixel_size_um),
            PhysicalSizeYUnit="µm",
        )
    if z_step_um and "Z" in axes:
        ome.update(PhysicalSizeZ=float(z_step_um), PhysicalSizeZUnit="µm")
    if channel_names:
        ome["Channel"] = {"Name": list(channel_names)}
    if metadata:
        ome["MapAnnotation"] = {
            "Namespace": NAMESPACE,
            "Value": {KEY: json.dumps(metadata, default=str)},
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path,
        lambda tmp: tifffile.imwrite(tmp, data, ome=True, metadata=ome, photometric="minisblack"),
    )
    return path


def read_ome_tiff(path: str | Path) -> tuple[np.ndarray, TiffInfo]:
    """Read a (OME-)TIFF: pixels plus axes, pixel size, z step, channels and ctirf metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes
            xml = tif.ome_metadata
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable TIFF ({exc}); is the file complete?") from None
    info = TiffInfo(axes=axes)
    if xml:
        _parse_ome(xml, info)
    return data, info


def _parse_ome(xml: str, info: TiffInfo) -> None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    prefix = "ome:" if ns else ""
    pixels = root.find(f".//{prefix}Pixels", ns)
    if pixels is not None:
        if "PhysicalSizeX" in pixels.attrib:
            info.pixel_size_um = float(pixels.attrib["PhysicalSizeX"])
        if "PhysicalSizeZ" in pixels.attrib:
            info.z_step_um = float(pixels.attrib["PhysicalSizeZ"])
        info.channel_names = [
            ch.attrib.get("Name", "") for ch in pixels.findall(f"{prefix}Channel", ns)
        ]
    for ann in root.findall(f".//{prefix}MapAnnotation", ns):
        if ann.attrib.get("Namespace") != NAMESPACE:
            continue
        for m in ann.findall(f".//{prefix}M", ns):
            if m.attrib.get("K") == KEY and m.text:
                try:
                    info.metadata = json.loads(m.text)
                except json.JSONDecodeError:
                    info.metadata = {}
