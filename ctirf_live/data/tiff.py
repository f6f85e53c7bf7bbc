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
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ctirf_live.atomic import atomic_write, atomic_write_json
from ctirf_live.config import Optics

__all__ = [
    "SeriesLayout",
    "TiffInfo",
    "TiffSeries",
    "atomic_write_json",
    "read_ome_layout",
    "read_ome_series",
    "read_ome_tiff",
    "write_ome_tiff",
]

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
    name: str = ""


@dataclass
class TiffSeries:
    """One OME image (series) of a file: its pixels, where they are stored, and its info."""

    data: np.ndarray
    info: TiffInfo
    file: Path


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
    optics: Optics | None = None,
    modes: Sequence[str] | None = None,
    exposure_ms: float | None = None,
    acquired: datetime | None = None,
) -> Path:
    """Write `data` (axes such as 'YX', 'CYX', 'ZYX', 'TZCYX') as an OME-TIFF, atomically.

    With `optics`, the OME metadata a microscopist expects: the objective (NA,
    immersion, magnification) as an Instrument, each channel's emission/excitation
    wavelength, and per channel in `modes` (EPI, TIRF) its AcquisitionMode; `exposure_ms`
    goes to every Plane, `acquired` to AcquisitionDate. The TIFF resolution tags carry
    the pixel size in micrometres, so plain ImageJ and tifffile readers show the scale.
    """
    path = Path(path)
    data = np.asarray(data)
    if data.ndim != len(axes):
        raise ValueError(f"data has {data.ndim} dimensions but axes {axes!r} has {len(axes)}")
    ome: dict[str, Any] = {"axes": axes}
    if name:
        ome["Name"] = name
    if pixel_size_um:
        # micrometres are OME's default unit: no unit attribute keeps the XML 7-bit ASCII,
        # which the TIFF description (edited in place for the instrument) must be
        ome.update(PhysicalSizeX=float(pixel_size_um), PhysicalSizeY=float(pixel_size_um))
    if z_step_um and "Z" in axes:
        ome.update(PhysicalSizeZ=float(z_step_um))
    n_channels = data.shape[axes.index("C")] if "C" in axes else 1
    channel = _channel_fields(channel_names, modes, optics, n_channels)
    if channel:
        ome["Channel"] = channel
    if exposure_ms is not None:
        planes = int(np.prod([n for a, n in zip(axes, data.shape, strict=True) if a in "TZC"]))
        ome["Plane"] = {
            "ExposureTime": [float(exposure_ms)] * planes,
            "ExposureTimeUnit": ["ms"] * planes,
        }
    if acquired is not None:
        ome["AcquisitionDate"] = acquired.replace(tzinfo=None).isoformat(timespec="seconds")
    if metadata:
        ome["MapAnnotation"] = {
            "Namespace": NAMESPACE,
            "Value": {KEY: json.dumps(metadata, default=str)},
        }
    extra: dict[str, Any] = {}
    if pixel_size_um:
        extra = {
            "resolution": (1.0 / pixel_size_um, 1.0 / pixel_size_um),
            "resolutionunit": "MICROMETER",
        }

    def write(tmp: Path) -> None:
        tifffile.imwrite(tmp, data, ome=True, metadata=ome, photometric="minisblack", **extra)
        if optics is not None:
            tifffile.tiffcomment(tmp, _with_instrument(tifffile.tiffcomment(tmp), optics))

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


ACQUISITION_MODES = {"EPI": "WideField", "TIRF": "TotalInternalReflection"}
_IMMERSION = {1.0: "Air", 1.33: "Water", 1.47: "Glycerol", 1.518: "Oil"}


def _channel_fields(
    names: Sequence[str] | None,
    modes: Sequence[str] | None,
    optics: Optics | None,
    n_channels: int,
) -> dict[str, list]:
    """OME Channel attributes, one list entry per channel."""
    out: dict[str, list] = {}
    if names:
        out["Name"] = list(names)
    if modes:
        if len(modes) != n_channels:
            raise ValueError(f"{len(modes)} acquisition modes for {n_channels} channels")
        out["AcquisitionMode"] = [ACQUISITION_MODES.get(m.upper(), "Other") for m in modes]
    if optics is not None:
        out["EmissionWavelength"] = [float(optics.emission_wavelength_nm)] * n_channels
        out["EmissionWavelengthUnit"] = ["nm"] * n_channels
        out["ExcitationWavelength"] = [float(optics.excitation_wavelength_nm)] * n_channels
        out["ExcitationWavelengthUnit"] = ["nm"] * n_channels
    return out


def _with_instrument(xml: str, optics: Optics) -> str:
    """The OME-XML with an Instrument holding the objective, referenced by every Image."""
    digits = "".join(c for c in optics.objective if c.isdigit())
    immersion = min(_IMMERSION, key=lambda n: abs(n - optics.immersion_index))
    magnification = f' NominalMagnification="{float(digits)}"' if digits else ""
    instrument = (
        '<Instrument ID="Instrument:0"><Objective ID="Objective:0:0" '
        f'LensNA="{optics.na}" Immersion="{_IMMERSION[immersion]}"{magnification} '
        f'Model="{optics.objective}"/></Instrument>'
    )
    refs = (
        '<InstrumentRef ID="Instrument:0"/><ObjectiveSettings ID="Objective:0:0" '
        f'RefractiveIndex="{optics.sample_index}"/><Pixels '
    )
    head, sep, rest = xml.partition("<Image ")
    if not sep:
        return xml
    return head + instrument + sep + rest.replace("<Pixels ", refs)


def read_ome_tiff(path: str | Path) -> tuple[np.ndarray, TiffInfo]:
    """Read a (OME-)TIFF: pixels plus axes, pixel size, z step, channels and ctirf metadata.

    Only the first series; `read_ome_series` reads them all (one per stage position).
    """
    first = read_ome_series(path, first_only=True)[0]
    return first.data, first.info


def read_ome_series(path: str | Path, *, first_only: bool = False) -> list[TiffSeries]:
    """Every series of a TIFF, each with its own OME Image's sizes, channels and name.

    A multi-file OME dataset (pymmcore-plus writes one file per position, each file's
    OME-XML naming all of them) gives the series of every file it names that exists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    out: list[TiffSeries] = []
    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
            images = _ome_images(xml) if xml else []
            for i, series in enumerate(tif.series[:1] if first_only else tif.series):
                info = TiffInfo(axes=series.axes, name=series.name or "")
                if i < len(images):
                    _fill_info(images[i], info)
                if xml:
                    info.metadata = _ctirf_json(xml)
                file = Path(series.keyframe.parent.filehandle.path)
                out.append(TiffSeries(_series_pixels(tif, series, i, file), info, file))
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable TIFF ({exc}); is the file complete?") from None
    return out


@dataclass
class SeriesLayout:
    """One OME series without its pixels: info, shape, dtype, and where to read it
    (`tifffile.imread(file, series=index)`, or `aszarr=True` for parts of it)."""

    info: TiffInfo
    file: Path
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype


def read_ome_layout(path: str | Path) -> list[SeriesLayout]:
    """What `read_ome_series` finds, without reading pixels (for chunk-wise processing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    out: list[SeriesLayout] = []
    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
            images = _ome_images(xml) if xml else []
            for i, series in enumerate(tif.series):
                info = TiffInfo(axes=series.axes, name=series.name or "")
                if i < len(images):
                    _fill_info(images[i], info)
                if xml:
                    info.metadata = _ctirf_json(xml)
                file = Path(series.keyframe.parent.filehandle.path)
                out.append(SeriesLayout(info, file, i, tuple(series.shape), series.dtype))
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable TIFF ({exc}); is the file complete?") from None
    return out


def _series_pixels(
    tif: tifffile.TiffFile, series: tifffile.TiffPageSeries, index: int, file: Path
) -> np.ndarray:
    """A series' pixels, read from the file that holds them.

    tifffile reads a companion file's series (a multi-file OME dataset) from the pages
    of the file it opened, i.e. the wrong pixels: open the companion and read it there.
    """
    if file.resolve() == Path(tif.filehandle.path).resolve():
        return series.asarray()
    with tifffile.TiffFile(file) as other:
        own = other.series[index] if index < len(other.series) else None
        if own is None or Path(own.keyframe.parent.filehandle.path).resolve() != file.resolve():
            raise ValueError(f"{file} does not hold the series {index} its dataset names")
        return own.asarray()


def _ome_root(xml: str) -> tuple[ET.Element | None, dict[str, str], str]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, {}, ""
    ns = {"ome": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    return root, ns, "ome:" if ns else ""


def _ome_images(xml: str) -> list[ET.Element]:
    root, ns, prefix = _ome_root(xml)
    return [] if root is None else root.findall(f"{prefix}Image", ns)


def _fill_info(image: ET.Element, info: TiffInfo) -> None:
    info.name = image.attrib.get("Name", info.name)
    pixels = next((e for e in image if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return
    if "PhysicalSizeX" in pixels.attrib:
        info.pixel_size_um = float(pixels.attrib["PhysicalSizeX"])
    if "PhysicalSizeZ" in pixels.attrib:
        info.z_step_um = float(pixels.attrib["PhysicalSizeZ"])
    info.channel_names = [ch.attrib.get("Name", "") for ch in pixels if ch.tag.endswith("Channel")]


def _ctirf_json(xml: str) -> dict[str, Any]:
    root, ns, prefix = _ome_root(xml)
    if root is None:
        return {}
    for ann in root.findall(f".//{prefix}MapAnnotation", ns):
        if ann.attrib.get("Namespace") != NAMESPACE:
            continue
        for m in ann.findall(f".//{prefix}M", ns):
            if m.attrib.get("K") == KEY and m.text:
                try:
                    return json.loads(m.text)
                except json.JSONDecodeError:
                    return {}
    return {}
