"""Long work reports progress on a terminal (rich bar) and in logs (timestamped lines).

The commands' own lines (calibrate, finetune, acquire, process, evaluate when output is
not a terminal) are checked where the README workflow runs them (test_readme_workflow).
"""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from ctirf_live.progress import ProgressReport

LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<text>.+) \((?P<timing>[^()]+)\)$")


class Clock:
    """A hand-moved clock: the report's timing without waiting."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def _texts(buffer: io.StringIO) -> list[str]:
    lines = buffer.getvalue().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines  # every line is "HH:MM:SS what (timing)"
    return [m["text"] for m in matches if m]


def test_a_log_gets_a_start_line_periodic_lines_and_the_end() -> None:
    console, buffer = _log()
    clock = Clock()
    with ProgressReport("scoring", 10, unit="pairs", console=console, clock=clock) as report:
        for i in range(1, 11):
            clock.now += 1.0  # one pair a second, a line every 5 s
            report.update(i, detail=f"pair {i}")
    assert _texts(buffer) == [
        "scoring: 0/10 pairs",
        "scoring: 5/10 pairs, pair 5",
        "scoring: 10/10 pairs, pair 10",
    ]
    assert "ETA 5 s" in buffer.getvalue().splitlines()[1]  # 5 s for 5, 5 to go


def test_every_item_and_phase_changes_are_lines() -> None:
    console, buffer = _log()
    clock = Clock()
    with ProgressReport("acquiring", unit="frames", console=console, every=2, clock=clock) as r:
        r.update(1, 4)
        r.update(2, 4)
        r.update(4, 4)
        r.update(4, 4, detail="queue 1", label="processing")
        r.update(4, 4, detail="queue 0")  # same phase, nothing new yet: no line
        r.update(4, 4, detail="queue 0", label="done")
    assert _texts(buffer) == [
        "acquiring: started",
        "acquiring: 2/4 frames",
        "acquiring: 4/4 frames",
        "processing: 4/4 frames, queue 1",
        "done: 4/4 frames, queue 0",
    ]


def test_the_last_state_is_printed_when_the_work_stops_early() -> None:
    console, buffer = _log()
    with pytest.raises(KeyboardInterrupt), ProgressReport(
        "calibrating", 20, unit="pairs", console=console, clock=Clock()
    ) as report:
        report.update(3)
        raise KeyboardInterrupt
    assert _texts(buffer)[-1] == "calibrating: 3/20 pairs"


def test_it_is_a_done_total_callback() -> None:
    console, buffer = _log()
    with ProgressReport("cTIRF", unit="planes", console=console, clock=Clock()) as report:
        for i in range(3):
            report(i + 1, 3)
    assert _texts(buffer)[-1] == "cTIRF: 3/3 planes"


def test_a_terminal_gets_a_bar_not_log_lines() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with ProgressReport("fitting", 4, unit="steps", console=console, transient=False) as report:
        assert report.terminal
        report.update(4, detail="loss 0.1234")
    out = buffer.getvalue()
    assert "fitting" in out and "4/4" in out and "loss 0.1234" in out
    assert not re.search(r"^\d\d:\d\d:\d\d ", out, re.M)


def test_markup_in_a_label_is_shown_as_typed() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with ProgressReport("[red]x[/]", 1, console=console, transient=False) as report:
        report.update(1)
    assert "[red]x[/]" in buffer.getvalue()
