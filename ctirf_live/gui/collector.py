"""Python's cyclic garbage collector, run on the Qt main thread only while a window is open.

CPython collects on whichever thread happens to cross the allocation threshold. In the
live window that is mostly another thread: during one run of tests/test_live_window.py
about 22,000 objects were collected off the main thread (generation 2 on the MDA thread;
the cTIRF worker, ndv's slice-request pool, pymmcore-widgets' snap worker). A collection
there finalizes unreachable Qt wrappers (ndv and vispy objects live in reference cycles)
and deletes their C++ objects on that thread, which Qt does not allow: a native crash at
some later, unrelated point of the event loop. So while a window is open automatic
collection is off and a timer on the GUI thread runs the same generational collections
at the same thresholds.
"""

from __future__ import annotations

import gc
import threading

from qtpy.QtCore import QObject, QTimer

INTERVAL_MS = 200  # how often the GUI thread checks whether a collection is due


class MainThreadCollector(QObject):
    """Switches automatic garbage collection off and collects from a GUI-thread timer."""

    def __init__(self, interval_ms: int = INTERVAL_MS, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.setInterval(int(interval_ms))
        self._timer.timeout.connect(self.check)
        self._was_enabled = False

    @property
    def active(self) -> bool:
        return self._timer.isActive()

    def start(self) -> None:
        """Take over collection (on the thread that owns this object: the GUI thread)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("start the garbage collector's timer from the Qt main thread")
        if self.active:
            return
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._timer.start()

    def check(self) -> int:
        """Collect the oldest generation that is due, as CPython would; returns the
        generation collected (-1: none due)."""
        counts, limits = gc.get_count(), gc.get_threshold()
        if counts[0] <= limits[0]:
            return -1
        generation = 0
        for gen in (2, 1):
            if counts[gen] > limits[gen]:
                generation = gen
                break
        gc.collect(generation)
        return generation

    def stop(self) -> None:
        """Collect everything now (on this thread) and give collection back to CPython."""
        if not self.active:
            return
        self._timer.stop()
        gc.collect()
        if self._was_enabled:
            gc.enable()


_collector: MainThreadCollector | None = None
_users = 0


def acquire() -> MainThreadCollector:
    """Collect on the GUI thread until every `acquire` has been `release`d (one per window)."""
    global _collector, _users
    if _collector is None:
        _collector = MainThreadCollector()
    _users += 1
    _collector.start()
    return _collector


def release() -> None:
    """One window closed; the last one collects everything and restores automatic collection."""
    global _users
    _users = max(_users - 1, 0)
    if _users == 0 and _collector is not None:
        _collector.stop()
