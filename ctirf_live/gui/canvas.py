"""A lean Qt image canvas: numpy frame -> 8-bit LUT -> QImage, zoom and pan.

ndv (the ecosystem's viewer) is not available here, so this canvas does the little the
live window needs. Frames are only referenced in `set_data`; the 8-bit conversion runs
in the next paint, so when frames arrive faster than Qt paints only the newest is ever
converted and drawn. Zoom and pan live in a `ViewState` that several canvases can share
(linked views). Zoomed in, pixels are drawn nearest-neighbour so they stay square.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QObject, QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QImage, QMouseEvent, QPainter, QPaintEvent, QWheelEvent
from qtpy.QtWidgets import QSizePolicy, QWidget

AUTO_PERCENTILES = (0.1, 99.9)
MAX_STAT_PIXELS = 1 << 18  # percentiles from a strided subsample of at most ~262k pixels
ZOOM_LIMITS = (0.25, 256.0)
WHEEL_STEP = 1.25
BACKGROUND = QColor(24, 24, 24)


class ViewState(QObject):
    """Zoom and centre shared by linked canvases.

    `zoom` is relative to fit-to-window (1.0 shows the whole image); `centre` is the
    image point shown at the widget centre, as fractions of width and height so that
    panes with different image sizes still stay aligned.
    """

    changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.zoom = 1.0
        self.centre = (0.5, 0.5)

    def set(self, zoom: float | None = None, centre: tuple[float, float] | None = None) -> None:
        """Update zoom and/or centre (clamped) and tell every linked canvas."""
        if zoom is not None:
            self.zoom = float(np.clip(zoom, *ZOOM_LIMITS))
        if centre is not None:
            self.centre = (float(np.clip(centre[0], 0, 1)), float(np.clip(centre[1], 0, 1)))
        self.changed.emit()

    def reset(self) -> None:
        """Back to the whole image, centred."""
        self.set(1.0, (0.5, 0.5))


def auto_range(data: np.ndarray, percentiles: tuple[float, float] = AUTO_PERCENTILES) -> tuple[
    float, float
]:
    """Contrast limits from percentiles of a strided subsample (fast on large frames)."""
    step = max(1, int(np.ceil(np.sqrt(data.size / MAX_STAT_PIXELS))))
    sample = data[::step, ::step]
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def to_uint8(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly to 0..255 (clipped); a lookup table for 8/16-bit integers."""
    scale = 255.0 / max(hi - lo, 1e-12)
    if data.dtype in (np.uint8, np.uint16):
        levels = np.arange(np.iinfo(data.dtype).max + 1, dtype=np.float32)
        lut = np.clip((levels - lo) * scale, 0, 255).astype(np.uint8)
        return lut[data]
    out = (np.asarray(data, np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(np.nan_to_num(out, nan=0.0), 0, 255).astype(np.uint8)


class ImageCanvas(QWidget):
    """Shows the newest 2D array with a contrast range; wheel zooms, drag pans.

    Double-click resets the view. `contrastChanged(lo, hi)` reports the limits in use
    whenever they change (auto limits follow the data).
    """

    contrastChanged = Signal(float, float)

    def __init__(self, view: ViewState | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.view = view if view is not None else ViewState(self)
        self.view.changed.connect(self.update)
        self._data: np.ndarray | None = None
        self._pixels: np.ndarray | None = None  # the 8-bit buffer behind _qimage
        self._qimage: QImage | None = None
        self._dirty = False
        self._auto = True
        self._limits = (0.0, 1.0)
        self._drag: QPointF | None = None
        self.frames_received = 0
        self.frames_painted = 0
        self.setMinimumSize(160, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setFocusPolicy(Qt.FocusPolicy.WheelFocus)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)

    # -- data and contrast ------------------------------------------------------------

    def set_data(self, data: np.ndarray) -> None:
        """Show `data` (2D, any numeric dtype) at the next paint; cheap, never converts."""
        arr = np.asarray(data)
        if arr.ndim > 2 and arr.size == arr.shape[-2] * arr.shape[-1]:
            arr = arr.reshape(arr.shape[-2:])
        if arr.ndim != 2:
            raise ValueError(f"ImageCanvas shows 2D frames, got shape {np.shape(data)}")
        self._data = arr
        self._dirty = True
        self.frames_received += 1
        self.update()

    def data(self) -> np.ndarray | None:
        """The frame currently shown (or about to be)."""
        return self._data

    def set_auto_contrast(self, auto: bool = True) -> None:
        """Follow the data's 0.1-99.9 percentiles (True) or keep the manual limits."""
        self._auto = bool(auto)
        self._dirty = True
        self.update()

    def auto_contrast(self) -> bool:
        return self._auto

    def set_contrast(self, lo: float, hi: float) -> None:
        """Manual limits: switches auto contrast off."""
        if hi <= lo:
            hi = lo + 1e-6
        self._auto = False
        self._set_limits((float(lo), float(hi)))
        self._dirty = True
        self.update()

    def contrast(self) -> tuple[float, float]:
        """The limits in use (auto limits are those of the last converted frame)."""
        if self._auto and self._dirty and self._data is not None:
            self._convert()
        return self._limits

    def rendered(self) -> np.ndarray | None:
        """The 8-bit image as drawn (after contrast); converts a pending frame first."""
        if self._dirty and self._data is not None:
            self._convert()
        return self._pixels

    def _set_limits(self, limits: tuple[float, float]) -> None:
        if limits != self._limits:
            self._limits = limits
            self.contrastChanged.emit(*limits)

    def _convert(self) -> None:
        data = self._data
        assert data is not None
        if self._auto:
            self._set_limits(auto_range(data))
        pixels = np.ascontiguousarray(to_uint8(data, *self._limits))
        height, width = pixels.shape
        self._pixels = pixels
        self._qimage = QImage(pixels.data, width, height, width, QImage.Format.Format_Grayscale8)
        self._dirty = False

    # -- geometry ---------------------------------------------------------------------

    def scale(self) -> float:
        """Screen pixels per image pixel at the current zoom."""
        if self._data is None:
            return 1.0
        h, w = self._data.shape
        fit = min(self.width() / w, self.height() / h)
        return fit * self.view.zoom

    def image_to_widget(self, x: float, y: float) -> QPointF:
        """Image pixel coordinates -> widget coordinates."""
        h, w = self._data.shape if self._data is not None else (1, 1)
        s, (cx, cy) = self.scale(), self.view.centre
        return QPointF(self.width() / 2 + (x - cx * w) * s, self.height() / 2 + (y - cy * h) * s)

    def widget_to_image(self, pos: QPointF) -> tuple[float, float]:
        """Widget coordinates -> image pixel coordinates (may lie outside the image)."""
        h, w = self._data.shape if self._data is not None else (1, 1)
        s, (cx, cy) = self.scale(), self.view.centre
        return cx * w + (pos.x() - self.width() / 2) / s, cy * h + (pos.y() - self.height() / 2) / s

    def zoom_at(self, factor: float, pos: QPointF | None = None) -> None:
        """Zoom by `factor`, keeping the image point under `pos` (default: centre) still."""
        if self._data is None:
            self.view.set(zoom=self.view.zoom * factor)
            return
        pos = pos if pos is not None else QPointF(self.width() / 2, self.height() / 2)
        x, y = self.widget_to_image(pos)
        h, w = self._data.shape
        zoom = float(np.clip(self.view.zoom * factor, *ZOOM_LIMITS))
        s = min(self.width() / w, self.height() / h) * zoom
        cx = (x - (pos.x() - self.width() / 2) / s) / w
        cy = (y - (pos.y() - self.height() / 2) / s) / h
        self.view.set(zoom, (cx, cy))

    def _visible_source(self) -> QRectF | None:
        """The part of the image inside the widget, snapped outward to whole pixels."""
        assert self._data is not None
        h, w = self._data.shape
        x0, y0 = self.widget_to_image(QPointF(0, 0))
        x1, y1 = self.widget_to_image(QPointF(self.width(), self.height()))
        x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        x1, y1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if x1 <= x0 or y1 <= y0:
            return None
        return QRectF(x0, y0, x1 - x0, y1 - y0)

    # -- Qt events --------------------------------------------------------------------

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), BACKGROUND)
        if self._data is not None:
            if self._dirty:
                self._convert()
            source = self._visible_source()
            if source is not None:
                target = QRectF(
                    self.image_to_widget(source.left(), source.top()),
                    self.image_to_widget(source.right(), source.bottom()),
                )
                smooth = self.scale() < 1  # nearest-neighbour when zoomed in
                painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, smooth)
                painter.drawImage(target, self._qimage, source)
            self.frames_painted += 1
        painter.end()

    def wheelEvent(self, event: QWheelEvent) -> None:
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom_at(WHEEL_STEP**steps, event.position())
        event.accept()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            self._drag = event.position()
            self.setCursor(Qt.CursorShape.ClosedHandCursor)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._drag is None or self._data is None:
            return
        delta = event.position() - self._drag
        self._drag = event.position()
        h, w = self._data.shape
        s, (cx, cy) = self.scale(), self.view.centre
        self.view.set(centre=(cx - delta.x() / s / w, cy - delta.y() / s / h))

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        self._drag = None
        self.unsetCursor()

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        self.view.reset()
