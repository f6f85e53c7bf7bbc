"""Storage for live runs: raw frames through pymmcore-plus, cTIRF results beside them.

Raw frames go to pymmcore-plus's own sink (ome-writers): pass `raw_output_path(...)`
as an `output=` of `core.mda.run`. It writes on its own thread and is never touched by
the processing, so a model crash cannot cost raw data.

cTIRF results go to a second store with the raw store's dimensions, in OME order
`[t][c][z]yx` (channels: only the processed ones, named `cTIRF <preset>`), in the
input's intensity scale as float32, or float16/uint16 with a recorded scale (`encoding`;
`read_result` undoes it), one image per stage position (each (p, g) pair of the
events, so grid sub-sequences on positions work), laid out and named as the raw store
(`ctirf.ome.tiff` or `ctirf/ctirf_p000.ome.tiff`, ...; Zarr series named after the
positions, see `naming`), with the model and PSF metadata
(`Restorer.describe()`) as JSON under the `ctirf` key. Both writers are random access,
so skipped frames (preview policy) stay zero; which planes hold a result is recorded on
close as a `processed` mask (one "0"/"1" per plane in `[t][c][z]` order, per position)
in that JSON. Both are readable at any moment of a run, including after a crash:

- `OmeTiffResultWriter`: the OME-TIFF header and OME-XML are written when the store
  opens (pixels left as a sparse hole); results are written with ordinary `pwrite`
  calls at their plane's offset. Never a memory map: storing into a mapped file on a
  full disk kills the process with SIGBUS, while `pwrite` raises OSError(ENOSPC).
- `OmeZarrResultWriter`: OME-Zarr v0.5 created with yaozarrs, written with tensorstore,
  one chunk per plane (each write is a complete chunk file). On close, each channel's
  display window (omero) is set from the data written, so viewers do not show black.
"""

from __future__ import annotations

import functools
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ctirf_live.config import Optics
from ctirf_live.data.tiff import (
    KEY,
    NAMESPACE,
    acquisition_facts,
    atomic_write_json,
    enrich_ome_xml,
    read_ome_tiff,
    write_tiff_description,
)
from ctirf_live.inference.encoding import Encoding, check_tiff_dtype, decode, encoding_of
from ctirf_live.inference.naming import (
    ctirf_channel_name,
    position_files,
    position_names,
    tiff_stem,
)

Format = Literal["ome-tiff", "ome-zarr"]
SUFFIXES: dict[str, str] = {"ome-tiff": ".ome.tiff", "ome-zarr": ".ome.zarr"}
RAW_STEM, RESULT_STEM = "raw", "ctirf"
ORDER = ("t", "c", "z")
OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def check_format(fmt: str) -> Format:
    """Validate a storage format name (one clear line when unknown)."""
    if fmt not in SUFFIXES:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(SUFFIXES)}")
    return fmt  # type: ignore[return-value]


def raw_output_path(out_dir: str | Path, fmt: str = "ome-tiff") -> Path:
    """Where the raw store goes; pass it as an `output=` of `core.mda.run`."""
    return Path(out_dir) / f"{RAW_STEM}{SUFFIXES[check_format(fmt)]}"


def result_output_path(out_dir: str | Path, fmt: str = "ome-tiff") -> Path:
    """Where the cTIRF store goes; a multi-position OME-TIFF store becomes the folder
    `ctirf/` of `ctirf_p000.ome.tiff`, ... (as the raw store's `raw/`)."""
    return Path(out_dir) / f"{RESULT_STEM}{SUFFIXES[check_format(fmt)]}"


@runtime_checkable
class ResultWriter(Protocol):
    """Where `LiveProcessor` puts cTIRF results; called from its worker thread only."""

    path: Path

    def open(
        self,
        sequence: Any,
        frame_shape: tuple[int, int],
        *,
        channels: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        pixel_size_um: float | None = None,
    ) -> None:
        """Create the store for one useq.MDASequence and (Y, X) frames."""

    def write(self, event_index: Mapping[str, int], result: np.ndarray) -> None:
        """Store a frame `(Y, X)` at its event index, or a stack `(Z, Y, X)` (index without z)."""

    def close(self) -> None:
        """Flush and release; the store stays readable."""


@dataclass(frozen=True)
class ResultLayout:
    """Shape of a result store derived from a useq sequence."""

    axes: tuple[str, ...]
    sizes: tuple[int, ...]
    frame_shape: tuple[int, int]
    position_keys: tuple[tuple[int, int], ...]
    channel_index: Mapping[int, int]
    channel_names: tuple[str, ...]
    pixel_size_um: float | None = None
    position_names: tuple[str, ...] = ()
    z_step_um: float | None = None
    t_interval_s: float | None = None

    @classmethod
    def from_sequence(
        cls,
        sequence: Any,
        frame_shape: Sequence[int],
        channels: Sequence[str] = (),
        pixel_size_um: float | None = None,
    ) -> ResultLayout:
        """Dimensions t, c (processed channels only), z of a finite MDASequence.

        Sizes and positions come from the events themselves, so sub-sequences on a
        position (a grid, its own z plan) get their own image and fit the store.
        """
        import useq

        if not isinstance(sequence, useq.MDASequence):
            raise ValueError(
                "cTIRF results can only be stored for a useq.MDASequence; "
                "got " + type(sequence).__name__
            )
        try:
            dict(sequence.sizes)
        except (ZeroDivisionError, TypeError, ValueError):
            raise ValueError("cTIRF results need a sequence of finite length") from None
        extent = dict.fromkeys(ORDER, 0)
        keys: dict[tuple[int, int], None] = {}
        for event in sequence:
            index = event.index
            keys.setdefault((int(index.get("p", 0)), int(index.get("g", 0))))
            for ax in ORDER:
                if ax in index:
                    extent[ax] = max(extent[ax], int(index[ax]) + 1)
        names = [c.config for c in sequence.channels]
        keep = [i for i, n in enumerate(names) if not channels or n in channels]
        axes: list[str] = []
        dims: list[int] = []
        for ax in ORDER:
            if ax == "c":
                if names:
                    axes.append("c")
                    dims.append(max(len(keep), 1))
            elif extent[ax] > 0:
                axes.append(ax)
                dims.append(extent[ax])
        position_keys = tuple(keys) or ((0, 0),)
        z_step = getattr(sequence.z_plan, "step", None) if sequence.z_plan else None
        interval = getattr(sequence.time_plan, "interval", None) if sequence.time_plan else None
        return cls(
            axes=tuple(axes),
            sizes=tuple(dims),
            frame_shape=(int(frame_shape[-2]), int(frame_shape[-1])),
            position_keys=position_keys,
            channel_index={src: dst for dst, src in enumerate(keep)},
            channel_names=tuple(names[i] for i in keep),
            pixel_size_um=pixel_size_um,
            position_names=tuple(position_names(sequence, frame_shape, len(position_keys))),
            z_step_um=float(z_step) if z_step else None,
            t_interval_s=interval.total_seconds() if interval is not None else None,
        )

    @property
    def positions(self) -> int:
        """Number of images: one per (position, grid point) the events visit."""
        return len(self.position_keys)

    @property
    def planes(self) -> int:
        """Planes in one position's image."""
        return int(np.prod(self.sizes)) if self.sizes else 1

    @property
    def plane_bytes(self) -> int:
        """Bytes of one float32 result plane."""
        return int(np.prod(self.frame_shape)) * 4

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one position's array: sizes + (Y, X)."""
        return (*self.sizes, *self.frame_shape)

    def position(self, index: Mapping[str, int]) -> int:
        """Image number of an event index: its (p, g) pair in the order events visit them."""
        key = (int(index.get("p", 0)), int(index.get("g", 0)))
        if key not in self._position_lookup:
            raise IndexError(f"position {key[0]}, grid point {key[1]} is not in the sequence")
        return self._position_lookup[key]

    @functools.cached_property
    def _position_lookup(self) -> dict[tuple[int, int], int]:
        return {key: i for i, key in enumerate(self.position_keys)}

    def locate(
        self, index: Mapping[str, int], result: np.ndarray
    ) -> tuple[int, list[tuple[tuple[int, ...], np.ndarray]]]:
        """(position, [(array index, plane)]) for a frame or a whole z-stack."""
        result = np.asarray(result)
        if result.shape[-2:] != self.frame_shape:
            raise ValueError(
                f"result of shape {result.shape} does not fit the store's {self.frame_shape} frames"
            )
        pos = self.position(index)
        base = {ax: int(index.get(ax, 0)) for ax in self.axes}
        if "c" in base:
            src = base["c"]
            if src not in self.channel_index:
                raise KeyError(f"channel {src} is not stored in the cTIRF store")
            base["c"] = self.channel_index[src]
        if result.ndim == 2:
            return pos, [(self._index(base), result)]
        if result.ndim == 3 and "z" in self.axes and "z" not in index:
            return pos, [(self._index({**base, "z": z}), plane) for z, plane in enumerate(result)]
        raise ValueError(f"cannot store a result of shape {result.shape} at index {dict(index)}")

    def _index(self, where: Mapping[str, int]) -> tuple[int, ...]:
        idx = tuple(where[ax] for ax in self.axes)
        for i, n, ax in zip(idx, self.sizes, self.axes, strict=True):
            if not 0 <= i < n:
                raise IndexError(f"{ax} index {i} outside the sequence's {n}")
        return idx

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for metadata."""
        return {
            "axes": "".join(self.axes) + "yx",
            "shape": list(self.shape),
            "positions": self.positions,
            "position_names": list(self.position_names),
            "channels": list(self.channel_names),
            "pixel_size_um": self.pixel_size_um,
            "z_step_um": self.z_step_um,
            "t_interval_s": self.t_interval_s,
        }


def _store_metadata(
    layout: ResultLayout, sequence: Any, metadata: Mapping[str, Any] | None, encoding: Encoding
) -> dict[str, Any]:
    try:
        seq = json.loads(sequence.model_dump_json(exclude_unset=True))
    except Exception:  # a sequence that cannot serialise must not stop the store
        seq = None
    return {
        "kind": "ctirf",
        "dtype": f"{encoding.dtype}: stored * scale + offset in the input's intensity scale",
        "encoding": encoding.describe(),
        "layout": layout.describe(),
        "model": dict(metadata or {}),
        "mda_sequence": seq,
    }


class _BaseResultWriter:
    def __init__(
        self, path: str | Path, *, overwrite: bool = False, encoding: Encoding | None = None
    ) -> None:
        self.path = self.requested = Path(path)
        self.overwrite = overwrite
        self.encoding = encoding or Encoding()  # counts reset by every open
        self.layout: ResultLayout | None = None
        self.frames_written = 0
        self._done: list[np.ndarray] = []
        self._meta: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}  # recorded with the store's metadata on close
        # the rig's optics (objective, wavelengths) for the OME metadata; default the model's
        self.optics: Optics | None = None
        self.acquired: datetime | None = None  # set by open: AcquisitionDate
        self._planes: list[list[dict[str, Any]]] = []

    def _layout(
        self,
        sequence: Any,
        frame_shape: tuple[int, int],
        channels: Sequence[str],
        pixel_size_um: float | None,
    ) -> ResultLayout:
        for target in self.targets():
            if target.exists() and not self.overwrite:
                raise FileExistsError(f"{target} exists; choose another output or pass --overwrite")
        self.layout = ResultLayout.from_sequence(sequence, frame_shape, channels, pixel_size_um)
        self.encoding = replace(
            self.encoding, clipped_pixels=0, planes_clipped=0, pixels_seen=0, value_range=[]
        )
        self._done = [np.zeros(self.layout.planes, bool) for _ in range(self.layout.positions)]
        self.frames_written = 0
        self.acquired = datetime.now(timezone.utc)
        self._planes = [[] for _ in range(self.layout.positions)]
        return self.layout

    def _optics(self, metadata: Mapping[str, Any] | None) -> Optics | None:
        """The optics for the OME metadata: the caller's, else the model's (`metadata`
        is `Restorer.describe()`) at the store's pixel size."""
        if self.optics is not None:
            return self.optics
        try:
            optics = Optics(**(metadata or {})["optics"])
        except (KeyError, TypeError, ValueError):
            return None
        if self.layout is not None and self.layout.pixel_size_um:
            optics = optics.model_copy(update={"pixel_size_um": self.layout.pixel_size_um})
        return optics

    def _acquisition(self, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
        """Objective, channel modes and wavelengths, and the acquisition date, as JSON."""
        assert self.layout is not None and self.acquired is not None
        names = [ctirf_channel_name(n) for n in self.layout.channel_names] or ["cTIRF"]
        return {
            "acquired": self.acquired.isoformat(timespec="seconds"),
            **acquisition_facts(self._optics(metadata), names),
        }

    def note_planes(self, planes: Sequence[tuple[Mapping[str, int], Mapping[str, float]]]) -> None:
        """Record each acquired frame's time (s since the run started), exposure (ms) and
        stage position (um), by event index, as OME Plane attributes written on close
        (OME-Zarr: in the `ctirf` attributes); frames of channels not stored are left out."""
        if self.layout is None:
            return
        layout = self.layout
        for index, facts in planes:
            try:
                pos = layout.position(index)
            except IndexError:
                continue
            c = int(index.get("c", 0))
            if "c" in layout.axes:
                if c not in layout.channel_index:
                    continue
                c = layout.channel_index[c]
            plane: dict[str, Any] = {
                "TheZ": int(index.get("z", 0)), "TheT": int(index.get("t", 0)), "TheC": c,
            }
            if "delta_t_s" in facts:
                plane.update(DeltaT=float(facts["delta_t_s"]), DeltaTUnit="s")
            if "exposure_ms" in facts:
                plane.update(ExposureTime=float(facts["exposure_ms"]), ExposureTimeUnit="ms")
            for axis in ("x", "y", "z"):
                if axis in facts:
                    plane[f"Position{axis.upper()}"] = float(facts[axis])
                    plane[f"Position{axis.upper()}Unit"] = "µm"
            self._planes[pos].append(plane)
        for found in self._planes:
            found.sort(key=lambda p: (p["TheT"], p["TheC"], p["TheZ"]))

    def _mark(self, pos: int, idx: tuple[int, ...]) -> None:
        assert self.layout is not None
        flat = np.ravel_multi_index(idx, self.layout.sizes) if idx else 0
        if not self._done[pos][flat]:
            self._done[pos][flat] = True
            self.frames_written += 1

    def targets(self) -> list[Path]:
        """Every path this store may occupy (checked before, replaced on overwrite)."""
        return [self.requested]

    @property
    def bytes_per_pixel(self) -> int:
        """Bytes one stored cTIRF pixel takes (for the free-space checks)."""
        return self.encoding.itemsize

    @property
    def planes_total(self) -> int:
        """Planes the store has room for, over all positions."""
        return self.layout.planes * self.layout.positions if self.layout else 0

    def processed_masks(self) -> list[str]:
        """Per position, one "0"/"1" per plane (`[t][c][z]` order): 1 where a result is stored."""
        return ["".join("1" if d else "0" for d in done) for done in self._done]

    def _final_meta(self, position: int | None = None) -> dict[str, Any]:
        masks = self.processed_masks()
        processed: Any = masks if position is None else masks[position]
        return {
            **self._meta,
            **self.extra,
            "encoding": self.encoding.describe(),
            "processed": processed,
            "planes_processed": self.frames_written,
        }


class OmeTiffResultWriter(_BaseResultWriter):
    """cTIRF results as OME-TIFF, pwrite'd: one file, or for several positions a folder
    named after the file's stem with `<stem>_p000.ome.tiff`, ... (as the raw store)."""

    def __init__(
        self, path: str | Path, *, overwrite: bool = False, encoding: Encoding | None = None
    ) -> None:
        super().__init__(path, overwrite=overwrite, encoding=encoding)
        check_tiff_dtype(self.encoding.dtype)
        self._fds: list[int] = []
        self._offsets: list[int] = []
        self.files: list[Path] = []

    def open(
        self,
        sequence: Any,
        frame_shape: tuple[int, int],
        *,
        channels: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        pixel_size_um: float | None = None,
    ) -> None:
        """Create the file(s): header and OME-XML now, pixels as a hole filled by `write`."""
        import shutil

        import tifffile

        self.close()
        layout = self._layout(sequence, frame_shape, channels, pixel_size_um)
        for target in self.targets():
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        self.path, self.files = position_files(self.requested, layout.positions)
        self.files[0].parent.mkdir(parents=True, exist_ok=True)
        self._meta = _store_metadata(layout, sequence, metadata, self.encoding)
        self._meta["acquisition"] = self._acquisition(metadata)
        optics = self._optics(metadata)
        nbytes = layout.planes * int(np.prod(layout.frame_shape)) * self.bytes_per_pixel
        for i, file in enumerate(self.files):
            meta = {**self._meta, "position": i, "processed": "pending"}
            ome = self._ome(layout, meta, i)
            file.unlink(missing_ok=True)
            scale: dict[str, Any] = {}
            if layout.pixel_size_um:  # the scale for ImageJ and tifffile-based readers
                scale = {
                    "resolution": (1 / layout.pixel_size_um, 1 / layout.pixel_size_um),
                    "resolutionunit": "MICROMETER",
                }
            offset, _ = tifffile.imwrite(
                file,
                shape=layout.shape,
                dtype=self.encoding.numpy_dtype,
                ome=True,
                bigtiff=nbytes > 2**31,
                photometric="minisblack",
                metadata=ome,
                returnoffset=True,
                **scale,
            )
            self._offsets.append(int(offset))
            with tifffile.TiffFile(file) as tif:
                xml = tif.pages.first.description
            write_tiff_description(file, enrich_ome_xml(xml, optics, acquired=self.acquired))
            self._fds.append(os.open(file, os.O_RDWR))

    def targets(self) -> list[Path]:
        """The single-position file and the multi-position folder."""
        return [self.requested, self.requested.with_name(tiff_stem(self.requested))]

    @staticmethod
    def _ome(layout: ResultLayout, meta: dict[str, Any], position: int) -> dict[str, Any]:
        ome: dict[str, Any] = {"axes": "".join(a.upper() for a in layout.axes) + "YX"}
        multi = layout.positions > 1 and position < len(layout.position_names)
        ome["Name"] = layout.position_names[position] if multi else "cTIRF"
        if layout.pixel_size_um:
            px = float(layout.pixel_size_um)
            ome.update(PhysicalSizeX=px, PhysicalSizeXUnit="µm")
            ome.update(PhysicalSizeY=px, PhysicalSizeYUnit="µm")
        if layout.z_step_um and "z" in layout.axes:
            ome.update(PhysicalSizeZ=float(layout.z_step_um), PhysicalSizeZUnit="µm")
        if layout.t_interval_s and "t" in layout.axes:
            ome.update(TimeIncrement=float(layout.t_interval_s), TimeIncrementUnit="s")
        if layout.channel_names:
            ome["Channel"] = {"Name": [ctirf_channel_name(n) for n in layout.channel_names]}
        ome["MapAnnotation"] = {
            "Namespace": NAMESPACE,
            "Value": {KEY: json.dumps(meta, default=str)},
        }
        return ome

    def write(self, event_index: Mapping[str, int], result: np.ndarray) -> None:
        """Write a frame or stack at its planes' offsets (OSError, e.g. ENOSPC, propagates)."""
        if self.layout is None or not self._fds:
            raise RuntimeError("result writer is not open")
        pos, planes = self.layout.locate(event_index, result)
        for idx, plane in planes:
            flat = int(np.ravel_multi_index(idx, self.layout.sizes)) if idx else 0
            data = self.encoding.encode(plane).tobytes()
            _pwrite_all(self._fds[pos], data, self._offsets[pos] + flat * len(data))
            self._mark(pos, idx)

    def close(self) -> None:
        """Sync and close the files, then record which planes were processed; safe twice."""
        fds, self._fds, self._offsets = self._fds, [], []
        for fd in fds:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if fds:
            for i, file in enumerate(self.files):
                planes = self._planes[i] if i < len(self._planes) else []
                _replace_annotation(file, {**self._final_meta(i), "position": i}, planes)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _replace_annotation(
    file: Path, meta: Mapping[str, Any], planes: list[dict[str, Any]] | None = None
) -> None:
    """Rewrite the ctirf JSON in a TIFF's OME-XML and, when known, its image's Plane
    elements (the description is replaced crash-safely, see `write_tiff_description`)."""
    import tifffile

    with tifffile.TiffFile(file) as tif:
        xml = tif.pages.first.description
    ET.register_namespace("", OME_NS)
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    root = ET.fromstring(xml)
    for value in root.iter(f"{{{OME_NS}}}M"):
        if value.get("K") == KEY:
            value.text = json.dumps(meta, default=str)
    xml = ET.tostring(root, encoding="unicode")
    write_tiff_description(file, enrich_ome_xml(xml, planes={0: planes}) if planes else xml)


class OmeZarrResultWriter(_BaseResultWriter):
    """cTIRF results as OME-Zarr v0.5 (yaozarrs layout, tensorstore writes)."""

    def __init__(
        self, path: str | Path, *, overwrite: bool = False, encoding: Encoding | None = None
    ) -> None:
        super().__init__(path, overwrite=overwrite, encoding=encoding)
        self._arrays: list[Any] = []
        self._groups: list[Path] = []
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def open(
        self,
        sequence: Any,
        frame_shape: tuple[int, int],
        *,
        channels: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        pixel_size_um: float | None = None,
    ) -> None:
        """Create the zarr hierarchy with empty (zero-filled) arrays, one chunk per plane."""
        from yaozarrs.write.v05 import Bf2RawBuilder, prepare_image

        self.close()
        layout = self._layout(sequence, frame_shape, channels, pixel_size_um)
        image = self._image_model(layout)
        meta = self._meta = _store_metadata(layout, sequence, metadata, self.encoding)
        meta["acquisition"] = self._acquisition(metadata)
        spec = (layout.shape, self.encoding.dtype)
        chunks = (*(1 for _ in layout.sizes), *layout.frame_shape)
        common = dict(chunks=chunks, writer="tensorstore", overwrite=True, compression="none")
        self._windows = {}
        if layout.positions == 1:
            _, arrays = prepare_image(
                self.path, image, spec, extra_attributes={KEY: meta}, **common
            )
            self._arrays, self._groups = [arrays["0"]], [self.path]
        else:
            builder = Bf2RawBuilder(self.path, **common)
            names = list(layout.position_names)
            for name in names:
                builder.add_series(name, image, [spec])
            _, arrays = builder.prepare()
            self._arrays = [arrays[f"{name}/0"] for name in names]
            self._groups = [self.path / name for name in names]
            self._set_attributes(meta)
        self._set_cf_attributes()

    def _set_cf_attributes(self) -> None:
        """CF packed-data attributes on each array (`value = stored * scale_factor +
        add_offset`), which xarray and other CF-aware Zarr readers undo by themselves."""
        if self.encoding.dtype != "uint16":
            return
        for group in self._groups:
            doc_path = group / "0" / "zarr.json"
            doc = json.loads(doc_path.read_text())
            doc.setdefault("attributes", {}).update(
                scale_factor=self.encoding.scale, add_offset=self.encoding.offset
            )
            atomic_write_json(doc_path, doc)

    def _set_attributes(self, meta: Mapping[str, Any]) -> None:
        root = self.path / "zarr.json"
        doc = json.loads(root.read_text())
        doc.setdefault("attributes", {})[KEY] = dict(meta)
        atomic_write_json(root, doc)

    @staticmethod
    def _image_model(layout: ResultLayout) -> Any:
        from yaozarrs import DimSpec, v05

        px = layout.pixel_size_um or 1.0
        unit_scale = {
            "t": ("second", layout.t_interval_s or 1.0),
            "z": ("micrometer", layout.z_step_um or 1.0),
        }
        dims = []
        for ax, n in zip(layout.axes, layout.sizes, strict=True):
            if ax == "c":
                dims.append(DimSpec(name="c", size=n, type="channel"))
            else:
                unit, scale = unit_scale[ax]
                dims.append(DimSpec(name=ax, size=n, unit=unit, scale=scale))
        dims += [
            DimSpec(name="y", size=layout.frame_shape[0], unit="micrometer", scale=px),
            DimSpec(name="x", size=layout.frame_shape[1], unit="micrometer", scale=px),
        ]
        omero = None
        if layout.channel_names:
            window = v05.OmeroWindow(min=0.0, max=65535.0, start=0.0, end=65535.0)
            omero = v05.Omero(
                channels=[
                    v05.OmeroChannel(label=ctirf_channel_name(n), color="FFFFFF", window=window)
                    for n in layout.channel_names
                ]
            )
        return v05.Image(multiscales=[v05.Multiscale.from_dims(dims, name="cTIRF")], omero=omero)

    def write(self, event_index: Mapping[str, int], result: np.ndarray) -> None:
        """Write each plane as one chunk."""
        if self.layout is None or not self._arrays:
            raise RuntimeError("result writer is not open")
        pos, planes = self.layout.locate(event_index, result)
        array = self._arrays[pos]
        planes = [(idx, self.encoding.encode(plane)) for idx, plane in planes]
        futures = [array[idx].write(plane) for idx, plane in planes]
        for f in futures:
            f.result()
        for idx, plane in planes:
            self._mark(pos, idx)
            self._extend_window(pos, idx, plane)

    def _extend_window(self, pos: int, idx: tuple[int, ...], plane: np.ndarray) -> None:
        """Track each image's and channel's (min, 0.1th pct, 99.9th pct, max) so far, in
        stored units (the omero window applies to the stored values)."""
        assert self.layout is not None
        c = idx[self.layout.axes.index("c")] if "c" in self.layout.axes else 0
        sample = plane[::4, ::4].astype(np.float32)
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            return
        lo, hi = np.percentile(finite, (0.1, 99.9))
        now = np.array([finite.min(), lo, hi, finite.max()], np.float64)
        old = self._windows.get((pos, c))
        self._windows[pos, c] = (
            now
            if old is None
            else np.concatenate([np.minimum(old[:2], now[:2]), np.maximum(old[2:], now[2:])])
        )

    def _set_windows(self) -> None:
        """Write the display windows found in the data into each image's omero metadata."""
        for pos, group in enumerate(self._groups):
            doc = json.loads((group / "zarr.json").read_text())
            channels = doc.get("attributes", {}).get("ome", {}).get("omero", {}).get("channels")
            for (p, c), (vmin, lo, hi, vmax) in self._windows.items():
                if p == pos and channels and c < len(channels):
                    end = hi if hi > lo else vmax
                    channels[c]["window"] = {
                        "min": float(vmin),
                        "max": float(vmax),
                        "start": float(lo),
                        "end": float(end),
                    }
            atomic_write_json(group / "zarr.json", doc)

    def close(self) -> None:
        """Release the arrays (every write already completed), record what was processed
        and set the display windows from the data."""
        if self._arrays:
            self._arrays = []
            if self._windows:
                self._set_windows()
            self._set_attributes({**self._final_meta(), "planes": self._planes})


def make_result_writer(
    out_dir: str | Path,
    fmt: str = "ome-tiff",
    *,
    overwrite: bool = False,
    encoding: Encoding | None = None,
) -> OmeTiffResultWriter | OmeZarrResultWriter:
    """The cTIRF writer for a format, at `result_output_path(out_dir, fmt)`, storing values
    as `encoding` says (default float32)."""
    path = result_output_path(out_dir, fmt)
    if check_format(fmt) == "ome-zarr":
        return OmeZarrResultWriter(path, overwrite=overwrite, encoding=encoding)
    return OmeTiffResultWriter(path, overwrite=overwrite, encoding=encoding)


def read_result(
    path: str | Path, position: int = 0, *, decoded: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a cTIRF store back: (array in `[t][c][z]yx` order, ctirf metadata); values
    in the input's intensity units (float32), or as stored with `decoded=False`."""
    path = Path(path)
    if path.name.endswith(".zarr") or (path / "zarr.json").exists():
        data, meta = _read_zarr(path, position)
    else:
        data, info = read_ome_tiff(_result_file(path, position))
        meta = info.metadata
        layout_shape = meta.get("layout", {}).get("shape")
        if layout_shape and int(np.prod(layout_shape)) == data.size:
            data = data.reshape(layout_shape)
    return (decode(data, encoding_of(meta)) if decoded else data), meta


def _result_file(path: Path, position: int) -> Path:
    """The file of one position: `path` itself, or in its folder (also `ctirf.ome.tiff`
    given for a multi-position run's `ctirf/`, and the older `ctirf.ome.tiff/p000.ome.tiff`)."""
    if path.is_file():
        return path
    folder = path if path.is_dir() else path.with_name(tiff_stem(path))
    for name in (f"{tiff_stem(folder)}_p{position:03d}.ome.tiff", f"p{position:03d}.ome.tiff"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no cTIRF image for position {position} in {folder}")


def _read_zarr(path: Path, position: int) -> tuple[np.ndarray, dict[str, Any]]:
    import tensorstore as ts

    root = json.loads((path / "zarr.json").read_text())
    attrs = root.get("attributes", {})
    series = attrs.get(KEY, {}).get("layout", {}).get("position_names") or []
    name = series[position] if position < len(series) else f"p{position:03d}"
    single = "multiscales" in attrs.get("ome", {})  # else a bioformats2raw group of series
    array_path = path / "0" if single else path / name / "0"
    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array_path)}}
    ).result()
    meta = dict(attrs.get(KEY, {}))
    if isinstance(meta.get("processed"), list):
        meta["processed"] = meta["processed"][position]
    return np.asarray(store.read().result()), meta
