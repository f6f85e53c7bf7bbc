"""What the panes show: the planes of the current run, held for ndv within a memory budget.

`PlaneBuffer` is an array-like (`shape`, `dtype`, `dims`, `coords`, `__getitem__`) that
ndv wraps as it wraps numpy: axes `t, p, c, z` (those of size > 1) then `y, x`, so ndv
draws a slider for each. Planes arrive one by one (raw frames) or as z-stacks (results of
a 3D model); a plane not received (skipped by the preview policy) or evicted to keep the
budget reads as zeros. `Inbox` takes frames from the acquisition, relay and worker
threads: they only append under a lock; the GUI thread drains it on its own timer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AXES = ("t", "p", "c", "z")
BUDGET_BYTES = 512 * 1024**2  # per buffer: older planes give way (the stores keep them all)
INBOX_FRAMES = 64  # frames waiting for the GUI; beyond that the oldest are not displayed
Index = tuple[int, ...]


def event_index(event: Any) -> dict[str, int]:
    """A useq event's index as plain {axis: int} ({} for snaps and live frames)."""
    return {str(k): int(v) for k, v in dict(getattr(event, "index", None) or {}).items()}


def channel_name(event: Any) -> str | None:
    """The channel preset of a useq event (None when it has none)."""
    return getattr(getattr(event, "channel", None), "config", None)


def describe_index(index: Mapping[str, int], channel: str | None = None) -> str:
    """'t=3 p=0 z=2 EPI' for labels ('' for a snap or live frame)."""
    parts = [f"{k}={index[k]}" for k in ("t", "p", "g", "z") if k in index]
    if channel:
        parts.append(channel)
    return " ".join(parts)


class PlaneBuffer:
    """The planes of one run, as a lazily assembled (t, p, c, z, y, x) array for ndv.

    `sizes` are the run's axis lengths (a useq sequence's `sizes`); `channels` name the
    `c` positions (ndv shows the names). Thread-unsafe on purpose: only the GUI thread
    writes, and the panes make ndv read on the GUI thread too (`panes.make_synchronous`).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        frame_shape: Sequence[int],
        dtype: Any = np.float32,
        channels: Sequence[str] = (),
        budget_bytes: int = BUDGET_BYTES,
    ) -> None:
        if len(frame_shape) != 2 or min(frame_shape) < 1:
            raise ValueError(f"frames must be 2D (Y, X); got shape {tuple(frame_shape)}")
        self.sizes = {a: int(sizes.get(a, 1) or 1) for a in AXES}
        if channels:
            self.sizes["c"] = len(channels)
        self.axes = tuple(a for a in AXES if self.sizes[a] > 1)
        self.dims = (*self.axes, "y", "x")
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.shape = (*(self.sizes[a] for a in self.axes), *self.frame_shape)
        self.dtype = np.dtype(dtype)
        self.channels = tuple(channels)
        coords: dict[str, Sequence[Any]] = {a: range(self.sizes[a]) for a in self.axes}
        if "c" in coords and self.channels:
            coords["c"] = list(self.channels)
        coords["y"], coords["x"] = range(self.frame_shape[0]), range(self.frame_shape[1])
        self.coords = coords
        self.budget_bytes = int(budget_bytes)
        self._planes: OrderedDict[Index, np.ndarray] = OrderedDict()
        self._bytes = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held now (at most the budget)."""
        return self._bytes

    def key(self, index: Mapping[str, int]) -> Index:
        """The buffer position of an event index (axes it lacks are ignored)."""
        return tuple(min(max(int(index.get(a, 0)), 0), self.sizes[a] - 1) for a in self.axes)

    def fits(self, plane: np.ndarray) -> bool:
        return tuple(np.shape(plane)[-2:]) == self.frame_shape

    def put(self, index: Mapping[str, int], plane: np.ndarray) -> bool:
        """Store one plane at `index`; False (nothing stored) when its shape differs."""
        plane = np.asarray(plane)
        if plane.ndim != 2 or not self.fits(plane):
            return False
        key = self.key(index)
        old = self._planes.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        stored = np.array(plane, dtype=self.dtype, copy=True)
        self._planes[key] = stored
        self._bytes += stored.nbytes
        while self._bytes > self.budget_bytes and len(self._planes) > 1:
            _, dropped = self._planes.popitem(last=False)
            self._bytes -= dropped.nbytes
        return True

    def put_stack(self, index: Mapping[str, int], stack: np.ndarray) -> bool:
        """Store a (Z, Y, X) stack at `index` (its `z` ignored); a 2D array is one plane."""
        stack = np.asarray(stack)
        if stack.ndim == 2:
            return self.put(index, stack)
        if stack.ndim != 3 or not self.fits(stack):
            return False
        return all(self.put({**index, "z": z}, plane) for z, plane in enumerate(stack))

    def has(self, index: Mapping[str, int]) -> bool:
        return self.key(index) in self._planes

    def plane(self, index: Mapping[str, int]) -> np.ndarray | None:
        """The stored plane at `index`, or None."""
        return self._planes.get(self.key(index))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, spatial = key[: len(self.axes)], key[len(self.axes) :]
        ranges = [
            range(n)[k] if isinstance(k, slice) else [range(n)[k]]
            for k, n in zip(lead, self.shape[: len(self.axes)], strict=True)
        ]
        spatial_shape = np.broadcast_to(np.zeros((), self.dtype), self.frame_shape)[spatial].shape
        out = np.zeros((*(len(r) for r in ranges), *spatial_shape), self.dtype)
        for pos in itertools.product(*(list(enumerate(r)) for r in ranges)):
            plane = self._planes.get(tuple(v for _, v in pos))
            if plane is not None:
                out[tuple(i for i, _ in pos)] = plane[spatial]
        squeeze = tuple(i for i, k in enumerate(lead) if not isinstance(k, slice))
        return out.squeeze(axis=squeeze) if squeeze else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[()] if dtype is None else self[()].astype(dtype)


@dataclass
class Received:
    """One frame or result taken from another thread, with when it arrived."""

    data: np.ndarray
    event: Any = None
    raw: np.ndarray | None = None
    t: float = field(default_factory=time.monotonic)


class Inbox:
    """Raw frames and results handed over by other threads (cheap: append under a lock)."""

    def __init__(self, maxlen: int = INBOX_FRAMES) -> None:
        self._lock = threading.Lock()
        self._raw: deque[Received] = deque(maxlen=maxlen)
        self._results: deque[Received] = deque(maxlen=maxlen)

    def put_raw(self, frame: np.ndarray, event: Any = None) -> None:
        with self._lock:
            self._raw.append(Received(frame, event))

    def put_result(self, raw: np.ndarray | None, result: np.ndarray, event: Any = None) -> None:
        with self._lock:
            self._results.append(Received(result, event, raw))

    def take(self) -> tuple[list[Received], list[Received]]:
        """Everything received since the last call: (raw frames, results), oldest first."""
        with self._lock:
            raw, results = list(self._raw), list(self._results)
            self._raw.clear()
            self._results.clear()
        return raw, results

    def clear(self) -> None:
        self.take()
