"""The live processor's own bounded work queue, and z-stack assembly.

Frames reach the processor through an unbounded relay queue (`acquisition.mda`), so a slow
model would make memory grow without limit. `Backlog` bounds what waits in memory:

- `preview`: newest wins. A new item replaces the items still waiting; the replaced
  frames are counted as skipped (the raw store has them all).
- `record`: nothing is dropped while there is disk space. Once `queue_size` items wait
  in memory, further items are written to `spill_dir` as `.npy` files (atomically: temp
  file + rename) and read back, in order, when the worker reaches them. When
  `space_check(nbytes)` refuses (the raw frames need the room) or the write fails, the
  item is dropped and returned like a displaced one: memory stays bounded and the raw
  store, which has every frame, keeps priority.

Control markers (sequence start/finish) travel in the same FIFO, so the worker opens
and closes result stores in step with the frames; markers are never dropped.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Policy = Literal["preview", "record"]
POLICIES: tuple[str, ...] = ("preview", "record")


@dataclass
class WorkItem:
    """A frame `(Y, X)` or a complete stack `(Z, Y, X)` waiting for the model."""

    data: np.ndarray | None
    index: dict[str, int]
    event: Any
    t_arrival: float
    n_frames: int = 1
    path: Path | None = None
    z_um: tuple[float | None, ...] = ()  # each plane's stage focus, where known

    def load(self) -> np.ndarray:
        """The pixels, read back (and the spill file removed) if the item was spilled."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise RuntimeError("work item has neither data nor a spill file")
        data = np.load(self.path)
        self.path.unlink(missing_ok=True)
        self.path = None
        return data


@dataclass
class Marker:
    """A control message for the worker, kept in order with the work items."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


class Backlog:
    """Thread-safe FIFO of work items and markers with the preview/record policy."""

    def __init__(
        self,
        policy: Policy = "preview",
        queue_size: int = 4,
        spill_dir: Path | None = None,
        space_check: Callable[[int], bool] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.policy, self.queue_size = policy, queue_size
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self.space_check = space_check
        self._own_spill_dir = False
        self._items: deque[WorkItem | Marker] = deque()
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._in_memory = 0
        self._on_disk = 0
        self.spilled = 0
        self.spill_error: str | None = None

    # -- producer side ----------------------------------------------------------------

    def put(self, item: WorkItem) -> list[WorkItem]:
        """Queue a work item; returns the items dropped (displaced, or `item` if it cannot wait)."""
        dropped: list[WorkItem] = []
        spill = False
        with self._cond:
            if self.policy == "preview":
                dropped = [i for i in self._items if isinstance(i, WorkItem)]
                if dropped:
                    self._items = deque(i for i in self._items if isinstance(i, Marker))
                    self._in_memory = 0
                    self._on_disk = 0
            elif self._in_memory >= self.queue_size:
                spill = True
        if spill:
            nbytes = int(np.asarray(item.data).nbytes)
            if self.space_check is not None and not self.space_check(nbytes):
                self.spill_error = (
                    "disk space is kept for raw frames: frames the model cannot keep up "
                    "with are not processed (the raw store has them)"
                )
                return [item]
            try:
                self._spill(item)
            except OSError as exc:  # disk full or gone: drop it rather than grow memory
                self.spill_error = f"could not spill a frame to disk ({exc}); frame not processed"
                return [item]
        with self._cond:
            if item.data is not None:
                self._in_memory += 1
            else:
                self._on_disk += 1
            self._items.append(item)
            self._cond.notify_all()
        for d in dropped:
            if d.path is not None:
                d.path.unlink(missing_ok=True)
        return dropped

    def put_marker(self, kind: str, **payload: Any) -> None:
        """Queue a control marker (never dropped, never spilled)."""
        with self._cond:
            self._items.append(Marker(kind, payload))
            self._cond.notify_all()

    # -- consumer side ----------------------------------------------------------------

    def get(self, timeout: float | None = None) -> WorkItem | Marker | None:
        """The oldest entry, waiting up to `timeout` s; None when nothing arrived."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            return self._take()

    def get_nowait(self, work_only: bool = True) -> WorkItem | Marker | None:
        """The oldest entry if it is ready now (and a work item, when `work_only`)."""
        with self._cond:
            if not self._items or (work_only and isinstance(self._items[0], Marker)):
                return None
            return self._take()

    def clear(self) -> list[WorkItem]:
        """Remove and return every waiting work item (markers stay)."""
        with self._cond:
            work = [i for i in self._items if isinstance(i, WorkItem)]
            self._items = deque(i for i in self._items if isinstance(i, Marker))
            self._in_memory = self._on_disk = 0
        for w in work:
            if w.path is not None:
                w.path.unlink(missing_ok=True)
        return work

    @property
    def depth(self) -> int:
        """Work items waiting (in memory and on disk)."""
        with self._cond:
            return self._in_memory + self._on_disk

    @property
    def on_disk(self) -> int:
        """Work items currently waiting in spill files."""
        with self._cond:
            return self._on_disk

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def cleanup(self) -> None:
        """Remove the spill folder if this backlog created it."""
        if self._own_spill_dir and self._spill_root is not None:
            shutil.rmtree(self._spill_root, ignore_errors=True)
            self._spill_root, self._own_spill_dir = None, False

    # -- internals --------------------------------------------------------------------

    def _take(self) -> WorkItem | Marker:
        entry = self._items.popleft()
        if isinstance(entry, WorkItem):
            if entry.data is not None:
                self._in_memory -= 1
            else:
                self._on_disk -= 1
        return entry

    def _spill_dir(self) -> Path:
        if self._spill_root is None:
            self._spill_root = Path(tempfile.mkdtemp(prefix="ctirf-spill-"))
            self._own_spill_dir = True
        self._spill_root.mkdir(parents=True, exist_ok=True)
        return self._spill_root

    def _spill(self, item: WorkItem) -> None:
        folder = self._spill_dir()
        path = folder / f"frame-{next(self._counter):08d}.npy"
        tmp = folder / f".{path.name}.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(item.data))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        item.path, item.data = path, None
        self.spilled += 1


class StackAssembler:
    """Collects the planes of each z-stack, keyed by the event index without `z`."""

    def __init__(self) -> None:
        self._groups: dict[Hashable, dict[int, tuple[np.ndarray, Any, float, float | None]]] = {}

    @staticmethod
    def key(index: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
        """The stack a plane belongs to: every index axis except z (e.g. t, p, c, g)."""
        return tuple(sorted((k, int(v)) for k, v in index.items() if k != "z"))

    def add(
        self,
        index: Mapping[str, int],
        frame: np.ndarray,
        event: Any,
        t: float,
        planes: int,
        z_um: float | None = None,
    ) -> WorkItem | None:
        """Add a plane (`z_um`: its stage focus, if known); returns the whole stack as a
        work item once `planes` have arrived."""
        key = self.key(index)
        group = self._groups.setdefault(key, {})
        group[int(index.get("z", 0))] = (frame, event, t, z_um)
        if len(group) < planes:
            return None
        del self._groups[key]
        order = sorted(group)
        stack = np.stack([group[z][0] for z in order])
        _, last_event, t_last, _ = max(group.values(), key=lambda v: v[2])
        focus = tuple(group[z][3] for z in order)
        return WorkItem(stack, dict(key), last_event, t_last, n_frames=len(order), z_um=focus)

    @property
    def pending_frames(self) -> int:
        """Planes waiting for the rest of their stack."""
        return sum(len(g) for g in self._groups.values())

    def clear(self) -> int:
        """Drop incomplete stacks; returns the number of planes dropped."""
        n = self.pending_frames
        self._groups.clear()
        return n
