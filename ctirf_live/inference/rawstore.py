"""The raw store read back: count the frames really on disk, rebuild a crashed OME-TIFF.

pymmcore-plus writes raw frames asynchronously (a TIFF writer thread, tensorstore
futures for Zarr) and only logs a failed write, so after a run `count_raw_frames`
checks what reached the disk: TIFF pages whose pixels lie inside the file, Zarr frames
whose chunk files all exist (tensorstore renames each chunk into place when complete;
an all-zero frame is not stored and so is not counted).

What survives a crash (SIGKILL, power cut after the page cache was written):

- OME-Zarr: every frame written so far; the store's metadata is written at the start,
  so it opens as it is (missing frames read as zeros).
- OME-TIFF: the pixels of every frame written so far, but only the first page's IFD
  (tifffile writes the other IFDs when the file is closed), so readers see one frame.
  `repair_raw_tiff` rebuilds a complete OME-TIFF from the planned shape in that first
  page's OME-XML and the contiguous pixel data; the original is never modified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ctirf_live.config import Optics

TIFF_SUFFIXES = (".tif", ".tiff")
REPAIRED = ".repaired.ome.tiff"


def is_zarr(path: Path) -> bool:
    """Whether `path` is a Zarr store (by name or by its root zarr.json)."""
    return path.name.endswith(".zarr") or (path / "zarr.json").is_file()


def tiff_files(path: Path) -> list[Path]:
    """The TIFF file itself, or the TIFFs in a per-position folder, sorted."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in TIFF_SUFFIXES and not p.name.endswith(REPAIRED)
        )
    return []


def count_raw_frames(path: str | Path) -> int:
    """Frames whose pixels are on disk in a raw OME-TIFF (file or folder) or OME-Zarr store."""
    path = Path(path)
    if not path.exists():
        return 0
    if is_zarr(path):
        return sum(_zarr_frames(array) for array in _zarr_arrays(path))
    return sum(_tiff_pages_on_disk(f) for f in tiff_files(path))


def set_tiff_resolution(path: str | Path, pixel_size_um: float) -> str | None:
    """Write the pixel size into the TIFF resolution tags of a closed raw OME-TIFF (file
    or folder), in micrometres, so plain ImageJ and tifffile-based readers show the scale.

    ome-writers (0.3) writes 1 pixel per micrometre whatever the pixel size; the tags are
    overwritten in place, same size, pixels untouched. Returns a warning, never raises.
    """
    import tifffile

    if not pixel_size_um or pixel_size_um <= 0:
        return None
    ratio = Fraction(1.0 / pixel_size_um).limit_denominator(1_000_000)
    value = (ratio.numerator, ratio.denominator)
    for file in tiff_files(Path(path)):
        try:
            with tifffile.TiffFile(file, mode="r+b") as tif:
                for page in tif.pages:
                    for name in ("XResolution", "YResolution"):
                        tag = page.tags.get(name)
                        if tag is not None and tuple(tag.value) != tuple(value):
                            tag.overwrite(value)
        except (tifffile.TiffFileError, OSError, ValueError) as exc:
            return f"{file.name}: pixel size not written to its TIFF resolution tags ({exc})"
    return None


def enrich_raw_tiff(path: str | Path, optics: Optics) -> str | None:
    """Add the objective, each channel's AcquisitionMode (EPI: WideField, TIRF:
    TotalInternalReflection) and wavelengths to a closed raw OME-TIFF's OME-XML (file or
    folder), keeping what ome-writers wrote (AcquisitionDate, Plane DeltaT, positions).

    Only the description is replaced (`write_tiff_description`: crash-safe, pixels never
    written); the file is read back, and when it does not show the new description with
    the same series the old one is put back. Returns a warning, never raises.
    """
    import tifffile

    from ctirf_live.data.tiff import enrich_ome_xml, write_tiff_description

    for file in tiff_files(Path(path)):
        old = ""
        try:
            with tifffile.TiffFile(file) as tif:
                old = tif.pages.first.description
                shapes = [s.shape for s in tif.series]
            new = enrich_ome_xml(old, optics)
            write_tiff_description(file, new)
            with tifffile.TiffFile(file) as tif:
                ok = tif.pages.first.description == new and [s.shape for s in tif.series] == shapes
            if not ok:
                write_tiff_description(file, old)
                return f"{file.name}: the objective could not be added to its OME metadata"
        except (tifffile.TiffFileError, ET.ParseError, OSError, ValueError) as exc:
            return f"{file.name}: objective and channel modes not added to its OME-XML ({exc})"
    return None


def enrich_raw_zarr(path: str | Path, optics: Optics) -> str | None:
    """The same facts for a raw OME-Zarr store (NGFF has no Instrument): a `ctirf` block
    (objective, channel modes, wavelengths) beside `ome` in each image's attributes,
    the omero channel labels kept. Returns a warning, never raises."""
    from ctirf_live.data.tiff import KEY, acquisition_facts, atomic_write_json

    try:
        for meta in sorted(Path(path).rglob("zarr.json")):
            doc = json.loads(meta.read_text())
            attrs = doc.get("attributes", {})
            if "multiscales" not in attrs.get("ome", {}):
                continue
            labels = [c.get("label", "") for c in attrs["ome"].get("omero", {}).get("channels", [])]
            attrs.setdefault(KEY, {}).update(kind="raw", **acquisition_facts(optics, labels))
            atomic_write_json(meta, doc)
    except (OSError, ValueError) as exc:
        return f"{Path(path).name}: objective and channel modes not added to its attributes ({exc})"
    return None


def _tiff_pages_on_disk(file: Path) -> int:
    import tifffile

    size = file.stat().st_size
    count = 0
    try:
        with tifffile.TiffFile(file) as tif:
            for page in tif.pages:
                ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]
                if not ends or max(ends) > size:
                    break
                count += 1
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        pass
    return count


def _zarr_arrays(root: Path) -> Iterator[Path]:
    for meta in sorted(root.rglob("zarr.json")):
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("node_type") == "array" and meta.parent.name == "0":
            yield meta.parent


def _zarr_frames(array: Path) -> int:
    """Frames (all but the last two axes) whose chunk files are all present.

    With sharding a file is a whole shard, so a partly written shard counts in full.
    """
    doc = json.loads((array / "zarr.json").read_text())
    shape = [int(n) for n in doc["shape"]]
    chunks = [int(n) for n in doc["chunk_grid"]["configuration"]["chunk_shape"]]
    sep = doc.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    per_frame = math.prod(math.ceil(s / c) for s, c in zip(shape[-2:], chunks[-2:], strict=True))
    found: dict[tuple[int, ...], int] = {}
    base = array / "c"
    if not base.is_dir():
        return 0
    for file in base.rglob("*"):
        if not file.is_file():
            continue
        key = file.relative_to(base).as_posix().split(sep if sep != "." else "/")
        try:
            idx = tuple(int(k) for k in key)
        except ValueError:
            continue
        found[idx[:-2]] = found.get(idx[:-2], 0) + 1
    frames = 0
    for outer, n in found.items():
        if n >= per_frame:
            covered = [
                min(c, s - i * c) for i, c, s in zip(outer, chunks[:-2], shape[:-2], strict=True)
            ]
            frames += math.prod(covered) if covered else 1
    return frames


@dataclass
class RepairResult:
    """What `repair_raw_tiff` found and wrote."""

    source: Path
    output: Path | None
    frames_recovered: int
    planes_planned: int
    shape: tuple[int, ...]
    axes: str

    def describe(self) -> str:
        """One line for the user."""
        if self.output is None:
            return f"{self.source}: complete ({self.frames_recovered} frames); nothing to repair"
        return (
            f"{self.source}: recovered {self.frames_recovered} of {self.planes_planned} "
            f"planned frames into {self.output} (shape {self.shape}, axes {self.axes})"
        )


def repair_raw_tiff(
    source: str | Path, output: str | Path | None = None, *, overwrite: bool = False
) -> RepairResult:
    """Rebuild a readable OME-TIFF from a raw OME-TIFF whose writer was killed.

    The frames in the file are the first planes of the planned series (ome-writers
    writes them in acquisition order, contiguously after the first page); the output
    keeps the planned axes and is cut after the last outer index reached (e.g. the
    last time point), any planes of it that never arrived left zero.
    """
    import tifffile

    source = Path(source)
    with _quiet_tifffile(), tifffile.TiffFile(source) as tif:
        first = tif.pages.first
        series = tif.series[0]
        shape, axes = tuple(int(n) for n in series.shape), str(series.axes)
        pages = len(tif.pages)
        xml = first.description if tif.is_ome else ""
        if first.compression != 1 or not first.is_contiguous:
            raise ValueError(f"{source} is compressed or not contiguous; it cannot be repaired")
        start, frame_bytes = int(first.dataoffsets[0]), int(first.databytecounts[0])
        dtype, frame_shape = first.dtype, tuple(first.shape)
    planned = math.prod(shape[:-2]) if len(shape) > 2 else 1
    in_file = (source.stat().st_size - start) // frame_bytes
    if planned <= pages < in_file:  # planned shape unreadable (OME-XML lost): frames in a row
        shape, axes, planned = (int(in_file), *frame_shape), "TYX", int(in_file)
    on_disk = min(in_file, planned)
    if pages >= planned or on_disk <= pages:
        return RepairResult(source, None, pages, planned, shape, axes)
    inner = math.prod(shape[1:-2]) if len(shape) > 3 else 1
    outer = math.ceil(on_disk / inner) if len(shape) > 2 else 1
    out_shape = (outer, *shape[1:]) if len(shape) > 2 else shape
    target = Path(output) if output else source.with_name(_stem(source) + REPAIRED)
    if target.resolve() == source.resolve():
        raise ValueError("the repaired file must not replace the original; choose another -o")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another -o or pass --overwrite")

    def frames() -> Iterator[np.ndarray]:
        with open(source, "rb") as fh:
            for k in range(math.prod(out_shape[:-2]) if len(out_shape) > 2 else 1):
                if k < on_disk:
                    fh.seek(start + k * frame_bytes)
                    yield np.frombuffer(fh.read(frame_bytes), dtype).reshape(frame_shape)
                else:
                    yield np.zeros(frame_shape, dtype)

    meta = _ome_fields(xml)
    meta.update(axes=axes, Name=f"repaired {source.name}")
    meta["MapAnnotation"] = {
        "Namespace": "ctirf-live",
        "Value": {
            "ctirf": json.dumps(
                {
                    "kind": "repaired-raw",
                    "source": str(source),
                    "frames_recovered": int(on_disk),
                    "planes_planned": planned,
                    "planned_shape": list(shape),
                }
            )
        },
    }
    scale: dict[str, object] = {}
    pixel = meta.get("PhysicalSizeX")
    if isinstance(pixel, float) and pixel > 0 and meta.get("PhysicalSizeXUnit", "µm") == "µm":
        scale = {"resolution": (1 / pixel, 1 / pixel), "resolutionunit": "MICROMETER"}
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as writer:
            writer.write(
                frames(),
                shape=out_shape,
                dtype=dtype,
                photometric="minisblack",
                metadata=meta,
                **scale,  # type: ignore[arg-type]
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return RepairResult(source, target, int(on_disk), planned, out_shape, axes)


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs that a crashed file's OME series is short: that is what we repair."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _ome_fields(xml: str) -> dict[str, object]:
    """Physical sizes and channel names from an OME-XML, as tifffile metadata keys."""
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return {}
    meta: dict[str, object] = {}
    for key in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeZ", "TimeIncrement"):
        if pixels.get(key):
            meta[key] = float(pixels.get(key))  # type: ignore[arg-type]
            unit = pixels.get(f"{key}Unit")
            if unit:
                meta[f"{key}Unit"] = unit
    names = [c.get("Name") or "" for c in pixels if c.tag.endswith("Channel")]
    if any(names):
        meta["Channel"] = {"Name": names}
    return meta


def repair_path(
    path: str | Path, output: str | Path | None = None, *, overwrite: bool = False
) -> list[str]:
    """Repair a raw OME-TIFF, a folder of them, or a run folder; one line per file.

    A run folder (with summary.json) is searched for its raw store. OME-Zarr needs no
    repair (every frame written is in it); the line says how many frames it holds.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; pass a raw OME-TIFF or a run folder")
    if path.is_dir() and not is_zarr(path):
        for name in ("raw.ome.tiff", "raw", "raw.ome.zarr"):
            if (path / name).exists():
                path = path / name
                break
    if is_zarr(path):
        return [
            f"{path}: OME-Zarr keeps every frame written ({count_raw_frames(path)} frames); "
            "nothing to repair"
        ]
    files = tiff_files(path)
    if not files:
        raise ValueError(f"no TIFF files in {path}; pass a raw OME-TIFF or a run folder")
    if output is not None and len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} files; drop -o to repair each beside itself")
    return [repair_raw_tiff(f, output, overwrite=overwrite).describe() for f in files]
