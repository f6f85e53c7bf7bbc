"""Run an MDA whose frame handlers get its signals on a relay thread of ours.

`core.mda.run(seq, output=[handler])` relays a handler's events through a thread that
pymmcore-plus starts from its own `sequenceStarted` signal. With Qt signals (any window)
that start, and every event fed to the relay, is delivered as a queued call on the GUI
thread: frames wait while the GUI is busy, a short run can end before the relay has
started (it is then never joined and its frames never reach the handler), and the posted
call can run on the relay after it was freed, which crashed the window natively (a
segfault in `Thread.start` from Qt's event processing, caught in a core dump). Here the
relay is started before the run and joined after it; it is fed through Qt's
DirectConnection (a queue put on the acquisition thread), so the handlers
(`LiveProcessor`, the calibration collector) never run on the acquisition or GUI thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from pymmcore_plus import CMMCorePlus

log = logging.getLogger(__name__)

SIGNALS = (
    "sequenceStarted",
    "frameReady",
    "sequenceFinished",
    "sequenceCanceled",
    "sequencePauseToggled",
)
_END = object()


@contextmanager
def _connected(signal: Any, slot: Any) -> Iterator[None]:
    try:  # a Qt signal (QMDASignaler): called on the emitting thread
        from qtpy.QtCore import Qt

        signal.connect(slot, Qt.ConnectionType.DirectConnection)
    except (ImportError, TypeError):  # psygnal calls synchronously already
        signal.connect(slot)
    try:
        yield
    finally:
        signal.disconnect(slot)


class Relay:
    """Hands the MDA's events to `handlers` in order, on its own thread.

    The methods named like the MDA's signals only queue (the acquisition thread never
    waits on a handler); `close` waits until every queued event has been handled.
    """

    def __init__(self, handlers: Sequence[Any]) -> None:
        self.handlers = list(handlers)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ctirf-mda-relay", daemon=True)
        self._thread.start()
        for name in SIGNALS:
            setattr(self, name, self._queuer(name))

    def _queuer(self, name: str) -> Any:
        def put(*args: Any) -> None:
            self._queue.put((name, args))

        put.__name__ = name
        return put

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            name, args = item
            for handler in self.handlers:
                slot = getattr(handler, name, None)
                if not callable(slot):
                    continue
                try:
                    slot(*args)
                except Exception:  # one handler's failure must not stop the others
                    log.exception("MDA handler %r failed in %s", handler, name)

    def close(self) -> None:
        """Handle everything queued, then end the thread."""
        self._queue.put(_END)
        self._thread.join()


def run_mda(
    core: CMMCorePlus,
    events: Iterable[Any],
    *,
    handlers: Sequence[Any] = (),
    sinks: Sequence[Any] = (),
    **kwargs: Any,
) -> None:
    """Run `events` on this thread: `sinks` (store paths) go to `core.mda.run`'s `output`;
    `handlers` (objects with `frameReady`, `sequenceStarted`, ...) get every signal of this
    run through a `Relay`; returns once they have handled all of them."""
    if not handlers:
        core.mda.run(events, output=list(sinks) or None, **kwargs)
        return
    relay = Relay(handlers)
    try:
        with ExitStack() as stack:
            for name in SIGNALS:
                signal = getattr(core.mda.events, name)
                stack.enter_context(_connected(signal, getattr(relay, name)))
            core.mda.run(events, output=list(sinks) or None, **kwargs)
    finally:
        relay.close()
