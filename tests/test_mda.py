"""run_mda: handlers get every signal of a run, in order, on a relay thread of ours, even
with Qt signals and a GUI thread that is not processing events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import useq
from conftest import DEMO_CFG

from ctirf_live.acquisition.core import open_core
from ctirf_live.acquisition.mda import run_mda


class Recorder:
    """Records what it is called with, and on which thread; optionally slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def _note(self, name: str, value: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append((name, value))

    def sequenceStarted(self, sequence: Any, meta: Any = None) -> None:
        self._note("started", None)

    def frameReady(self, frame: Any, event: Any, meta: Any = None) -> None:
        time.sleep(self.delay_s)
        self._note("frame", event.index.get("t"))

    def sequenceFinished(self, sequence: Any) -> None:
        self._note("finished", None)


class Broken:
    def frameReady(self, *args: Any) -> None:
        raise RuntimeError("a handler that fails")


@pytest.fixture(params=["qt", "psygnal"])
def core(request: pytest.FixtureRequest, qapp: Any) -> Iterator[Any]:
    with open_core(DEMO_CFG, signals=request.param) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setExposure(5)
        core.setROI(960, 960, 64, 64)
        yield core


def test_handlers_get_every_frame_in_order_without_the_gui_thread(core) -> None:
    """The GUI (this) thread only waits: pymmcore-plus's own relay, with Qt signals, is
    started by a queued call on this thread; that path lost frames and segfaulted here."""
    seen, broken = Recorder(delay_s=0.02), Broken()
    loops = 8
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": loops})
    done = threading.Event()
    mda_thread: list[str] = []

    def target() -> None:
        mda_thread.append(threading.current_thread().name)
        run_mda(core, seq, handlers=[broken, seen])
        done.set()

    threading.Thread(target=target, name="test-mda").start()
    assert done.wait(60), f"run_mda did not return; handler saw {seen.calls}"
    # returned only once the slow handler had everything, despite the failing one
    assert seen.calls == [
        ("started", None),
        *[("frame", t) for t in range(loops)],
        ("finished", None),
    ]
    assert seen.threads == {"ctirf-mda-relay"}
    assert mda_thread == ["test-mda"]


def test_handlers_are_disconnected_after_the_run(core) -> None:
    seen = Recorder()
    run_mda(core, useq.MDASequence(time_plan={"interval": 0, "loops": 2}), handlers=[seen])
    before = len(seen.calls)
    core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 2}))
    assert len(seen.calls) == before == 4
