"""The statistics line and the trust indicator, from a processor's `LiveStats`.

A `LiveProcessor` counts over its whole life; the window shows each run (snap, live
stream, MDA) from zero, so `RunStats` remembers the counters when a run starts and shows
the difference. Latency and rate are the processor's recent window (the last frames),
shown once the run has processed a frame. The physics-consistency fields
(`consistency_frames`, `consistency_flagged`, `consistency_last`: the newest plane's
scores and verdict) are read only if the processor reports them, so the window works
with processors that do not score frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

COUNTERS = (
    "acquired", "processed", "skipped", "errors", "ignored", "spilled",
    "consistency_frames", "consistency_flagged",
)
TRUST_STYLES = {
    "ok": "background: #1f6f3a; color: white; padding: 2px 6px; border-radius: 3px;",
    "flagged": "background: #a33; color: white; padding: 2px 6px; border-radius: 3px;",
    "uncalibrated": "background: #555; color: white; padding: 2px 6px; border-radius: 3px;",
    "unknown": "color: palette(mid); padding: 2px 6px;",
}


def _count(stats: Any, name: str) -> int:
    value = getattr(stats, name, 0)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


class RunStats:
    """A processor's counters since the current run started."""

    def __init__(self) -> None:
        self._base: dict[str, int] = {}

    def reset(self, stats: Any) -> None:
        """Start a run: what `stats` counts now becomes zero."""
        self._base = {k: _count(stats, k) for k in COUNTERS} if stats is not None else {}

    def counts(self, stats: Any) -> dict[str, int]:
        """Counters of this run (never negative: a new processor restarts from zero)."""
        out = {}
        for k in COUNTERS:
            now, base = _count(stats, k), self._base.get(k, 0)
            out[k] = now - base if now >= base else now
        return out


def stats_text(mode: str, stats: Any, run: RunStats) -> str:
    """'<b>mda</b> · processed 12/14 · skipped 2 · queue 1 · 3.1 fps · latency ...'."""
    head = f"<b>{mode}</b>"
    if stats is None:
        return f"{head} · no frames processed yet"
    c = run.counts(stats)
    parts = [
        head,
        f"processed {c['processed']}/{c['acquired']}",
        f"skipped {c['skipped']}",
        f"queue {_count(stats, 'queue_depth')}",
    ]
    if c["processed"]:
        parts += [
            f"{float(getattr(stats, 'processed_fps', 0.0)):.1f} fps",
            f"latency p50 {float(getattr(stats, 'latency_p50_ms', 0.0)):.0f} ms"
            f" / p95 {float(getattr(stats, 'latency_p95_ms', 0.0)):.0f} ms",
        ]
    if c["spilled"]:
        parts.append(f"on disk {c['spilled']}")
    if c["ignored"]:
        parts.append(f"other channels {c['ignored']}")
    if c["errors"]:
        parts.append(f"<span style='color:#c33'>errors {c['errors']}</span>")
    return " · ".join(parts)


@dataclass(frozen=True)
class Trust:
    """What the trust indicator shows."""

    level: str  # ok | flagged | uncalibrated | unknown
    text: str
    tooltip: str

    @property
    def style(self) -> str:
        return TRUST_STYLES[self.level]


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _scores(last: Any) -> dict[str, float]:
    """The numeric scores of a consistency record (object, dict or a bare number)."""
    if isinstance(last, int | float):
        return {"score": float(last)}
    items = last.items() if isinstance(last, Mapping) else vars(last).items()
    return {
        str(k): float(v)
        for k, v in items
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def trust(stats: Any, run: RunStats | None = None) -> Trust:
    """The trust indicator for the newest processed frame (see the module docstring)."""
    last = getattr(stats, "consistency_last", None) if stats is not None else None
    if last is None or (isinstance(last, Mapping) and not last):
        return Trust("unknown", "trust: n/a", "no consistency score for this model or run yet")
    counts = run.counts(stats) if run else {k: _count(stats, k) for k in COUNTERS}
    flagged_run, scored = counts["consistency_flagged"], counts["consistency_frames"]
    scores = ", ".join(f"{k} {v:.3g}" for k, v in _scores(last).items())
    verdict = None if isinstance(last, int | float) else _field(last, "flagged")
    reason = "" if isinstance(last, int | float) else str(_field(last, "reason") or "")
    tally = f"{flagged_run} of {scored} planes flagged this run"
    if verdict is None:
        return Trust(
            "uncalibrated", "trust: uncalibrated",
            f"the model has no consistency calibration; last frame: {scores}",
        )
    if verdict:
        return Trust("flagged", f"⚠ not trusted ({flagged_run})",
                     f"last frame flagged: {reason or scores}; {tally}")
    return Trust("ok", "trust: ok", f"last frame consistent ({scores}); {tally}")
