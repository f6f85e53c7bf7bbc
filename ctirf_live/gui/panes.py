"""The image panes: ndv viewers with what they show, a scale bar, and linked views.

Each `ImagePane` is an `ndv.ArrayViewer` (histogram, LUTs, contrast, pixel value under the
cursor, a slider per t/p/c/z axis) over a `PlaneBuffer`, with a header naming the event
shown and the age of the frame, and a scale bar from the pixel size below. `ViewLink`
keeps the panes' cameras identical (pan and zoom in one moves the others); `ComparePane`
shows raw and cTIRF in one canvas, overlaid in two colours or blinking between them.

ndv has no public camera API yet, so `ViewLink` and the scale bar read the canvas object
ndv keeps (`ArrayViewer._canvas`, its `canvas_to_world` is ndv's documented canvas API,
and the pygfx or vispy camera behind it); both degrade to doing nothing if that changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import wait
from contextlib import suppress
from typing import Any

import numpy as np
from qtpy.QtCore import QRectF, Qt, QTimer
from qtpy.QtGui import QPainter, QPaintEvent, QPen
from qtpy.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ctirf_live.gui import icons
from ctirf_live.gui.backend import choose_canvas_backend
from ctirf_live.gui.buffers import PlaneBuffer

log = logging.getLogger(__name__)

VIEWER_OPTIONS = {
    "show_3d_button": False,  # the XZ view shows depth; a volume render of 6 planes does not
    "show_roi_button": False,
    "show_play_button": False,
    "show_data_info": False,
}
SCALE_BAR_FRACTION = 0.2  # the bar spans about this share of the canvas width
BLINK_INTERVAL_MS = 600
DISPOSE_TIMEOUT_S = 2.0  # slice requests are in-memory reads: they end in milliseconds
OVERLAY_CHANNELS = ("raw", "cTIRF", "residual")
OVERLAY_CMAPS = ("green", "magenta", "red")


def nice_length(limit: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above `limit` (scale bar lengths)."""
    if not limit > 0 or not math.isfinite(limit):
        return 0.0
    power = 10.0 ** math.floor(math.log10(limit))
    return next(m * power for m in (5, 2, 1) if m * power <= limit * (1 + 1e-9))


def format_length(um: float) -> str:
    """'500 nm', '2 µm', '1 mm'."""
    if um < 1:
        return f"{um * 1000:g} nm"
    if um >= 1000:
        return f"{um / 1000:g} mm"
    return f"{um:g} µm"


def format_age(seconds: float | None) -> str:
    """'0.4 s old', '12 s old', '' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    seconds = max(seconds, 0.0)
    return f"{seconds:.1f} s old" if seconds < 10 else f"{seconds:.0f} s old"


class ScaleBar(QWidget):
    """A bar of a round length in micrometres, drawn at the canvas's current zoom."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.pixel_size_um: float | None = None
        self.screen_px_per_data_px: float | None = None
        self.setFixedHeight(20)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def bar(self) -> tuple[float, float] | None:
        """(length in µm, length in screen pixels), or None when it cannot be drawn."""
        px, scale = self.pixel_size_um, self.screen_px_per_data_px
        if not px or not scale or px <= 0 or scale <= 0:
            return None
        um_per_screen_px = px / scale
        length = nice_length(self.width() * SCALE_BAR_FRACTION * um_per_screen_px)
        return (length, length / um_per_screen_px) if length else None

    def update_scale(self, pixel_size_um: float | None, screen_px_per_data_px: float | None):
        """New pixel size or zoom; repaints only when the bar changes."""
        if (pixel_size_um, screen_px_per_data_px) != (
            self.pixel_size_um,
            self.screen_px_per_data_px,
        ):
            self.pixel_size_um, self.screen_px_per_data_px = pixel_size_um, screen_px_per_data_px
            self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        bar = self.bar()
        painter = QPainter(self)
        if bar is None:
            painter.setPen(self.palette().mid().color())
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignRight, "no pixel size")
            painter.end()
            return
        length_um, length_px = bar
        right = self.width() - 8
        ink = self.palette().windowText().color()
        painter.setPen(QPen(ink, 1))
        painter.fillRect(QRectF(right - length_px, 8, length_px, 5), ink)
        text_rect = QRectF(0, 0, right - length_px - 6, 18)
        painter.drawText(
            text_rect, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
            format_length(length_um),
        )
        painter.end()


def _canvas(viewer: Any) -> Any:
    return getattr(viewer, "_canvas", None)


def _camera(viewer: Any) -> Any:
    return getattr(_canvas(viewer), "_camera", None)


class ImagePane(QWidget):
    """A titled ndv viewer over a `PlaneBuffer`, with what it shows and a scale bar."""

    def __init__(
        self,
        title: str,
        *,
        cmap: str = "gray",
        visible_axes: tuple[str, str] = ("y", "x"),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        import ndv

        icons.install()
        choose_canvas_backend()
        self.visible_axes = visible_axes
        self.viewer = ndv.ArrayViewer(viewer_options=VIEWER_OPTIONS, default_lut={"cmap": cmap})
        make_synchronous(self.viewer)
        self.buffer: PlaneBuffer | None = None
        self.disposed = False
        self.title = QLabel(f"<b>{title}</b>")
        self.info = QLabel("nothing yet")
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.scale_bar = ScaleBar(self)
        header = QHBoxLayout()
        header.addWidget(self.title)
        header.addWidget(self.info, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(header)
        widget = self.viewer.widget()
        widget.setParent(self)
        layout.addWidget(widget, 1)
        layout.addWidget(self.scale_bar)

    # -- data -------------------------------------------------------------------------

    def set_buffer(self, buffer: PlaneBuffer) -> None:
        """Show a new run's buffer (rebuilds the sliders)."""
        if self.disposed:
            return
        model = self.viewer.display_model
        model.current_index.clear()
        model.channel_axis = None
        self.buffer = buffer
        self.viewer.data = buffer
        if self.visible_axes != ("y", "x"):
            model.visible_axes = self.visible_axes  # type: ignore[assignment]
        if "c" in buffer.axes:
            model.channel_axis = "c"

    def refresh(self) -> None:
        """Redraw after planes were added to the buffer."""
        wrapper = None if self.disposed else self.viewer.data_wrapper
        if wrapper is not None:
            wrapper.data_changed.emit()

    def _sliders(self) -> dict[str, int]:
        """Every integer slider position of the viewer, by axis name (y, x included)."""
        if self.buffer is None:
            return {}
        dims = self.buffer.dims
        out: dict[str, int] = {}
        for key, value in dict(self.viewer.display_model.current_index).items():
            name = dims[key] if isinstance(key, int) and -len(dims) <= key < len(dims) else key
            if isinstance(value, int | np.integer):
                out[str(name)] = int(value)
        return out

    def index(self) -> dict[str, int]:
        """The slider positions, by axis name (t, p, g, c, z)."""
        if self.buffer is None:
            return {}
        return {k: v for k, v in self._sliders().items() if k in self.buffer.axes}

    def set_index(self, index: Mapping[str, int]) -> None:
        """Move the sliders of the axes this pane has (others are ignored)."""
        if self.buffer is None:
            return
        wanted = {
            a: min(max(int(index[a]), 0), self.buffer.sizes[a] - 1)
            for a in self.buffer.axes
            if a in index and a not in self.visible_axes
        }
        current = self.index()
        changed = {a: v for a, v in wanted.items() if current.get(a) != v}
        if changed:
            self.viewer.display_model.current_index.update(changed)

    def slider(self, axis: str) -> int | None:
        """The position of one axis's slider, any axis (the row `y` of an XZ view)."""
        return self._sliders().get(axis)

    def shown_plane(self) -> np.ndarray | None:
        """The plane at the sliders (None when it was not received or no data yet)."""
        if self.buffer is None:
            return None
        return self.buffer.plane(self.index())

    # -- view geometry ----------------------------------------------------------------

    def screen_px_per_data_px(self) -> float | None:
        """Current zoom: screen pixels per image pixel (None before the first draw)."""
        canvas = _canvas(self.viewer)
        try:
            x0 = canvas.canvas_to_world((0.0, 0.0))[0]
            x1 = canvas.canvas_to_world((100.0, 0.0))[0]
        except Exception:
            return None
        span = float(x1 - x0)
        return 100.0 / span if span > 0 and math.isfinite(span) else None

    def zoom(self, factor: float) -> None:
        """Zoom about the view centre by `factor` (> 1: closer), as a wheel turn does."""
        canvas = _canvas(self.viewer)
        if canvas is None or self.disposed or factor <= 0:
            return
        with suppress(Exception):  # no canvas geometry yet
            widget = canvas.frontend_widget()
            centre = canvas.canvas_to_world((widget.width() / 2, widget.height() / 2))
            canvas.zoom(1.0 / factor, (float(centre[0]), float(centre[1])))
            canvas.refresh()

    def update_scale_bar(self, pixel_size_um: float | None) -> None:
        if not self.disposed:
            self.scale_bar.update_scale(pixel_size_um, self.screen_px_per_data_px())

    # -- teardown ---------------------------------------------------------------------

    def dispose(self, timeout: float = DISPOSE_TIMEOUT_S) -> None:
        """Stop all drawing while the widgets still exist (idempotent).

        Qt sends a close event only to the window being closed, so rendercanvas never
        learns that a canvas inside it went away and keeps drawing into a deleted widget
        ("QRenderWidget already deleted", then a crash in the next draw). Here: no more
        slice requests (data detached), the ones in flight delivered now, then ndv's
        canvases (image and histograms) closed, which stops their render scheduling.
        """
        if self.disposed:
            return
        self.disposed = True
        viewer = self.viewer
        with suppress(Exception):
            viewer.data = None  # ndv stops requesting slices
        _finish_requests(viewer, timeout)
        with suppress(Exception):
            viewer.close()
        canvases = [_canvas(viewer), *getattr(viewer, "_histograms", {}).values()]
        canvases.append(getattr(viewer, "_shared_histogram", None))
        for canvas in canvases:
            if canvas is not None:
                with suppress(Exception):
                    canvas.close()
        self.buffer = None


def make_synchronous(viewer: Any) -> None:
    """Slice a viewer's data on the calling (GUI) thread instead of ndv's thread pool.

    Our buffers are in memory, so a slice costs microseconds; ndv's pool hands each
    result back through `call_in_main_thread`, which creates a QObject on the pool thread
    and moves it to the GUI thread while holding the GIL. With a disconnect running on
    the GUI thread (it holds Qt's signal lock and waits for the GIL) that deadlocked the
    window (gdb: QObject::moveToThread against QObject::disconnect), and it is where the
    window tests crashed. `_async` is what ndv's NDV_SYNCHRONOUS variable sets.
    """
    if hasattr(viewer, "_async"):
        viewer._async = False
    else:  # a later ndv: its own switch, read when a viewer is made
        log.warning("ndv has no _async switch; set NDV_SYNCHRONOUS=1 for the live window")


def _finish_requests(viewer: Any, timeout: float) -> None:
    """Wait for ndv's slice requests in flight and run their (main-thread) callbacks,
    so none arrives after the canvas is closed."""
    futures = list(getattr(viewer, "_futures", {}))
    with suppress(Exception):
        wait(futures, timeout=timeout)
    QApplication.sendPostedEvents()
    QApplication.processEvents()


def _same_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    for key, value in a.items():
        try:
            if not np.allclose(np.asarray(value, float), np.asarray(b.get(key), float)):
                return False
        except (TypeError, ValueError):
            if value != b.get(key):
                return False
    return True


class ViewLink:
    """Keep the panes' pan and zoom identical: call `sync()` from a GUI timer.

    vispy cameras link natively; pygfx cameras are compared with the last synced state
    and the one that moved is copied to the others (each is then redrawn).
    """

    def __init__(self, panes: Sequence[ImagePane]) -> None:
        self.panes = list(panes)
        self._last: dict[str, Any] | None = None
        self._linked_native = False

    def sync(self) -> bool:
        """Propagate a pan/zoom made in one pane; True when something moved."""
        if any(p.disposed for p in self.panes):
            return False
        cameras = [_camera(p.viewer) for p in self.panes]
        if any(c is None for c in cameras):
            return False
        if hasattr(cameras[0], "link"):  # vispy
            if not self._linked_native:
                for other in cameras[1:]:
                    cameras[0].link(other)
                self._linked_native = True
            return False
        states = [c.get_state() for c in cameras]
        if self._last is None:
            self._last = states[0]
        moved = next((i for i, s in enumerate(states) if not _same_state(s, self._last)), None)
        if moved is None:
            return False
        source = states[moved]
        for i, (pane, camera) in enumerate(zip(self.panes, cameras, strict=True)):
            if i != moved:
                camera.set_state(source)
                with suppress(Exception):
                    _canvas(pane.viewer).refresh()
        self._last = source
        return True


class ComparePane(QWidget):
    """Raw and cTIRF in one canvas: overlaid (green/magenta) or blinking between them.

    With a residual map (x^ - x, where the model does not explain the frame) the overlay
    shows cTIRF in grey with the residual's magnitude in red on top.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.pane = ImagePane("overlay", parent=self)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.pane)
        self.mode = "overlay"
        self.show_residual = False
        self._blink = QTimer(self)
        self._blink.setInterval(BLINK_INTERVAL_MS)
        self._blink.timeout.connect(self._flip)
        self._shape: tuple[int, int] | None = None

    @property
    def buffer(self) -> PlaneBuffer | None:
        return self.pane.buffer

    def set_mode(self, mode: str) -> None:
        """'overlay' (composite) or 'blink' (one image at a time, switching)."""
        import ndv

        if mode not in ("overlay", "blink"):
            raise ValueError(f"compare mode must be overlay or blink, got {mode!r}")
        self.mode = mode
        model = self.pane.viewer.display_model
        if mode == "blink":
            model.channel_mode = ndv.models.ChannelMode.GRAYSCALE
            self._blink.start()
        else:
            self._blink.stop()
            model.channel_mode = ndv.models.ChannelMode.COMPOSITE
        self._apply_visibility()

    def stop(self) -> None:
        self._blink.stop()

    def dispose(self) -> None:
        """Stop blinking and drawing (see `ImagePane.dispose`)."""
        self._blink.stop()
        self.pane.dispose()

    def _flip(self) -> None:
        shown = self.pane.index().get("c", 0)
        self.pane.set_index({"c": 1 - min(shown, 1)})
        self._update_title()

    def _update_title(self) -> None:
        if self.mode == "blink":
            name = OVERLAY_CHANNELS[min(self.pane.index().get("c", 0), 2)]
            self.pane.title.setText(f"<b>blink: {name}</b>")
        else:
            names = "cTIRF + residual" if self.show_residual else "raw (green) + cTIRF (magenta)"
            self.pane.title.setText(f"<b>overlay: {names}</b>")

    def _apply_visibility(self) -> None:
        luts = self.pane.viewer.display_model.luts
        for i, visible in enumerate(
            (not self.show_residual, True, self.show_residual)
            if self.mode == "overlay" else (True, True, False)
        ):
            if i in luts:
                luts[i].visible = visible
        self._update_title()

    def set_residual(self, on: bool) -> None:
        self.show_residual = bool(on)
        if self.buffer is not None:
            luts = self.pane.viewer.display_model.luts
            if 1 in luts:
                luts[1].cmap = "gray" if on else OVERLAY_CMAPS[1]  # type: ignore[assignment]
        self._apply_visibility()

    def show_planes(
        self,
        raw: np.ndarray | None,
        ctirf: np.ndarray | None,
        residual: np.ndarray | None = None,
    ) -> None:
        """Show these planes (any may be None: shown black)."""
        planes = [p for p in (raw, ctirf, residual) if p is not None]
        if not planes or self.pane.disposed:
            return
        shape = tuple(np.shape(planes[0])[-2:])
        if self._shape != shape:
            import ndv

            self._shape = shape  # type: ignore[assignment]
            self.pane.set_buffer(PlaneBuffer({}, shape, np.float32, channels=OVERLAY_CHANNELS))
            model = self.pane.viewer.display_model
            for i, cmap in enumerate(OVERLAY_CMAPS):
                model.luts[i] = ndv.models.LUTModel(cmap=cmap)
            model.channel_mode = ndv.models.ChannelMode.COMPOSITE
            self.set_mode(self.mode)
            self.set_residual(self.show_residual)
        buffer = self.buffer
        assert buffer is not None
        for c, plane in enumerate((raw, ctirf, residual)):
            if plane is None:
                plane = np.zeros(shape, np.float32)
            elif c == 2:
                plane = np.abs(plane)
            if buffer.fits(plane):
                buffer.put({"c": c}, plane)
        self.pane.refresh()
