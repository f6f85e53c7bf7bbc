"""Which ndv canvas backend draws the images: pygfx where wgpu can, vispy otherwise.

pygfx renders through wgpu: on any GPU (Vulkan, Metal, DX12) and, without one, on Mesa's
software Vulkan driver lavapipe (Debian/Ubuntu: `apt install mesa-vulkan-drivers`), so it
also draws with Qt's `offscreen` platform (tests, screenshots, remote sessions). pygfx
needs the adapter feature `float32-filterable` (its colormaps are float32 textures);
Mesa's OpenGL path through wgpu lacks it. vispy draws through a QOpenGLWidget: fine on a
desktop, but Qt's offscreen platform has no OpenGL context, so there it shows controls and
an empty canvas. A CPU adapter (lavapipe) is used only where vispy cannot draw at all
(offscreen: screenshots); with a display, Mesa's OpenGL serves vispy, and the window on
lavapipe crashed natively during runs here (vispy crashed too, less often: open).
`NDV_CANVAS_BACKEND=pygfx|vispy` overrides the choice.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

CANVAS_ENV_VAR = "NDV_CANVAS_BACKEND"  # ndv's own variable
PYGFX_FEATURE = "float32-filterable"


@functools.cache
def _adapter_info() -> tuple[str, bool] | None:
    """(summary, is a CPU adapter) of the adapter pygfx would use, if it offers what
    pygfx needs (else None)."""
    try:
        import wgpu

        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as exc:  # no wgpu, or no adapter at all
        log.debug("no wgpu adapter: %s", exc)
        return None
    if adapter is None or PYGFX_FEATURE not in adapter.features:
        return None
    kind = str(dict(adapter.info).get("adapter_type", "")).lower()
    return str(adapter.summary), kind == "cpu" or "(cpu)" in str(adapter.summary).lower()


def wgpu_adapter() -> str | None:
    """The wgpu adapter pygfx would use, if it offers what pygfx needs (else None)."""
    info = _adapter_info()
    return info[0] if info else None


def _offscreen() -> bool:
    return os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in ("offscreen", "minimal")


def choose_canvas_backend() -> str:
    """Set (once) and return ndv's canvas backend: the user's choice, else pygfx on a GPU
    adapter (or a CPU one where nothing else can draw), else vispy."""
    chosen = os.environ.get(CANVAS_ENV_VAR, "").lower()
    if not chosen:
        info = _adapter_info()
        chosen = "pygfx" if info and (not info[1] or _offscreen()) else "vispy"
        os.environ[CANVAS_ENV_VAR] = chosen
    log.info("ndv canvas backend: %s (%s)", chosen, wgpu_adapter() or "OpenGL")
    return chosen


def canvas_renders() -> bool:
    """Whether the chosen backend puts pixels on screen here (False: vispy on Qt's
    offscreen platform, which has no OpenGL context)."""
    return choose_canvas_backend() == "pygfx" or not _offscreen()
