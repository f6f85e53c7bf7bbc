"""Free-space policy for a run: raw frames first, cTIRF results and spill files after.

A full disk must never cost a raw frame or kill the process. `DiskBudget` is asked
before the run (does the whole raw store fit, with a margin?), before every
lower-priority write (`allows`: would this cTIRF plane or spill file eat into the room
the raw frames still to come need?) and while the MDA runs (`raw_in_danger`: is the
margin itself gone, so the MDA must stop now?). The free-space figure comes from
`shutil.disk_usage`, a statfs call cheap enough for every write.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20
RESERVE_BYTES = 64 * MIB  # room for closing stores, OME-XML rewrites and summary.json
RESERVE_FRAMES = 8  # raw frames that may arrive between two checks


class DiskFullError(OSError):
    """Not enough free space for the raw frames of a run."""


def _mb(nbytes: float) -> str:
    return f"{nbytes / MIB:,.0f} MB"


@dataclass
class DiskBudget:
    """Free space on the folder's disk versus what the raw frames still need."""

    folder: Path
    raw_frame_bytes: int
    frames_expected: int
    frames_done: Callable[[], int] = field(default=lambda: 0)
    reserve_bytes: int = RESERVE_BYTES

    @property
    def margin(self) -> int:
        """Bytes always kept free: the reserve plus a few raw frames."""
        return self.reserve_bytes + RESERVE_FRAMES * self.raw_frame_bytes

    def free(self) -> int:
        """Free bytes for this user on the folder's disk (0 when it cannot be read)."""
        folder = self.folder
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            return int(shutil.disk_usage(folder).free)
        except OSError:
            return 0

    def raw_left(self) -> int:
        """Bytes the raw frames not yet acquired will take."""
        return max(self.frames_expected - self.frames_done(), 0) * self.raw_frame_bytes

    def check_start(self, ctirf_bytes: int = 0) -> list[str]:
        """Raise DiskFullError when the raw frames cannot fit; warn when cTIRF will not."""
        free, raw = self.free(), self.raw_left()
        if free < raw + self.margin:
            raise DiskFullError(
                f"not enough disk space in {self.folder}: the raw frames need "
                f"{_mb(raw + self.margin)}, {_mb(free)} free; free space or choose another --out"
            )
        if free < raw + ctirf_bytes + self.margin:
            return [
                f"{_mb(free)} free in {self.folder} holds the raw frames ({_mb(raw)}) but not "
                f"all cTIRF results ({_mb(ctirf_bytes)}); cTIRF saving stops when space runs low"
            ]
        return []

    def allows(self, nbytes: int) -> bool:
        """Whether a lower-priority write of `nbytes` leaves room for every raw frame to come."""
        return self.free() - nbytes >= self.raw_left() + self.margin

    def raw_in_danger(self) -> bool:
        """Whether free space has fallen under the margin while raw frames are still due."""
        return self.raw_left() > 0 and self.free() < self.margin

    def stop_message(self) -> str:
        """The one-line reason for stopping a run on low space."""
        return (
            f"disk full: {_mb(self.free())} left in {self.folder}, acquisition stopped "
            "to keep the raw frames already saved; free space and start a new run"
        )
