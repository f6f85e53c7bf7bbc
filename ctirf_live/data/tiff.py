"""OME-TIFF reading and writing with ctirf-live metadata.

Files open in Fiji, napari and tifffile: physical pixel sizes and channel names are
OME fields; everything else ctirf-live records (acquisition state, registration,
model provenance) is one JSON document in an OME MapAnnotation (namespace
`ctirf-live`, key `ctirf`). Writes are atomic: a temporary file in the same folder is
fsynced and renamed, so an interrupted write never leaves a truncated image behind.
"""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from ctirf_live.atomic import atomic_write, atomic_write_json
from ctirf_live.config import Optics

__all__ = [
    "OmeAcquisition",
    "SeriesLayout",
    "TiffInfo",
    "TiffSeries",
    "acquisition_facts",
    "acquisition_mode",
    "atomic_write_json",
    "enrich_ome_xml",
    "read_acquisition",
    "read_ome_layout",
    "read_ome_series",
    "read_ome_tiff",
    "write_ome_tiff",
    "write_tiff_description",
]

NAMESPACE = "ctirf-live"
KEY = "ctirf"


@dataclass
class OmeAcquisition:
    """How an OME image was acquired, as its OME-XML says; carried over to what is made
    from it (`ctirf process` outputs)."""

    optics: Optics | None = None  # from its Objective and first channel's wavelengths
    acquired: datetime | None = None
    planes: list[dict[str, str]] = field(default_factory=list)  # Plane attributes


@dataclass
class TiffInfo:
    """What `read_ome_tiff` recovers besides the pixels."""

    axes: str
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    channel_names: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    acquisition: OmeAcquisition = field(default_factory=OmeAcquisition)


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
    planes: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `data` (axes such as 'YX', 'CYX', 'ZYX', 'TZCYX') as an OME-TIFF, atomically.

    With `optics`, the OME metadata a microscopist expects: the objective (NA,
    immersion, magnification) as an Instrument, each channel's emission/excitation
    wavelength, and per channel in `modes` (EPI, TIRF) its AcquisitionMode; `exposure_ms`
    goes to every Plane, `acquired` to AcquisitionDate; `planes` (OME Plane attributes)
    replace the Plane elements. The TIFF resolution tags carry
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
        n_planes = int(np.prod([n for a, n in zip(axes, data.shape, strict=True) if a in "TZC"]))
        ome["Plane"] = {
            "ExposureTime": [float(exposure_ms)] * n_planes,
            "ExposureTimeUnit": ["ms"] * n_planes,
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
        if optics is not None or planes:
            xml = enrich_ome_xml(
                tifffile.tiffcomment(tmp), optics, planes={0: planes} if planes else None
            )
            tifffile.tiffcomment(tmp, xml.encode())

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


def acquisition_mode(channel: str) -> str | None:
    """The OME AcquisitionMode of a channel named after its preset: EPI -> WideField,
    TIRF -> TotalInternalReflection, a computed cTIRF channel -> Other (OME has no
    computational mode; the `ctirf` annotation says what it is); None when unknown."""
    name = channel.strip().upper()
    if name.startswith("CTIRF"):
        return CTIRF_MODE
    return ACQUISITION_MODES.get(name)


CTIRF_MODE = "Other"
CTIRF_MODE_NOTE = (
    "computational TIRF: a network's optical sectioning of the WideField frames of the "
    "channel named after 'cTIRF' (e.g. EPI); OME has no computational AcquisitionMode"
)
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
_XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
INSTRUMENT_ID, OBJECTIVE_ID = "Instrument:ctirf", "Objective:ctirf:0"
# Image children that come before InstrumentRef in the OME schema
_BEFORE_INSTRUMENT = {"AcquisitionDate", "ExperimenterRef", "Description", "ExperimentRef",
                      "ExperimenterGroupRef", "DatasetRef"}


def acquisition_facts(optics: Optics | None, channels: Sequence[str]) -> dict[str, Any]:
    """What OME-XML says in its Instrument and Channels, as JSON for stores without OME-XML
    (OME-Zarr attributes): the objective and each channel's acquisition mode and
    wavelengths."""
    facts: dict[str, Any] = {}
    if optics is not None:
        immersion = min(_IMMERSION, key=lambda n: abs(n - optics.immersion_index))
        facts["objective"] = {
            "model": optics.objective,
            "lens_na": optics.na,
            "immersion": _IMMERSION[immersion],
            "immersion_index": optics.immersion_index,
            "sample_index": optics.sample_index,
        }
        facts["optics"] = optics.model_dump()
    facts["channels"] = [
        {
            "name": name,
            "acquisition_mode": acquisition_mode(name),
            **(
                {
                    "emission_wavelength_nm": optics.emission_wavelength_nm,
                    "excitation_wavelength_nm": optics.excitation_wavelength_nm,
                }
                if optics is not None
                else {}
            ),
            **({"mode_note": CTIRF_MODE_NOTE} if acquisition_mode(name) == CTIRF_MODE else {}),
        }
        for name in channels
    ]
    return facts


def enrich_ome_xml(
    xml: str,
    optics: Optics | None = None,
    *,
    acquired: datetime | None = None,
    planes: dict[int, list[dict[str, Any]]] | None = None,
) -> str:
    """The OME-XML with what a microscopist expects, keeping everything already there.

    With `optics`: an Instrument holding the objective (NA, immersion, magnification)
    referenced by every Image, and each channel's emission/excitation wavelength; every
    channel named after a preset (EPI, TIRF, cTIRF ...) gets its AcquisitionMode.
    `acquired` sets a missing AcquisitionDate; `planes` (image index -> Plane attributes,
    `TheT`/`TheC`/`TheZ` included) replaces those images' Plane elements.
    """
    ET.register_namespace("", OME_NS)
    ET.register_namespace("xsi", _XSI_NS)
    root = ET.fromstring(xml)
    ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else ""
    q = (lambda tag: f"{{{ns}}}{tag}") if ns else (lambda tag: tag)
    images = root.findall(q("Image"))
    if optics is not None and images:
        for old in [e for e in root.findall(q("Instrument")) if e.get("ID") == INSTRUMENT_ID]:
            root.remove(old)
        root.insert(list(root).index(images[0]), _instrument(optics, q))
    for i, image in enumerate(images):
        pixels = image.find(q("Pixels"))
        if pixels is None:
            continue
        if acquired is not None and image.find(q("AcquisitionDate")) is None:
            date = ET.Element(q("AcquisitionDate"))
            date.text = _ome_date(acquired)
            image.insert(0, date)
        if optics is not None:
            _refer_to_instrument(image, pixels, optics, q)
        for channel in pixels.findall(q("Channel")):
            mode = acquisition_mode(channel.get("Name", ""))
            if mode:
                channel.set("AcquisitionMode", mode)
            if optics is not None:
                channel.set("ExcitationWavelength", f"{float(optics.excitation_wavelength_nm):g}")
                channel.set("ExcitationWavelengthUnit", "nm")
                channel.set("EmissionWavelength", f"{float(optics.emission_wavelength_nm):g}")
                channel.set("EmissionWavelengthUnit", "nm")
        if planes and i in planes:
            for old in pixels.findall(q("Plane")):
                pixels.remove(old)
            for attrs in planes[i]:
                ET.SubElement(pixels, q("Plane"), {k: _xml_value(v) for k, v in attrs.items()})
    return ET.tostring(root, encoding="unicode")


def _ome_date(when: datetime) -> str:
    """xsd:dateTime in UTC (`...Z`) for an aware datetime, as given for a naive one."""
    if when.tzinfo is None:
        return when.isoformat(timespec="seconds")
    return when.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def read_acquisition(xml: str, image: int, pixel_size_um: float | None) -> OmeAcquisition:
    """The objective, wavelengths, AcquisitionDate and Plane elements of one OME image
    (nothing for what it does not say: no Objective or emission wavelength, no optics)."""
    root, ns, prefix = _ome_root(xml)
    images = [] if root is None else root.findall(f"{prefix}Image", ns)
    if root is None or image >= len(images):
        return OmeAcquisition()
    element = images[image]
    pixels = element.find(f"{prefix}Pixels", ns)
    out = OmeAcquisition()
    date = element.find(f"{prefix}AcquisitionDate", ns)
    if date is not None and date.text:
        try:
            out.acquired = datetime.fromisoformat(date.text.strip())
        except ValueError:
            pass
    if pixels is None:
        return out
    out.planes = [dict(p.attrib) for p in pixels.findall(f"{prefix}Plane", ns)]
    ref = element.find(f"{prefix}InstrumentRef", ns)
    settings = element.find(f"{prefix}ObjectiveSettings", ns)
    channel = pixels.find(f"{prefix}Channel", ns)
    objective = None
    for instrument in root.findall(f"{prefix}Instrument", ns):
        if ref is not None and instrument.get("ID") == ref.get("ID"):
            objective = instrument.find(f"{prefix}Objective", ns)
    if objective is None or channel is None or not channel.get("EmissionWavelength"):
        return out
    try:
        fields: dict[str, Any] = {
            "objective": objective.get("Model") or objective.get("ID", ""),
            "na": float(objective.get("LensNA", "")),
            "emission_wavelength_nm": float(channel.get("EmissionWavelength", "")),
        }
        if channel.get("ExcitationWavelength"):
            fields["excitation_wavelength_nm"] = float(channel.get("ExcitationWavelength", ""))
        immersion = {v: k for k, v in _IMMERSION.items()}.get(objective.get("Immersion", ""))
        if immersion:
            fields["immersion_index"] = immersion
        if settings is not None and settings.get("RefractiveIndex"):
            fields["sample_index"] = float(settings.get("RefractiveIndex", ""))
        if pixel_size_um:
            fields["pixel_size_um"] = pixel_size_um
        out.optics = Optics(**fields)
    except (ValueError, TypeError):  # a malformed or out-of-range value: no optics
        pass
    return out


def _xml_value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _instrument(optics: Optics, q: Any) -> ET.Element:
    digits = "".join(c for c in optics.objective if c.isdigit() or c == ".")
    immersion = min(_IMMERSION, key=lambda n: abs(n - optics.immersion_index))
    instrument = ET.Element(q("Instrument"), ID=INSTRUMENT_ID)
    objective = ET.SubElement(instrument, q("Objective"), ID=OBJECTIVE_ID,
                              Model=optics.objective)
    objective.set("Immersion", _IMMERSION[immersion])
    objective.set("LensNA", f"{float(optics.na):g}")
    if digits.strip("."):
        objective.set("NominalMagnification", f"{float(digits.strip('.')):g}")
    return instrument


def _refer_to_instrument(image: ET.Element, pixels: ET.Element, optics: Optics, q: Any) -> None:
    """InstrumentRef + ObjectiveSettings (with the sample's refractive index) in their
    schema place: after AcquisitionDate/Description, before Pixels."""
    for tag in ("InstrumentRef", "ObjectiveSettings"):
        for old in image.findall(q(tag)):
            image.remove(old)
    at = next(
        (k for k, e in enumerate(image) if e.tag.split("}")[-1] not in _BEFORE_INSTRUMENT),
        list(image).index(pixels),
    )
    settings = ET.Element(q("ObjectiveSettings"), ID=OBJECTIVE_ID,
                          RefractiveIndex=f"{float(optics.sample_index):g}")
    image.insert(at, settings)
    image.insert(at, ET.Element(q("InstrumentRef"), ID=INSTRUMENT_ID))


def write_tiff_description(path: str | Path, description: str) -> None:
    """Replace the first page's ImageDescription (the OME-XML) of a TIFF, crash-safe.

    The new text is appended at the end of the file and synced before the one IFD entry
    that points to it is rewritten, so at every moment the file holds either the old or
    the new description, and no pixel byte is ever written. (`tifffile.tiffcomment`
    moves the pointer before writing the text, and overwrites the text in place when it
    is the file's last item.) Raises ValueError/OSError when it cannot.
    """
    import os
    import struct

    data = description.encode("utf-8") + b"\x00"
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages.first.tags.get("ImageDescription")
        if tag is None:
            raise ValueError(f"{Path(path).name} has no ImageDescription to replace")
        tiff = tif.tiff
        entry = tag.offset + 4  # after the tag code and type
        if len(data) <= tiff.tagoffsetthreshold:
            raise ValueError("description too short to be OME-XML")
    fd = os.open(path, os.O_RDWR)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        start = end + (end % 2)  # values begin on a word boundary
        os.pwrite(fd, b"\x00" * (start - end) + data, end)
        os.fsync(fd)
        os.pwrite(
            fd,
            struct.pack(tiff.tagformat2, len(data), struct.pack(tiff.offsetformat, start)),
            entry,
        )
        os.fsync(fd)
    finally:
        os.close(fd)


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
            for i, series, info, file in _series_infos(tif, 1 if first_only else None):
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
            for i, series, info, file in _series_infos(tif):
                out.append(SeriesLayout(info, file, i, tuple(series.shape), series.dtype))
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable TIFF ({exc}); is the file complete?") from None
    return out


def _series_infos(
    tif: tifffile.TiffFile, limit: int | None = None
) -> Iterator[tuple[int, tifffile.TiffPageSeries, TiffInfo, Path]]:
    """(index, series, its info from the OME Image, the file holding its pixels) for the
    file's series (the first `limit` of them)."""
    xml = tif.ome_metadata
    images = _ome_images(xml) if xml else []
    metadata = _ctirf_json(xml) if xml else {}
    for i, series in enumerate(tif.series[:limit]):
        info = TiffInfo(axes=series.axes, name=series.name or "")
        if i < len(images):
            _fill_info(images[i], info)
            info.acquisition = read_acquisition(xml, i, info.pixel_size_um)
        if xml:
            info.metadata = copy.deepcopy(metadata)
        yield i, series, info, Path(series.keyframe.parent.filehandle.path)


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
