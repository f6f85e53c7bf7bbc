"""Widget icons that cost one network attempt at most, offline or not.

pymmcore-widgets, superqt and ndv name their icons by iconify key (`mdi:chevron-up`);
pyconify fetches each from api.iconify.design once and caches it on disk. Offline (common
on microscope PCs, and in CI) every uncached icon is another failed request, ~0.16 s
each, ~15 s per window, and the stage widget's arrows raise instead of falling back.
`install()` routes those lookups through `icon_path`: pyconify while it answers; after
its first network failure, for the rest of the process, a generated stand-in drawn
locally (chevrons keep their direction and count, other icons become a dot).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OFFLINE_ENV_VAR = "CTIRF_OFFLINE_ICONS"  # "1": never ask iconify.design (tests, air-gapped)
DEFAULT_COLOR = "#808080"
_CHEVRON = {"up": "6,15 12,9 18,15", "down": "6,9 12,15 18,9",
            "left": "15,6 9,12 15,18", "right": "9,6 15,12 9,18"}
_STEP = {"up": (0, -4), "down": (0, 4), "left": (-4, 0), "right": (4, 0)}
_COUNT = {"double": 2, "triple": 3}

_lock = threading.Lock()
_state: dict[str, Any] = {"offline": False, "folder": None, "original": None}


def is_offline() -> bool:
    """Whether lookups now skip the network (after a failure or by request)."""
    return bool(_state["offline"]) or os.environ.get(OFFLINE_ENV_VAR, "") == "1"


def set_offline(offline: bool = True) -> None:
    """Skip (True) or allow again (False) the network for icons not cached yet."""
    _state["offline"] = bool(offline)


def stand_in_svg(key: tuple[str, ...], color: str | None = None) -> str:
    """SVG text of a local stand-in for the iconify icon `key` (e.g. 'mdi:chevron-up')."""
    name = ":".join(key).split(":")[-1].lower()
    fill = color or DEFAULT_COLOR
    head = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">'
    direction = next((d for d in _CHEVRON if re.search(rf"\b{d}\b", name)), None)
    if direction and ("chevron" in name or "arrow" in name):
        count = next((n for word, n in _COUNT.items() if word in name), 1)
        dx, dy = _STEP[direction]
        lines = "".join(
            f'<polyline points="{_CHEVRON[direction]}" fill="none" stroke="{fill}" '
            f'stroke-width="2.5" stroke-linecap="round" stroke-linejoin="round" '
            f'transform="translate({(i - (count - 1) / 2) * dx} {(i - (count - 1) / 2) * dy})"/>'
            for i in range(count)
        )
        return f"{head}{lines}</svg>"
    return f'{head}<circle cx="12" cy="12" r="6" fill="{fill}"/></svg>'


def _stand_in_path(key: tuple[str, ...], color: str | None) -> Path:
    with _lock:
        if _state["folder"] is None:
            _state["folder"] = Path(tempfile.mkdtemp(prefix="ctirf-icons-"))
        folder: Path = _state["folder"]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join((*key, color or "default")))
    path = folder / f"{safe}.svg"
    if not path.exists():
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(stand_in_svg(key, color))
        tmp.replace(path)
    return path


def icon_path(*key: str, color: str | None = None, **kwargs: Any) -> Path:
    """pyconify's `svg_path` (cached icons, else a download) until the network fails
    once; from then on (or with CTIRF_OFFLINE_ICONS=1) a generated stand-in."""
    original = _state["original"]
    if original is not None and not is_offline():
        try:
            return original(*key, color=color, **kwargs)
        except OSError as exc:  # requests' connection errors are OSErrors
            set_offline(True)
            log.info("icons unavailable (%s); using generated stand-ins from now on", exc)
    return _stand_in_path(tuple(key), color)


def install() -> None:
    """Route superqt's and the stage widget's icon lookups through `icon_path` (once)."""
    import superqt.iconify as iconify

    with _lock:
        if _state["original"] is not None:
            return
        _state["original"] = iconify.svg_path
    iconify.svg_path = icon_path
    try:
        import pymmcore_widgets.control._stage_widget as stage_module
    except ImportError:  # another pymmcore-widgets layout: superqt's fallback applies there
        return
    stage_module.svg_path = icon_path
