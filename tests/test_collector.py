"""Garbage collection on the GUI thread only while a window is open (gui/collector.py)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

pytest.importorskip("pytestqt")

from ctirf_live.gui import collector


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_other_threads_never_collect_and_the_timer_does(qtbot) -> None:
    threads: list[str] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            threads.append(threading.current_thread().name)

    was_enabled = gc.isenabled()
    gc.callbacks.append(note)
    try:
        collector.acquire()
        assert not gc.isenabled()
        cycle = Node()
        gone = weakref.ref(cycle)
        del cycle

        def churn() -> None:  # would cross every threshold many times over
            for _ in range(50_000):
                Node()

        worker = threading.Thread(target=churn, name="worker")
        worker.start()
        worker.join()
        assert "worker" not in threads and gone() is not None
        qtbot.waitUntil(lambda: gone() is None, timeout=5000)  # the GUI-thread timer
        assert set(threads) == {threading.main_thread().name}
    finally:
        collector.release()
        gc.callbacks.remove(note)
    assert gc.isenabled() == was_enabled


def test_windows_share_it_and_the_last_one_restores_collection(qtbot) -> None:
    was_enabled = gc.isenabled()
    first = collector.acquire()
    second = collector.acquire()
    assert first is second and first.active
    collector.release()
    assert first.active and not gc.isenabled()  # one window still open
    collector.release()
    assert not first.active and gc.isenabled() == was_enabled


def test_check_collects_only_when_due() -> None:
    gc.collect()
    c = collector.MainThreadCollector()
    assert c.check() == -1  # nothing allocated since
    gc.disable()
    try:
        for _ in range(gc.get_threshold()[0] + 10):
            Node()
        assert c.check() >= 0
    finally:
        gc.enable()
