"""How cTIRF values are stored: float32, float16 or uint16 with a recorded linear scale.

The cTIRF is in the input's intensity units (camera counts for a camera's frames). A
store may keep it as:

- `float32` (default): the values as computed, 4 bytes a pixel.
- `float16`: 2 bytes a pixel, range +-65504, 11 significant bits (a step of 1/2048 of
  the value or less: 0.5 count at 1000, 32 counts above 32768; far under the shot noise
  of such signals). Values beyond the range are clipped to +-65504 and counted. Not an
  OME pixel type: OME-Zarr only (OME-TIFF readers such as Bio-Formats cannot open it).
- `uint16`: 2 bytes a pixel, `value = stored * scale + offset`, rounded to the nearest
  step, clipped to 0..65535 steps (and counted). The scale is fixed before the first
  frame and recorded, so stored numbers mean the same in every frame of a run. By
  default it follows the camera's bit depth `b`: the range covers the camera's with two
  bits of headroom, `scale = 2**(b + 2 - 16)`, capped at 1 count for 14- and 16-bit
  cameras (a 16-bit camera's cTIRF is stored in its own counts, 12-bit in quarter
  counts, 8-bit in 1/64 counts), and `2**(b - 16)` above 16 bits. Powers of two, so
  decoding is exact in float32.

Every store records its encoding (`Encoding.describe()`: dtype, scale, offset, the
formula, and after writing how many pixels were clipped, in how many planes, and the
extreme values seen) under `encoding` in its ctirf metadata; `decode` undoes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

CtirfDtype = Literal["float32", "float16", "uint16"]
DTYPES: tuple[str, ...] = ("float32", "float16", "uint16")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
UINT16_MAX = 65535
HEADROOM_BITS = 2


def check_dtype(dtype: str) -> CtirfDtype:
    """Validate a cTIRF storage dtype name (one clear line when unknown)."""
    name = str(dtype).lower()
    if name not in DTYPES:
        raise ValueError(f"unknown cTIRF dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return name  # type: ignore[return-value]


def check_tiff_dtype(dtype: str) -> None:
    """Refuse float16 for OME-TIFF: it is not an OME pixel type, Fiji cannot open it."""
    if check_dtype(dtype) == "float16":
        raise ValueError(
            "float16 is not an OME pixel type (Fiji/Bio-Formats cannot open it): store "
            "cTIRF OME-TIFF as uint16 or float32, or use OME-Zarr"
        )


def default_scale(bits: int) -> float:
    """The uint16 step (in input counts) for a camera of `bits` bits: its range with two
    bits of headroom, never finer than needed nor coarser than 1 count up to 16 bits."""
    if bits < 1:
        raise ValueError(f"a camera bit depth must be positive, got {bits}")
    if bits > 16:
        return 2.0 ** (bits - 16)
    return min(1.0, 2.0 ** (bits + HEADROOM_BITS - 16))


def scale_for(dtype: np.dtype | type, bits: int | None = None, peak: float | None = None) -> float:
    """The default uint16 scale for input of `dtype`: from the camera's `bits` when known,
    else the integer dtype's width; float input: the smallest power of two fitting `peak`."""
    dtype = np.dtype(dtype)
    if bits:
        return default_scale(int(bits))
    if dtype.kind in "ui":
        return default_scale(dtype.itemsize * 8)
    if peak is None or not math.isfinite(peak) or peak <= 0:
        return 1.0
    return 2.0 ** math.ceil(math.log2(peak / UINT16_MAX))


@dataclass
class Encoding:
    """One store's value encoding, and what it has clipped so far (thread-confined)."""

    dtype: CtirfDtype = "float32"
    scale: float = 1.0
    offset: float = 0.0
    clipped_pixels: int = 0
    planes_clipped: int = 0
    pixels_seen: int = 0
    value_range: list[float] = field(default_factory=list)  # [min, max] written, in counts

    def __post_init__(self) -> None:
        self.dtype = check_dtype(self.dtype)
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"the cTIRF scale must be a positive number, got {self.scale}")
        if self.dtype != "uint16" and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"a scale or offset applies to uint16 storage, not {self.dtype}")

    @property
    def numpy_dtype(self) -> np.dtype:
        """The stored pixel type, little-endian."""
        return np.dtype({"float32": "<f4", "float16": "<f2", "uint16": "<u2"}[self.dtype])

    @property
    def itemsize(self) -> int:
        """Bytes per stored pixel."""
        return self.numpy_dtype.itemsize

    @property
    def limits(self) -> tuple[float, float] | None:
        """Smallest and largest storable value in input counts (None for float32)."""
        if self.dtype == "float16":
            return -FLOAT16_MAX, FLOAT16_MAX
        if self.dtype == "uint16":
            return self.offset, self.offset + UINT16_MAX * self.scale
        return None

    def encode(self, values: np.ndarray) -> np.ndarray:
        """The stored form of `values` (float, input counts); counts what it clips.

        Two reductions (min, max) per plane; pixels are counted one by one only in a
        plane that has some outside the range (or NaN, stored as 0).
        """
        values = np.asarray(values, np.float32)
        self.pixels_seen += values.size
        lo = float(np.min(values)) if values.size else 0.0
        hi = float(np.max(values)) if values.size else 0.0
        finite = math.isfinite(lo) and math.isfinite(hi)
        if values.size and finite:
            old = self.value_range or [lo, hi]
            self.value_range = [min(old[0], lo), max(old[1], hi)]
        limits = self.limits
        if limits is None:
            return np.ascontiguousarray(values, self.numpy_dtype)
        lo_ok, hi_ok = limits
        if self.dtype == "uint16":  # within half a step of the range: ordinary rounding
            lo_ok, hi_ok = lo_ok - 0.5 * self.scale, hi_ok + 0.5 * self.scale
        nan = 0
        if values.size and not (finite and lo_ok <= lo and hi <= hi_ok):
            nan = int(np.count_nonzero(np.isnan(values)))
            clipped = nan + int(np.count_nonzero((values < lo_ok) | (values > hi_ok)))
            self.clipped_pixels += clipped
            self.planes_clipped += int(clipped > 0)
        if self.dtype == "float16":
            out = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX)
        else:
            out = values - np.float32(self.offset) if self.offset else values.copy()
            if self.scale != 1.0:
                out *= np.float32(1.0 / self.scale)
            np.clip(out, 0, UINT16_MAX, out=out)
            out += np.float32(0.5)  # non-negative now: truncation rounds to nearest
        if nan:
            np.nan_to_num(out, copy=False, nan=0.0)
        return out.astype(self.numpy_dtype)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Values in input counts (float32) from stored pixels."""
        return decode(stored, self.describe())

    def describe(self) -> dict[str, Any]:
        """The JSON record a store keeps: enough to undo the encoding and judge its loss."""
        out: dict[str, Any] = {
            "dtype": self.dtype,
            "scale": self.scale,
            "offset": self.offset,
            "value": "stored * scale + offset, in the input's intensity units",
        }
        if self.limits is not None:
            lo, hi = self.limits
            out.update(
                range=[lo, hi],
                clipped_pixels=self.clipped_pixels,
                planes_clipped=self.planes_clipped,
                clipped_fraction=self.clipped_pixels / self.pixels_seen if self.pixels_seen else 0,
            )
        if self.value_range:
            out["values_seen"] = list(self.value_range)
        return out

    def clip_warning(self) -> str | None:
        """One line for the user when pixels were clipped, else None."""
        if not self.clipped_pixels or self.limits is None:
            return None
        share = self.clipped_pixels / max(self.pixels_seen, 1)
        top = self.value_range[1] if self.value_range else float("nan")
        fix = (
            f"pass --ctirf-scale {scale_for(np.float32, peak=top):g} or --ctirf-dtype float32"
            if self.dtype == "uint16"
            else "use --ctirf-dtype float32"
        )
        return (
            f"{self.clipped_pixels} cTIRF pixels ({share:.2%}) in {self.planes_clipped} planes "
            f"were outside the {self.dtype} range {self.limits[0]:g}..{self.limits[1]:g} "
            f"(seen {self.value_range[0]:g}..{top:g}) and were clipped; {fix}"
        )


def make_encoding(
    dtype: str = "float32",
    scale: float | None = None,
    *,
    input_dtype: np.dtype | type = np.uint16,
    bits: int | None = None,
    peak: float | None = None,
) -> Encoding:
    """The encoding for a store: `scale` as given, or the default for the input (uint16)."""
    dtype = check_dtype(dtype)
    if dtype != "uint16":
        if scale not in (None, 1.0):
            raise ValueError("--ctirf-scale applies to --ctirf-dtype uint16 only")
        return Encoding(dtype)
    return Encoding(dtype, scale=scale or scale_for(input_dtype, bits, peak))


def encoding_of(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The encoding record in a store's ctirf metadata (None: plain float32 values)."""
    record = (metadata or {}).get("encoding")
    return dict(record) if isinstance(record, Mapping) and "dtype" in record else None


def decode(stored: Any, record: Mapping[str, Any] | None) -> Any:
    """Values in input counts from stored pixels and an encoding record (numpy, dask or
    zarr arrays; lazy ones stay lazy). Without a record, or float32, unchanged."""
    if not record or record.get("dtype", "float32") == "float32":
        return stored
    scale, offset = float(record.get("scale", 1.0)), float(record.get("offset", 0.0))
    if isinstance(stored, np.ndarray) or not hasattr(stored, "astype"):
        values = np.asarray(stored).astype(np.float32)
    else:
        values = stored.astype(np.float32)
    if scale != 1.0:
        values = values * np.float32(scale)
    if offset:
        values = values + np.float32(offset)
    return values
