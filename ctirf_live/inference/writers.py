"""Storage for live runs: raw frames through pymmcore-plus, cTIRF results beside them.

Raw frames go to pymmcore-plus's own sink (ome-writers): pass `raw_output_path(...)`
as an `output=` of `core.mda.run`. It writes on its own thread and is never touched by
the processing, so a model crash cannot cost raw data.

cTIRF results go to a second store with the raw store's dimensions, in OME order
`[t][c][z]yx` (channels: only the processed ones), float32 in the input's intensity
scale, one image per stage position, with the model and PSF metadata
(`Restorer.describe()`) as JSON under the `ctirf` key. Both writers are random access,
so skipped frames (preview policy) simply stay zero, and both are readable at any
moment of a run, including after a crash:

- `OmeTiffResultWriter`: a tifffile memory map. The OME-TIFF header and OME-XML are
  written when the store opens; results land in the mapped pixels (flushed every few
  seconds and on close), so a killed process leaves a valid file.
- `OmeZarrResultWriter`: OME-Zarr v0.5 created with yaozarrs, written with tensorstore,
  one chunk per plane (each write is a complete chunk file).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ctirf_live.data.tiff import KEY, NAMESPACE, atomic_write_json, read_ome_tiff

Format = Literal["ome-tiff", "ome-zarr"]
SUFFIXES: dict[str, str] = {"ome-tiff": ".ome.tiff", "ome-zarr": ".ome.zarr"}
RAW_STEM, RESULT_STEM = "raw", "ctirf"
ORDER = ("t", "c", "z")
FLUSH_INTERVAL_S = 2.0


def check_format(fmt: str) -> Format:
    """Validate a storage format name (one clear line when unknown)."""
    if fmt not in SUFFIXES:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(SUFFIXES)}")
    return fmt  # type: ignore[return-value]


def raw_output_path(out_dir: str | Path, fmt: str = "ome-tiff") -> Path:
    """Where the raw store goes; pass it as an `output=` of `core.mda.run`."""
    return Path(out_dir) / f"{RAW_STEM}{SUFFIXES[check_format(fmt)]}"


def result_output_path(out_dir: str | Path, fmt: str = "ome-tiff") -> Path:
    """Where the cTIRF store goes (a folder of per-position files for multi-position TIFF)."""
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
    positions: int
    grid: int
    channel_index: Mapping[int, int]
    channel_names: tuple[str, ...]
    pixel_size_um: float | None = None
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
        """Dimensions t, c (processed channels only), z of a finite MDASequence."""
        import useq

        if not isinstance(sequence, useq.MDASequence):
            raise ValueError(
                "cTIRF results can only be stored for a useq.MDASequence; "
                "got " + type(sequence).__name__
            )
        try:
            sizes = {k: int(v) for k, v in sequence.sizes.items()}
        except (ZeroDivisionError, TypeError, ValueError):
            raise ValueError("cTIRF results need a sequence of finite length") from None
        names = [c.config for c in sequence.channels]
        keep = [i for i, n in enumerate(names) if not channels or n in channels]
        axes: list[str] = []
        dims: list[int] = []
        for ax in ORDER:
            if ax == "c":
                if names:
                    axes.append("c")
                    dims.append(max(len(keep), 1))
            elif sizes.get(ax, 0) > 0:
                axes.append(ax)
                dims.append(sizes[ax])
        z_step = getattr(sequence.z_plan, "step", None) if sequence.z_plan else None
        interval = getattr(sequence.time_plan, "interval", None) if sequence.time_plan else None
        return cls(
            axes=tuple(axes),
            sizes=tuple(dims),
            frame_shape=(int(frame_shape[-2]), int(frame_shape[-1])),
            positions=max(sizes.get("p", 0), 1) * max(sizes.get("g", 0), 1),
            grid=max(sizes.get("g", 0), 1),
            channel_index={src: dst for dst, src in enumerate(keep)},
            channel_names=tuple(names[i] for i in keep),
            pixel_size_um=pixel_size_um,
            z_step_um=float(z_step) if z_step else None,
            t_interval_s=interval.total_seconds() if interval is not None else None,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one position's array: sizes + (Y, X)."""
        return (*self.sizes, *self.frame_shape)

    def position(self, index: Mapping[str, int]) -> int:
        """Linear position of an event index over (p, g)."""
        return int(index.get("p", 0)) * self.grid + int(index.get("g", 0))

    def locate(
        self, index: Mapping[str, int], result: np.ndarray
    ) -> tuple[int, list[tuple[tuple[int, ...], np.ndarray]]]:
        """(position, [(array index, plane)]) for a frame or a whole z-stack."""
        result = np.asarray(result)
        if result.shape[-2:] != self.frame_shape:
            raise ValueError(
                f"result of shape {result.shape} does not fit the store's "
                f"{self.frame_shape} frames"
            )
        pos = self.position(index)
        if not 0 <= pos < self.positions:
            raise IndexError(f"position index {pos} outside the sequence's {self.positions}")
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
            "channels": list(self.channel_names),
            "pixel_size_um": self.pixel_size_um,
            "z_step_um": self.z_step_um,
            "t_interval_s": self.t_interval_s,
        }


def _store_metadata(
    layout: ResultLayout, sequence: Any, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    try:
        seq = json.loads(sequence.model_dump_json(exclude_unset=True))
    except Exception:  # a sequence that cannot serialise must not stop the store
        seq = None
    return {
        "kind": "ctirf",
        "dtype": "float32 in the input's intensity scale",
        "layout": layout.describe(),
        "model": dict(metadata or {}),
        "mda_sequence": seq,
    }


class _BaseResultWriter:
    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.layout: ResultLayout | None = None
        self.frames_written = 0

    def _layout(
        self,
        sequence: Any,
        frame_shape: tuple[int, int],
        channels: Sequence[str],
        pixel_size_um: float | None,
    ) -> ResultLayout:
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path} exists; choose another output or overwrite it")
        self.layout = ResultLayout.from_sequence(sequence, frame_shape, channels, pixel_size_um)
        return self.layout


class OmeTiffResultWriter(_BaseResultWriter):
    """cTIRF results as memory-mapped OME-TIFF (one file, or a folder with one per position)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        super().__init__(path, overwrite=overwrite)
        self._maps: list[np.memmap] = []
        self._last_flush = 0.0
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
        """Create the file(s) at full size; they are valid OME-TIFF from this moment."""
        import shutil

        import tifffile

        layout = self._layout(sequence, frame_shape, channels, pixel_size_um)
        if self.path.is_dir():
            shutil.rmtree(self.path)
        if layout.positions == 1:
            self.files = [self.path]
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.files = [self.path / f"p{i:03d}.ome.tiff" for i in range(layout.positions)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = _store_metadata(layout, sequence, metadata)
        nbytes = int(np.prod(layout.shape)) * 4
        for i, file in enumerate(self.files):
            ome = self._ome(layout, {**meta, "position": i})
            file.unlink(missing_ok=True)
            mm = tifffile.memmap(
                file,
                shape=layout.shape,
                dtype="float32",
                ome=True,
                bigtiff=nbytes > 2**31,
                photometric="minisblack",
                metadata=ome,
            )
            self._maps.append(mm)
        self._last_flush = time.monotonic()

    @staticmethod
    def _ome(layout: ResultLayout, meta: dict[str, Any]) -> dict[str, Any]:
        ome: dict[str, Any] = {"axes": "".join(a.upper() for a in layout.axes) + "YX"}
        ome["Name"] = "cTIRF"
        if layout.pixel_size_um:
            px = float(layout.pixel_size_um)
            ome.update(PhysicalSizeX=px, PhysicalSizeXUnit="µm")
            ome.update(PhysicalSizeY=px, PhysicalSizeYUnit="µm")
        if layout.z_step_um and "z" in layout.axes:
            ome.update(PhysicalSizeZ=float(layout.z_step_um), PhysicalSizeZUnit="µm")
        if layout.t_interval_s and "t" in layout.axes:
            ome.update(TimeIncrement=float(layout.t_interval_s), TimeIncrementUnit="s")
        if layout.channel_names:
            ome["Channel"] = {"Name": [f"cTIRF {n}" for n in layout.channel_names]}
        ome["MapAnnotation"] = {
            "Namespace": NAMESPACE,
            "Value": {KEY: json.dumps(meta, default=str)},
        }
        return ome

    def write(self, event_index: Mapping[str, int], result: np.ndarray) -> None:
        """Copy a frame or stack into the mapped file (flushed every few seconds)."""
        if self.layout is None or not self._maps:
            raise RuntimeError("result writer is not open")
        pos, planes = self.layout.locate(event_index, result)
        target = self._maps[pos]
        for idx, plane in planes:
            target[idx] = plane
        self.frames_written += len(planes)
        if time.monotonic() - self._last_flush > FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Push written pixels to disk."""
        for mm in self._maps:
            mm.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and unmap; safe to call twice."""
        if self._maps:
            self.flush()
        self._maps = []


class OmeZarrResultWriter(_BaseResultWriter):
    """cTIRF results as OME-Zarr v0.5 (yaozarrs layout, tensorstore writes)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        super().__init__(path, overwrite=overwrite)
        self._arrays: list[Any] = []

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

        layout = self._layout(sequence, frame_shape, channels, pixel_size_um)
        image = self._image_model(layout)
        meta = _store_metadata(layout, sequence, metadata)
        spec = (layout.shape, "float32")
        chunks = (*(1 for _ in layout.sizes), *layout.frame_shape)
        common = dict(chunks=chunks, writer="tensorstore", overwrite=True, compression="none")
        if layout.positions == 1:
            _, arrays = prepare_image(
                self.path, image, spec, extra_attributes={KEY: meta}, **common
            )
            self._arrays = [arrays["0"]]
        else:
            builder = Bf2RawBuilder(self.path, **common)
            names = [f"p{i:03d}" for i in range(layout.positions)]
            for name in names:
                builder.add_series(name, image, [spec])
            _, arrays = builder.prepare()
            self._arrays = [arrays[f"{name}/0"] for name in names]
            root = self.path / "zarr.json"
            doc = json.loads(root.read_text())
            doc.setdefault("attributes", {})[KEY] = meta
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
                    v05.OmeroChannel(label=f"cTIRF {n}", color="FFFFFF", window=window)
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
        futures = [
            array[idx].write(np.ascontiguousarray(plane, np.float32)) for idx, plane in planes
        ]
        for f in futures:
            f.result()
        self.frames_written += len(planes)

    def close(self) -> None:
        """Release the arrays (every write already completed)."""
        self._arrays = []


def make_result_writer(
    out_dir: str | Path, fmt: str = "ome-tiff", *, overwrite: bool = False
) -> OmeTiffResultWriter | OmeZarrResultWriter:
    """The cTIRF writer for a format, at `result_output_path(out_dir, fmt)`."""
    path = result_output_path(out_dir, fmt)
    if check_format(fmt) == "ome-zarr":
        return OmeZarrResultWriter(path, overwrite=overwrite)
    return OmeTiffResultWriter(path, overwrite=overwrite)


def read_result(path: str | Path, position: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a cTIRF store back: (array in `[t][c][z]yx` order, ctirf metadata)."""
    path = Path(path)
    if path.name.endswith(".zarr") or (path / "zarr.json").exists():
        return _read_zarr(path, position)
    file = path if path.is_file() else path / f"p{position:03d}.ome.tiff"
    data, info = read_ome_tiff(file)
    layout_shape = info.metadata.get("layout", {}).get("shape")
    if layout_shape and int(np.prod(layout_shape)) == data.size:
        data = data.reshape(layout_shape)
    return data, info.metadata


def _read_zarr(path: Path, position: int) -> tuple[np.ndarray, dict[str, Any]]:
    import tensorstore as ts

    root = json.loads((path / "zarr.json").read_text())
    attrs = root.get("attributes", {})
    array_path = path / "0" if (path / "0" / "zarr.json").exists() else path / f"p{position:03d}/0"
    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array_path)}}
    ).result()
    return np.asarray(store.read().result()), attrs.get(KEY, {})
