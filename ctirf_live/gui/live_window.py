"""The live window: raw EPI and cTIRF side by side while the microscope images.

Built from the ecosystem's parts: pymmcore-widgets for the microscope (Snap/Live,
exposure, illumination and objective presets, stage and focus, the property browser and
the MDA editor with its save box) and ndv for the images (histogram, LUTs, contrast,
pixel values, t/p/c/z sliders). The window itself is thin over the Python API: a
`LiveProcessor` restores frames on its own worker thread, `Restorer.restore` restores a
snap on a short-lived thread; the Qt main thread never runs the model.

Threads only hand frames over (`Inbox`); a 30 Hz timer on the GUI thread files them into
the panes' buffers and a 4 Hz timer updates labels, statistics and the run state. While
following the acquisition each pane shows its newest plane (the cTIRF pane lags the raw
one by the processing time, and says how old its frame is); move a slider and both panes
show the same position. Closing cancels a running MDA or live stream and waits for it and
for the processor within one deadline (`CLOSE_TIMEOUT_S`), naming what still runs.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pymmcore_plus import CMMCorePlus
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtGui import QCloseEvent
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ctirf_live.acquisition.core import RigInfo, active_optics
from ctirf_live.acquisition.mda import run_mda
from ctirf_live.config import EPI_PRESET, ILLUMINATION_GROUP
from ctirf_live.gui import collector
from ctirf_live.gui.buffers import (
    Inbox,
    PlaneBuffer,
    Received,
    channel_name,
    describe_index,
    event_index,
)
from ctirf_live.gui.controls import (
    CtirfMDAWidget,
    DevicePanel,
    disconnect_widgets,
    run_folder_and_format,
)
from ctirf_live.gui.model_list import model_entries, search_folders
from ctirf_live.gui.panes import ComparePane, ImagePane, ViewLink, format_age
from ctirf_live.gui.stats import RunStats, stats_text, trust
from ctirf_live.inference.restorer import Restorer, pixel_size_warning

log = logging.getLogger(__name__)

RENDER_INTERVAL_MS = 33  # ~30 Hz: files new frames into the panes, syncs linked views
STATUS_INTERVAL_MS = 250  # labels, statistics and run state at 4 Hz
CLOSE_TIMEOUT_S = 60.0
BROWSE = "Browse..."
POLICIES = ("preview", "record")
COMPARE_MODES = ("side by side", "overlay", "blink")
WARNING_STYLE = "background: #7a5a00; color: white; padding: 4px; border-radius: 3px;"
DOCK_WIDTHS = (250, 420)  # px: microscope controls, MDA editor / properties
TIMES_KEPT = 4096  # acquisition times remembered for the age of cTIRF frames

ProcessorFactory = Callable[[str, str], Any]


def _key(index: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(index.items()))


class LiveWindow(QMainWindow):
    """Microscope controls, raw | cTIRF panes, statistics and a trust indicator.

    `processor` is a `LiveProcessor` (or anything with its signals, `stats`, `restorer`,
    `attach_live`/`detach_live` and `stop`); `make_processor(model, policy)` builds a new
    one when another model is chosen (default: same device and tiles). `output_dir`
    presets the MDA save box; `sequence_path` loads a useq sequence into the MDA editor;
    `model_dirs` are searched for local models besides `runs/` and the current model's.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        processor: Any,
        rig: RigInfo | None = None,
        sequence_path: str | Path | None = None,
        *,
        make_processor: ProcessorFactory | None = None,
        output_dir: str | Path | None = None,
        model_dirs: Sequence[Path] = (),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        collector.acquire()  # garbage collected on this thread only (see gui/collector.py)
        self.core = core
        self.rig = rig
        self.processor: Any = None
        self.model_dirs = [Path(d) for d in model_dirs]
        self._make_processor = make_processor
        self._inbox = Inbox()
        self._snapped: deque[tuple[np.ndarray, str | None, float]] = deque(maxlen=4)
        self._errors: deque[str] = deque(maxlen=20)
        self._stats: Any = None
        self._run = RunStats()
        self._mode = "idle"
        self._worker: threading.Thread | None = None
        self._closed = False
        self._cancelled = False
        self._pixel_check_due = True
        self._pixel_um: float | None = None
        self._live_number: Any = None
        self._times: dict[tuple, float] = {}
        self._raw_shown: tuple[dict[str, int], float] | None = None
        self._result_shown: tuple[dict[str, int], float | None] | None = None
        self._result_raw: np.ndarray | None = None
        self._residual: np.ndarray | None = None
        self._programmatic = False
        self._in_mda = False  # from the MDA's own events, in order with its imageSnapped
        self._sequence: Any = None
        self._writer_set = False
        self.run_dir: Path | None = None
        self.warning_text = ""
        self.compare_pane: ComparePane | None = None
        self.xz_panes: list[ImagePane] = []

        title = f"ctirf live · {rig.config_path.name}" if rig else "ctirf live"
        self.setWindowTitle(title)
        self._build_ui()
        self._set_processor(processor)
        if sequence_path:  # first: loading a sequence also sets the save box from it
            self.load_sequence(sequence_path)
        if output_dir:
            self.mda_widget.save_info.setValue(
                {"save_dir": str(output_dir), "save_name": "run.ome.tiff",
                 "format": "ome-tiff", "should_save": True}
            )
        core.mda.events.frameReady.connect(self._on_mda_frame)
        core.mda.events.sequenceStarted.connect(self._on_sequence_started)
        core.mda.events.sequenceFinished.connect(self._on_sequence_finished)
        core.events.imageSnapped.connect(self._on_image_snapped)
        core.events.pixelSizeChanged.connect(self._on_pixel_size_changed)

        self._render_timer = QTimer(self)
        self._render_timer.timeout.connect(self._render)
        self._render_timer.start(RENDER_INTERVAL_MS)
        self._status_timer = QTimer(self)
        self._status_timer.timeout.connect(self._refresh_status)
        self._status_timer.start(STATUS_INTERVAL_MS)
        self._refresh_status()

    # -- layout -----------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.raw_pane = ImagePane(f"Raw ({EPI_PRESET})")
        self.ctirf_pane = ImagePane("cTIRF", cmap="magma")
        self.view_link = ViewLink([self.raw_pane, self.ctirf_pane])
        self._index_slots: list[tuple[Any, Callable[..., None]]] = []
        for pane in (self.raw_pane, self.ctirf_pane):
            signal = pane.viewer.display_model.current_index.value_changed
            slot = functools.partial(self._on_index_changed_signal, pane)
            signal.connect(slot)
            self._index_slots.append((signal, slot))

        self.model_combo = QComboBox()
        self.model_combo.setMinimumContentsLength(24)
        self.model_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.model_combo.setToolTip("checkpoint that restores the frames (Browse... for a file)")
        self.policy_combo = QComboBox()
        self.policy_combo.addItems(POLICIES)
        self.policy_combo.setToolTip(
            "preview: newest frame wins, skips frames the model cannot keep up with; "
            "record: every frame is processed (backlog waits on disk)"
        )
        self.compare_combo = QComboBox()
        self.compare_combo.addItems(COMPARE_MODES)
        self.compare_combo.setToolTip("raw and cTIRF side by side, overlaid, or blinking")
        self.follow_box = QCheckBox("follow")
        self.follow_box.setChecked(True)
        self.follow_box.setToolTip(
            "each pane shows its newest plane; off (or move a slider): both panes show "
            "the same t/p/c/z"
        )
        self.residual_box = QCheckBox("residual")
        self.residual_box.setToolTip("overlay where the model does not explain the frame")
        self.residual_box.setEnabled(False)
        self.trust_label = QLabel()

        bar = QHBoxLayout()
        for label, widget in (("model", self.model_combo), ("policy", self.policy_combo),
                              ("view", self.compare_combo)):
            bar.addWidget(QLabel(label))
            bar.addWidget(widget, 1 if widget is self.model_combo else 0)
        bar.addWidget(self.follow_box)
        bar.addWidget(self.residual_box)
        bar.addStretch(0)
        bar.addWidget(self.trust_label)

        self.warning_label = QLabel()
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet(WARNING_STYLE)
        self.warning_label.hide()

        self.side_by_side = QSplitter(Qt.Orientation.Horizontal)
        self.side_by_side.addWidget(self.raw_pane)
        self.side_by_side.addWidget(self.ctirf_pane)
        self.side_by_side.setChildrenCollapsible(False)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.side_by_side)
        self.xz_row = QSplitter(Qt.Orientation.Horizontal)
        self.xz_row.hide()
        images = QSplitter(Qt.Orientation.Vertical)
        images.addWidget(self.pages)
        images.addWidget(self.xz_row)
        images.setStretchFactor(0, 3)
        images.setStretchFactor(1, 1)

        self.stats_label = QLabel()
        self.stats_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        central = QWidget()
        layout = QVBoxLayout(central)
        layout.addLayout(bar)
        layout.addWidget(self.warning_label)
        layout.addWidget(images, 1)
        layout.addWidget(self.stats_label)
        self.setCentralWidget(central)

        self.devices = DevicePanel(self.core)
        self.snap_button, self.live_button = self.devices.snap_button, self.devices.live_button
        left = self._add_dock("Microscope", self.devices, Qt.DockWidgetArea.LeftDockWidgetArea)
        from pymmcore_widgets import PropertyBrowser

        self.mda_widget = CtirfMDAWidget(self.core, self._run_from_editor)
        self.property_browser = PropertyBrowser(mmcore=self.core)
        tabs = QTabWidget()
        tabs.addTab(self.mda_widget, "MDA")
        tabs.addTab(self.property_browser, "Properties")
        self.side_tabs = tabs
        right = self._add_dock("Acquisition", tabs, Qt.DockWidgetArea.RightDockWidgetArea)
        # the images get the width: controls at about their natural size
        self.resizeDocks([left, right], list(DOCK_WIDTHS), Qt.Orientation.Horizontal)

        self.statusBar().showMessage("ready")
        self.resize(1600, 900)

        self.model_combo.activated.connect(self._on_model_chosen)
        self.policy_combo.activated.connect(self._on_policy_chosen)
        self.compare_combo.currentIndexChanged.connect(self._on_compare_chosen)
        self.follow_box.toggled.connect(self._on_follow_toggled)
        self.residual_box.toggled.connect(self._on_residual_toggled)

    def _add_dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title)
        dock.setWidget(widget)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        self.addDockWidget(area, dock)
        return dock

    def _fill_models(self) -> None:
        meta_path = self.processor.restorer.metadata.get("path")
        current = str(meta_path or "")
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        paths: list[str] = []
        for entry in model_entries(search_folders(current or None, self.model_dirs)):
            self.model_combo.addItem(entry.label, str(entry.path))
            paths.append(str(entry.path))
        if current and current not in paths:
            self.model_combo.addItem(Path(current).stem, current)
        elif not current:
            self.model_combo.addItem(f"{self.processor.restorer.model.name} (in memory)", "")
        self.model_combo.addItem(BROWSE, BROWSE)
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(current)))
        self.model_combo.blockSignals(False)

    # -- processor wiring -------------------------------------------------------------

    def _set_processor(self, processor: Any) -> None:
        if self.processor is not None:
            self._disconnect_processor()
        self.processor = processor
        processor.resultReady.connect(self._on_result)
        processor.statsChanged.connect(self._on_stats)
        processor.errorOccurred.connect(self._on_error)
        self._stats = None
        self._run.reset(getattr(processor, "stats", None))
        self._writer_set = False
        self._fill_models()
        self.policy_combo.setCurrentText(str(getattr(processor, "policy", "preview")))
        self._pixel_check_due = True

    def _disconnect_processor(self) -> None:
        for signal, slot in (
            (self.processor.resultReady, self._on_result),
            (self.processor.statsChanged, self._on_stats),
            (self.processor.errorOccurred, self._on_error),
        ):
            try:
                signal.disconnect(slot)
            except (TypeError, ValueError, RuntimeError):
                pass

    def set_processor(self, processor: Any) -> None:
        """Restore with `processor` from now on (what choosing a model does); the current
        one is stopped first. Only between runs."""
        if self._mode != "idle":
            raise ValueError("stop the running acquisition before changing the model")
        self._stop_processor(wait=True, timeout=CLOSE_TIMEOUT_S)
        self._set_processor(processor)

    def _replace_processor(self, model: str, policy: str) -> bool:
        try:
            QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
            make = self._make_processor or self._processor_like_current
            new = make(model, policy)
        except Exception as exc:  # a bad checkpoint must not take the window down
            self._report_error(f"could not load model {model}: {exc}")
            return False
        finally:
            QApplication.restoreOverrideCursor()
        self.set_processor(new)
        self.statusBar().showMessage(f"model {Path(model).name}, policy {policy}", 5000)
        return True

    def _processor_like_current(self, model: str, policy: str) -> Any:
        """A LiveProcessor with another model or policy, on the current device and tiles."""
        from ctirf_live.inference.live import LiveProcessor

        old: Restorer = self.processor.restorer
        restorer = Restorer(
            model,
            device=old.device,
            tile=old.tile,
            overlap=old.overlap,
            backend=getattr(old, "backend", "auto"),
        )
        channels = tuple(getattr(self.processor, "channels", (EPI_PRESET,)))
        threads = getattr(self.processor, "threads", None)
        return LiveProcessor(restorer, policy=policy, channels=channels, threads=threads)

    def _on_model_chosen(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data == BROWSE:
            data, _ = QFileDialog.getOpenFileName(
                self, "Choose a cTIRF checkpoint", "", "Checkpoints (*.safetensors)"
            )
        if not data or not self._replace_processor(data, self.policy_combo.currentText()):
            self._fill_models()

    def _on_policy_chosen(self, index: int) -> None:
        self.processor.policy = POLICIES[index]
        self.statusBar().showMessage(f"policy {POLICIES[index]}", 5000)

    # -- slots called from other threads: store and return ----------------------------

    def _on_result(self, raw: Any, result: Any, event: Any = None) -> None:
        self._inbox.put_result(raw, result, event)

    def _on_stats(self, stats: Any) -> None:
        self._stats = stats

    def _on_error(self, message: str) -> None:
        self._errors.append(str(message))

    def _on_mda_frame(self, frame: np.ndarray, event: Any = None, meta: Any = None) -> None:
        self._inbox.put_raw(frame, event)

    def _on_sequence_started(self, *args: Any) -> None:
        self._in_mda = True

    def _on_sequence_finished(self, *args: Any) -> None:
        self._in_mda = False

    def _on_image_snapped(self, *args: Any) -> None:
        # the MDA's frames also emit imageSnapped (queued to this thread after the run
        # may have ended): the MDA's own start/finish events, delivered in order, tell
        if self._in_mda or self.core.mda.is_running():
            return
        try:
            image = self.core.getImage()
            preset = self.core.getCurrentConfigFromCache(ILLUMINATION_GROUP) or None
        except Exception as exc:
            self._errors.append(f"snap failed: {exc}")
            return
        self._snapped.append((image, preset, time.monotonic()))

    def _on_pixel_size_changed(self, *args: Any) -> None:
        self._pixel_check_due = True

    # -- displaying (GUI thread, 30 Hz) -----------------------------------------------

    def _render(self) -> None:
        if self._closed:  # a timer event queued before shutdown
            return
        self._start_snap_restores()
        raw_items, results = self._inbox.take()
        if self._mode == "live":
            image = self._newest_live_image()
            if image is not None:
                raw_items.append(Received(image))
        with self._quiet():
            for item in raw_items:
                self._file_raw(item)
            for item in results:
                self._file_result(item)
            if raw_items or results:
                if self.follow_box.isChecked():
                    self._follow()
                for pane in (self.raw_pane, self.ctirf_pane, *self.xz_panes):
                    pane.refresh()
                self._update_compare()
        self.view_link.sync()

    def _quiet(self) -> Any:
        window = self

        class _Quiet:
            def __enter__(self) -> None:
                self.before = window._programmatic
                window._programmatic = True

            def __exit__(self, *exc: object) -> None:
                window._programmatic = self.before

        return _Quiet()

    def _ensure_buffer(self, pane: ImagePane, data: np.ndarray, dtype: Any) -> PlaneBuffer:
        """The pane's buffer, or a fresh one for snaps/live when the frame size changed."""
        shape = np.shape(data)
        buffer = pane.buffer
        planes = shape[0] if len(shape) == 3 else 1
        if buffer is None or not buffer.fits(data) or (planes > 1 and buffer.sizes["z"] != planes):
            sizes = {"z": planes} if planes > 1 else {}
            buffer = PlaneBuffer(sizes, shape[-2:], dtype)
            self._set_buffers(pane, buffer)
        return buffer

    def _file_raw(self, item: Received) -> None:
        index, channel = event_index(item.event), channel_name(item.event)
        buffer = self._ensure_buffer(self.raw_pane, item.data, self._raw_dtype())
        if item.event is not None:
            self._times[_key(index)] = item.t
            while len(self._times) > TIMES_KEPT:
                self._times.pop(next(iter(self._times)))
        if "c" in index and channel in buffer.channels:
            index["c"] = buffer.channels.index(channel)
        buffer.put(index, item.data)
        self._raw_shown = (index, item.t)

    def _file_result(self, item: Received) -> None:
        index, channel = event_index(item.event), channel_name(item.event)
        source = self._times.get(_key(index)) if item.event is not None else None
        if source is None:  # live or snap: the frame was taken about one latency earlier
            latency = float(getattr(self._stats, "latency_p50_ms", 0.0) or 0.0) / 1000.0
            source = item.t - latency
        buffer = self._ensure_buffer(self.ctirf_pane, item.data, np.float32)
        if "c" in index:
            if channel not in buffer.channels and buffer.channels:
                return
            index["c"] = buffer.channels.index(channel) if buffer.channels else 0
        buffer.put_stack(index, item.data)
        self._result_shown = (index, source)
        self._result_raw = item.raw
        residual = self._processor_residual()
        if residual is not None:
            self._residual = residual

    def _processor_residual(self) -> np.ndarray | None:
        """The processor's newest residual map, if it reports one."""
        source = getattr(self.processor, "latest_residual", None)
        try:
            value = source() if callable(source) else source
        except Exception:
            return None
        return None if value is None else np.asarray(value)

    def _follow(self) -> None:
        if self._raw_shown is not None:
            self.raw_pane.set_index(self._raw_shown[0])
        if self._result_shown is not None:
            index = dict(self._result_shown[0])
            if self.ctirf_pane.buffer is not None and self.ctirf_pane.buffer.sizes["z"] > 1:
                raw_z = self.raw_pane.index().get("z")
                if raw_z is not None and "z" not in index:
                    index["z"] = raw_z
            self.ctirf_pane.set_index(index)
        self._sync_xz()

    def _on_index_changed_signal(self, pane: ImagePane, *args: Any) -> None:
        self._on_index_changed(pane)

    def _on_index_changed(self, pane: ImagePane) -> None:
        """A slider moved: if the user did it, both panes now show the same position."""
        if self._programmatic:
            return
        with self._quiet():
            self.follow_box.blockSignals(True)  # unchecking must not copy the other way
            self.follow_box.setChecked(False)
            self.follow_box.blockSignals(False)
            other = self.ctirf_pane if pane is self.raw_pane else self.raw_pane
            other.set_index(self._mapped_index(pane, other))
            self._sync_xz()
            self._update_compare()

    def _mapped_index(self, src: ImagePane, dst: ImagePane) -> dict[str, int]:
        """`src`'s slider positions for `dst` (channels matched by name)."""
        index = src.index()
        if "c" in index and src.buffer is not None and dst.buffer is not None:
            names = src.buffer.channels
            name = names[index["c"]] if index["c"] < len(names) else None
            if name in dst.buffer.channels:
                index["c"] = dst.buffer.channels.index(name)
            else:
                index.pop("c")
        return index

    def _on_follow_toggled(self, on: bool) -> None:
        with self._quiet():
            if on:
                self._follow()
            else:
                self.ctirf_pane.set_index(self._mapped_index(self.raw_pane, self.ctirf_pane))
                self._sync_xz()

    def _sync_xz(self) -> None:
        for xz, main in zip(self.xz_panes, (self.raw_pane, self.ctirf_pane), strict=False):
            index = main.index()
            index.pop("z", None)
            xz.set_index(index)

    def _set_buffers(self, pane: ImagePane, buffer: PlaneBuffer) -> None:
        with self._quiet():
            pane.set_buffer(buffer)
            main = (self.raw_pane, self.ctirf_pane)
            if pane in main and len(self.xz_panes) == 2:
                xz = self.xz_panes[main.index(pane)]
                if buffer.sizes["z"] > 1:
                    xz.set_buffer(buffer)
                    self._centre_xz(xz)

    def _update_compare(self) -> None:
        if self.compare_pane is None or self.pages.currentIndex() != 1:
            return
        ctirf = self.ctirf_pane.shown_plane()
        raw = self._result_raw if self.follow_box.isChecked() else None
        if raw is not None and raw.ndim == 3 and self.ctirf_pane.buffer is not None:
            raw = raw[min(self.ctirf_pane.index().get("z", 0), raw.shape[0] - 1)]
        if raw is None or (ctirf is not None and raw.shape != ctirf.shape):
            raw = self.raw_pane.shown_plane()
        residual = self._residual if self.residual_box.isChecked() else None
        if residual is not None and ctirf is not None and residual.shape[-2:] != ctirf.shape:
            residual = None
        self.compare_pane.show_planes(raw, ctirf, residual)

    def _on_compare_chosen(self, index: int) -> None:
        mode = COMPARE_MODES[index]
        if mode == "side by side":
            self.pages.setCurrentIndex(0)
            if self.compare_pane is not None:
                self.compare_pane.stop()
            return
        if self.compare_pane is None:
            self.compare_pane = ComparePane()
            self.pages.addWidget(self.compare_pane)
        self.compare_pane.set_mode(mode)
        self.pages.setCurrentIndex(1)
        self._update_compare()

    def _on_residual_toggled(self, on: bool) -> None:
        if on and self.compare_combo.currentIndex() == 0:
            self.compare_combo.setCurrentIndex(COMPARE_MODES.index("overlay"))
        if self.compare_pane is not None:
            self.compare_pane.set_residual(on)
            self._update_compare()

    def _ensure_xz(self, z_step_um: float | None) -> None:
        """XZ views of raw and cTIRF (a y slider picks the row) for z-stack runs."""
        if not self.xz_panes:
            self.xz_panes = [
                ImagePane("raw XZ", visible_axes=("z", "x")),
                ImagePane("cTIRF XZ", cmap="magma", visible_axes=("z", "x")),
            ]
            for pane in self.xz_panes:
                self.xz_row.addWidget(pane)
        pixel = self._pixel_um or self.core.getPixelSizeUm() or 0.0
        aspect = (z_step_um / pixel) if z_step_um and pixel else 1.0
        for pane in self.xz_panes:
            pane.viewer.display_model.scales["z"] = float(aspect)
        self.xz_row.show()

    def _centre_xz(self, pane: ImagePane) -> None:
        if pane.buffer is not None:
            pane.viewer.display_model.current_index.update({"y": pane.buffer.frame_shape[0] // 2})

    def _newest_live_image(self) -> np.ndarray | None:
        """The camera's newest live-mode image if it is one not shown yet."""
        try:
            image, meta = self.core.getLastImageAndMD()
        except (IndexError, RuntimeError):  # nothing in the buffer yet
            return None
        number = dict(meta).get("ImageNumber")
        if number is not None and number == self._live_number:
            return None
        self._live_number = number
        return image

    def _raw_dtype(self) -> Any:
        try:
            return np.uint16 if self.core.getBytesPerPixel() <= 2 else np.float32
        except Exception:
            return np.float32

    # -- run state, labels, statistics (GUI thread, 4 Hz) -----------------------------

    def _refresh_status(self) -> None:
        if self._closed:
            return
        streaming = self.core.isSequenceRunning() and not self.core.mda.is_running()
        if self._mode == "idle" and streaming:
            self._begin_live()
        elif self._mode == "live" and not self.core.isSequenceRunning():
            self._end_live()
            self._finish_run("live stopped")
        if self._mode == "mda" and not self.core.mda.is_running() and not self._worker_alive():
            queued = int(getattr(self.processor, "pending", 0))
            verb = "cancelled" if self._cancelled else "finished"
            if queued:
                self.statusBar().showMessage(f"MDA {verb}; processing {queued} queued item(s)...")
            else:
                self._finish_run(f"MDA {verb}{self._saved_text()}")
        elif self._mode == "snap" and not self._worker_alive():
            self._finish_run("")
        while self._errors:
            self._report_error(self._errors.popleft())
        if self._pixel_check_due:
            self._pixel_check_due = False
            self.check_pixel_size()
        stats = getattr(self.processor, "stats", None)  # a cheap snapshot, always current
        stats = stats if stats is not None else self._stats
        self.stats_label.setText(stats_text(self._mode, stats, self._run))
        verdict = trust(stats, self._run)
        self.trust_label.setText(verdict.text)
        self.trust_label.setToolTip(verdict.tooltip)
        self.trust_label.setStyleSheet(verdict.style)
        self.residual_box.setEnabled(self._residual is not None)
        self._update_labels()
        self._update_buttons()

    def _update_labels(self) -> None:
        now = time.monotonic()
        following = self.follow_box.isChecked()
        raw_index = self.raw_pane.index()
        if self._raw_shown is None:
            self.raw_pane.info.setText("nothing yet")
        else:
            where = describe_index(raw_index, self._channel_of(self.raw_pane)) or self._mode
            self.raw_pane.info.setText(where)
        if self._result_shown is None:
            waiting = "waiting for the model" if self._mode != "idle" else "nothing yet"
            self.ctirf_pane.info.setText(waiting)
        else:
            index = self.ctirf_pane.index()
            source = self._result_shown[1] if following else self._times.get(
                _key(self._mapped_index(self.ctirf_pane, self.raw_pane))
            )
            where = describe_index(index, self._channel_of(self.ctirf_pane)) or "last frame"
            missing = "" if self.ctirf_pane.shown_plane() is not None else " · not processed"
            age = format_age(now - source) if source is not None else ""
            self.ctirf_pane.info.setText(" · ".join(p for p in (where + missing, age) if p))
        for xz, main in zip(self.xz_panes, (self.raw_pane, self.ctirf_pane), strict=False):
            row = xz.slider("y")  # which row the XZ view cuts, of which stack
            if xz.buffer is None or row is None or main.shown_plane() is None:
                xz.info.setText("nothing yet")
                continue
            stack = describe_index({k: v for k, v in xz.index().items() if k != "z"})
            xz.info.setText(" ".join(p for p in (f"y={row}", stack) if p))
        for pane in (self.raw_pane, self.ctirf_pane, *self.xz_panes):
            pane.update_scale_bar(self._pixel_um)
        if self.compare_pane is not None:
            self.compare_pane.pane.update_scale_bar(self._pixel_um)

    @staticmethod
    def _channel_of(pane: ImagePane) -> str | None:
        buffer = pane.buffer
        if buffer is None or not buffer.channels:
            return None
        c = pane.index().get("c", 0)
        return buffer.channels[c] if c < len(buffer.channels) else None

    def _saved_text(self) -> str:
        """'; saved in DIR: N raw frames, cTIRF k of n planes' for a run that saves."""
        if self.run_dir is None:
            return ""
        from ctirf_live.inference.rawstore import count_raw_frames
        from ctirf_live.inference.writers import raw_output_path

        fmt = "ome-zarr" if any(self.run_dir.glob("*.zarr")) else "ome-tiff"
        raw = count_raw_frames(raw_output_path(self.run_dir, fmt))
        writer = getattr(self.processor, "result_writer", None)
        planes = getattr(writer, "planes_total", 0)
        ctirf = f", cTIRF {writer.frames_written} of {planes} planes" if planes else ""
        return f"; saved in {self.run_dir}: {raw} raw frames{ctirf}"

    def _update_buttons(self) -> None:
        idle = self._mode == "idle"
        for widget in (self.snap_button, self.model_combo, self.policy_combo):
            widget.setEnabled(idle)
        self.live_button.setEnabled(self._mode in ("idle", "live"))
        self.mda_widget.control_btns.run_btn.setEnabled(idle)

    def _report_error(self, message: str) -> None:
        log.error("%s", message)
        self.statusBar().showMessage(f"error: {message}", 15000)

    def check_pixel_size(self) -> str:
        """Warn (visibly and in the log) when the model's pixel size is not the rig's."""
        try:
            optics = active_optics(self.core, self.rig) if self.rig else None
            pixel = optics.pixel_size_um if optics else self.core.getPixelSizeUm()
        except ValueError as exc:
            pixel, self.warning_text = None, str(exc)
        else:
            self.warning_text = pixel_size_warning(self.processor.restorer.optics, pixel) or ""
        self._pixel_um = float(pixel) if pixel else None
        if self.warning_text:
            log.warning("%s", self.warning_text)
            self.warning_label.setText(f"⚠ {self.warning_text}")
        self.warning_label.setVisible(bool(self.warning_text))
        return self.warning_text

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _start_run(self, mode: str, sequence: Any = None) -> None:
        """A new run: counters from zero, fresh buffers shaped like the run."""
        self._mode, self._cancelled = mode, False
        self._run.reset(getattr(self.processor, "stats", None))
        self._stats = None
        self._inbox.clear()
        self._times.clear()
        self._raw_shown = self._result_shown = None
        self._residual = None
        self._sequence = sequence
        if sequence is None:
            return
        sizes = {str(k): int(v) for k, v in dict(sequence.sizes).items()}
        shape = (self.core.getImageHeight(), self.core.getImageWidth())
        raw_channels = [c.config for c in sequence.channels]
        done = set(getattr(self.processor, "channels", (EPI_PRESET,)))
        ctirf_channels = [c for c in raw_channels if c in done]
        if sizes.get("z", 1) > 1:
            step = getattr(sequence.z_plan, "step", None)
            self._ensure_xz(float(step) if step else None)
        else:
            self.xz_row.hide()
        self._set_buffers(
            self.raw_pane, PlaneBuffer(sizes, shape, self._raw_dtype(), channels=raw_channels)
        )
        ctirf_sizes = {**sizes, "c": max(len(ctirf_channels), 1)}
        self._set_buffers(
            self.ctirf_pane, PlaneBuffer(ctirf_sizes, shape, np.float32, channels=ctirf_channels)
        )
        self.follow_box.setChecked(True)
        self._update_buttons()

    def _finish_run(self, message: str) -> None:
        self._mode = "idle"
        self._worker = None
        if message:
            self.statusBar().showMessage(message, 10000)

    # -- actions ----------------------------------------------------------------------

    def snap(self) -> None:
        """Snap one frame (as the Snap button does); it is restored off the GUI thread."""
        if self._mode == "idle":
            self.snap_button.click()

    def _start_snap_restores(self) -> None:
        while self._snapped:
            frame, preset, t = self._snapped.popleft()
            channels = getattr(self.processor, "channels", (EPI_PRESET,))
            restorer = self.processor.restorer
            if preset is not None and preset not in channels:
                self.statusBar().showMessage(
                    f"{preset} frame shown raw: cTIRF restores {', '.join(channels)} frames", 8000
                )
            elif restorer.dims != 2:
                self.statusBar().showMessage(
                    "a 3D model restores z-stacks: run an MDA with a z plan", 8000
                )
            elif self._mode == "idle":
                self._start_run("snap")
                self._worker = threading.Thread(
                    target=self._restore_snap, args=(restorer, frame, t), name="ctirf-snap",
                    daemon=True,
                )
                self._worker.start()
            self._inbox.put_raw(frame)  # after _start_run, which empties the inbox

    def _restore_snap(self, restorer: Any, frame: np.ndarray, t: float) -> None:
        """Worker thread: cTIRF and the reconstructed EPI from one forward pass."""
        try:
            try:
                both = restorer.restore(frame, output="ctirf+recon")
                ctirf, recon = both[0], both[1]
                self._residual = np.asarray(recon, np.float32) - np.asarray(frame, np.float32)
            except TypeError:  # a restorer without outputs to choose from
                ctirf = restorer.restore(frame)
            self._inbox.put_result(frame, ctirf)
        except Exception as exc:  # reported in the status bar, the window goes on
            self._errors.append(f"snap failed: {exc}")

    def start_live(self) -> None:
        """Stream the camera continuously (as the Live button does)."""
        if self._mode != "idle":
            return
        try:
            self.core.startContinuousSequenceAcquisition(0)
        except Exception as exc:
            self._report_error(f"live failed: {exc}")
            return
        self._begin_live()

    def _begin_live(self) -> None:
        self._start_run("live")
        try:
            self.processor.attach_live(self.core)
        except Exception as exc:
            self._report_error(f"live cTIRF failed: {exc}")
        self.statusBar().showMessage("live")
        self._update_buttons()

    def _end_live(self) -> None:
        try:
            self.processor.detach_live(self.core)
        except Exception as exc:
            log.debug("detach_live: %s", exc)

    def load_sequence(self, path: str | Path) -> None:
        """Put a useq sequence file into the MDA editor."""
        from ctirf_live.inference.acquire import load_sequence

        self.mda_widget.setValue(load_sequence(path))

    def _run_from_editor(self, sequence: Any, save_path: Path | None) -> None:
        if self.mda_widget.save_info.isChecked():
            fmt = self.mda_widget.save_info.value()["format"]
            if fmt not in ("ome-tiff", "ome-zarr"):
                self._report_error(
                    f"cTIRF runs are stored as ome-tiff or ome-zarr, not {fmt}; "
                    "choose one of them in the save box"
                )
                return
        self.run_mda(sequence, save_to=save_path)

    def run_mda(self, sequence: Any = None, *, save_to: str | Path | None = None) -> None:
        """Run an MDA with live cTIRF. No `sequence`: the MDA editor's, as its Run button
        does (with its save box); else a useq.MDASequence or a YAML/JSON file, saved to
        the run folder named by `save_to` (`dir/name.ome.tiff` -> `dir/name/raw.*`)."""
        if self._mode != "idle":
            return
        if sequence is None:
            self.mda_widget.run_mda()
            return
        import useq

        from ctirf_live.inference.acquire import fit_channels, load_sequence
        from ctirf_live.inference.writers import make_result_writer, raw_output_path

        try:
            if not isinstance(sequence, useq.MDASequence):
                sequence = load_sequence(sequence)
            if self.rig is not None:
                from ctirf_live.acquisition.limits import stage_limits

                stage_limits(self.core, self.rig.config_path).check_sequence(sequence)
            sequence = fit_channels(sequence, self.core)
            outputs: list[Any] = []
            self.run_dir = None
            if save_to is not None:
                run_dir, fmt = run_folder_and_format(save_to)
                run_dir.mkdir(parents=True, exist_ok=False)
                outputs.append(str(raw_output_path(run_dir, fmt)))
                self.processor.result_writer = make_result_writer(run_dir, fmt)
                self.run_dir, self._writer_set = run_dir, True
            elif self._writer_set:
                self.processor.result_writer = None  # this run is not saved
            self._start_run("mda", sequence)
            if self.core.mda.is_running():
                raise ValueError("another MDA is still running; wait for it or stop it")
            self._worker = threading.Thread(
                target=run_mda, args=(self.core, sequence),
                kwargs={"handlers": [self.processor], "sinks": outputs},
                name="ctirf-window-mda", daemon=True,
            )
            self._worker.start()
        except Exception as exc:
            self._mode = "idle"
            self._report_error(f"could not run the sequence: {exc}")
            return
        where = f", saving to {self.run_dir}" if self.run_dir else ""
        self.statusBar().showMessage(f"MDA running{where}")
        self._update_buttons()

    def stop(self) -> None:
        """Stop live streaming or cancel the MDA (the acquired frames are kept)."""
        if self._mode == "live":
            if self.core.isSequenceRunning():
                self.core.stopSequenceAcquisition()
            self._end_live()
            self._finish_run("live stopped")
        elif self._mode == "mda":
            self._cancelled = True
            self.core.mda.cancel()
            self.statusBar().showMessage("cancelling the MDA...")
        self._update_buttons()

    def shutdown(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop acquisition and processing and wait for them (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._render_timer.stop()
        self._status_timer.stop()
        if self.compare_pane is not None:
            self.compare_pane.stop()
        if self.core.isSequenceRunning() and not self.core.mda.is_running():
            self.core.stopSequenceAcquisition()
        self._end_live()
        if self.core.mda.is_running():
            self._cancelled = True
            self.core.mda.cancel()
        deadline = time.monotonic() + timeout
        while (self.core.mda.is_running() or self._worker_alive()) and time.monotonic() < deadline:
            QApplication.processEvents()  # in case core signals are queued to this thread
            if self._worker is not None:
                self._worker.join(0.02)
            else:
                time.sleep(0.02)
        still: list[str] = []
        if self.core.mda.is_running() or self._worker_alive():
            still.append("the MDA")
            log.error("acquisition did not stop within %.0f s", timeout)
        drained = self._cancelled or self._drain(deadline)
        # cancelled or too slow: drop what still waits (the raw store has every frame);
        # either way the processor closes its stores, within what is left of the deadline
        left = max(deadline - time.monotonic(), 0.5)
        if not self._stop_processor(wait=drained, timeout=left):
            still.append("the cTIRF worker (inside a model call)")
        if still:
            message = f"closing while {' and '.join(still)} still run(s); the raw store is kept"
            log.error("%s", message)
            self.statusBar().showMessage(message)
        self._disconnect_processor()
        for signal, slot in (
            (self.core.mda.events.frameReady, self._on_mda_frame),
            (self.core.mda.events.sequenceStarted, self._on_sequence_started),
            (self.core.mda.events.sequenceFinished, self._on_sequence_finished),
            (self.core.events.imageSnapped, self._on_image_snapped),
            (self.core.events.pixelSizeChanged, self._on_pixel_size_changed),
        ):
            try:
                signal.disconnect(slot)
            except (TypeError, ValueError, RuntimeError):
                pass
        for signal, slot in self._index_slots:
            signal.disconnect(slot)
        self._index_slots.clear()
        self._mode = "idle"
        disconnect_widgets(self)
        self._dispose_panes()
        collector.release()

    def _dispose_panes(self) -> None:
        """Close every ndv canvas now, while its widgets exist (see ImagePane.dispose)."""
        panes = [self.raw_pane, self.ctirf_pane, *self.xz_panes]
        if self.compare_pane is not None:
            self.compare_pane.dispose()
        for pane in panes:
            pane.dispose()

    def _stop_processor(self, wait: bool, timeout: float) -> bool:
        """Stop the processor within `timeout`; False when its worker is still busy."""
        try:
            return self.processor.stop(wait=wait, timeout=timeout) is not False
        except TypeError:  # a processor-like object without a timeout
            self.processor.stop(wait=False)
            return True

    def _drain(self, deadline: float) -> bool:
        """Let frames still queued (record policy) finish, keeping the window responsive."""
        while getattr(self.processor, "running", False) and self.processor.stats.queue_depth:
            if time.monotonic() > deadline:
                log.warning("closing with frames still queued; the raw store has them")
                return False
            depth = self.processor.stats.queue_depth
            self.statusBar().showMessage(f"finishing {depth} queued frame(s)...")
            QApplication.processEvents()
            time.sleep(0.05)
        return True

    def closeEvent(self, event: QCloseEvent) -> None:
        self.statusBar().showMessage("stopping...")
        self.shutdown()
        event.accept()


def run_live_window(
    config: Path,
    model: str,
    policy: str = "preview",
    *,
    device: str = "auto",
    sequence_path: Path | None = None,
    output_dir: Path | None = None,
    objective: str | None = None,
    tile: int = 512,
    backend: str = "auto",
    threads: int | None = None,
) -> int:
    """Open the rig on `objective` (default: the active one), check the model was trained
    for its optics, and run the live window (`tile`-px tiles, the model on `backend` with
    `threads` CPU threads); returns the Qt exit code."""
    from ctirf_live.acquisition.core import check_rig, open_core
    from ctirf_live.acquisition.objective import check_model_optics, select_objective
    from ctirf_live.gui.backend import choose_canvas_backend
    from ctirf_live.inference.live import LiveProcessor

    # Qt core signals: pymmcore-widgets update from the GUI thread; emitting never waits
    app = QApplication.instance() or QApplication(sys.argv[:1])
    choose_canvas_backend()
    restorer = Restorer(model, device=device, tile=tile, backend=backend)
    with open_core(config, signals="qt") as core:
        rig = check_rig(core, config)
        check_model_optics(restorer.optics, select_objective(core, rig, objective), rig)
        processor = LiveProcessor(restorer, policy=policy, threads=threads)
        window = LiveWindow(
            core, processor, rig=rig, sequence_path=sequence_path, output_dir=output_dir
        )
        window.show()
        code = int(app.exec())
        window.shutdown()
        window.deleteLater()  # delete the widgets now, before the core and the app go away
        QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        del window
    return code
