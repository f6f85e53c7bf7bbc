"""One writer per folder: a lock file that names its owner and outlives no one.

`FolderLock(folder)` holds an OS lock on `folder/.ctirf.lock` (flock on POSIX, a byte
lock on Windows) and writes the owner's pid, host, command and start time into it. The
OS releases the lock when the owner dies, however it dies (SIGKILL, power cut), so a
lock left by a dead run is detected by the next one, taken over, and reported in
`note`. The file is never deleted (deleting a lock file races with the next opener);
an unlocked file is emptied on release.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK_NAME = ".ctirf.lock"
_HELD: set[Path] = set()  # folders this process holds locks on
_WIN_LOCK_OFFSET = 1 << 20  # Windows locks are mandatory: lock a byte past the owner text


class FolderLockedError(ValueError):
    """Another live process writes into this folder; the message names it."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a folder lock."""

    pid: int
    host: str
    command: str
    started: str

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.started})"

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["command"]), str(d["started"]))
        except (ValueError, KeyError, TypeError):
            return None


class FolderLock:
    """Exclusive right to write into `folder`, held until `release()` or the process ends."""

    def __init__(self, folder: str | Path, command: str = "ctirf") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.stale: LockOwner | None = None
        self._fd: int | None = None

    @property
    def note(self) -> str | None:
        """What was taken over, for the user: None when the folder was not left locked."""
        if self.stale is None:
            return None
        return (
            f"took over the lock of {self.folder} left by {self.stale.describe()}, which "
            "ended without releasing it"
        )

    def acquire(self) -> FolderLock:
        """Take the lock or raise `FolderLockedError` naming the owner; never waits."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                owner = LockOwner.parse(_read(fd))
                who = owner.describe() if owner else "another process"
                raise FolderLockedError(
                    f"{self.folder} is in use by {who}; wait for it to finish or use another --out"
                )
            self.stale = LockOwner.parse(_read(fd))
            _write(fd, json.dumps(self._me()))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(self.folder.resolve())
        return self

    def release(self) -> None:
        """Empty the lock file and let go (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self.folder.resolve())
        try:
            _write(fd, "")
        except OSError:
            pass  # a full disk: the OS lock still goes with the descriptor
        finally:
            _unlock(fd)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _me(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def held_here(folder: str | Path) -> bool:
    """Whether this process holds `folder`'s lock."""
    return Path(folder).resolve() in _HELD


def folder_owner(folder: str | Path) -> LockOwner | None:
    """The live process holding `folder`'s lock, or None (free, or never locked)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return LockOwner.parse(_read(fd)) or LockOwner(0, "?", "unknown", "?")
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace")


def _write(fd: int, text: str) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, text.encode())
    os.fsync(fd)


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
