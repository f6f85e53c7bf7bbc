"""The live window: raw EPI and cTIRF side by side while the microscope images.

Rendering never touches the processing path: the processor's signals (emitted on its
worker thread) and the MDA's frame signal (on the acquisition thread) only store the
newest frame under a lock; a 30 Hz timer on the GUI thread draws whatever is newest.
So a slow display drops frames from the screen, never from processing or from disk.
Closing the window cancels a running MDA or live stream and waits for it and for the
processor, both within one deadline (`CLOSE_TIMEOUT_S`): what is still running then is
named in the log and the status bar, queued frames are dropped (the raw store has them)
and the window closes; it never hangs. A run reads "saved" only once every queued frame
is stored, and says how many raw frames and cTIRF planes were saved.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
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
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleRangeSlider

from ctirf_live.acquisition.core import RigInfo, active_optics, set_illumination
from ctirf_live.config import EPI_PRESET
from ctirf_live.gui.canvas import ImageCanvas, ViewState
from ctirf_live.inference.restorer import Restorer, pixel_size_warning
from ctirf_live.models.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

RENDER_INTERVAL_MS = 33  # ~30 Hz: faster than the eye needs, cheap when nothing is new
STATS_INTERVAL_MS = 250  # the readout is throttled to 4 Hz whatever the processing rate
CLOSE_TIMEOUT_S = 60.0
BROWSE = "Browse..."
POLICIES = ("preview", "record")
WARNING_STYLE = "background: #7a5a00; color: white; padding: 4px; border-radius: 3px;"

ProcessorFactory = Callable[[str, str], Any]


class LatestFrames:
    """The newest raw frame and the newest (raw, result) pair, from any thread.

    Writers only swap references under a lock, so they cost nothing to the threads that
    acquire and process; the GUI takes what is new at its own pace.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: np.ndarray | None = None
        self._result: np.ndarray | None = None

    def put_raw(self, frame: np.ndarray) -> None:
        with self._lock:
            self._raw = frame

    def put_result(self, raw: np.ndarray | None, result: np.ndarray) -> None:
        with self._lock:
            if raw is not None:
                self._raw = raw
            self._result = result

    def take(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """New (raw, result) since the last call; None where nothing new arrived."""
        with self._lock:
            raw, result = self._raw, self._result
            self._raw = self._result = None
        return raw, result


def display_plane(arr: np.ndarray) -> np.ndarray:
    """The 2D plane to show: frames as they are, the middle plane of a z-stack."""
    arr = np.asarray(arr)
    while arr.ndim > 2:
        arr = arr[arr.shape[0] // 2]
    return arr


class ImagePane(QWidget):
    """A titled canvas with its contrast controls: 'auto' and a manual range slider."""

    def __init__(self, title: str, view: ViewState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel(f"<b>{title}</b>")
        self.canvas = ImageCanvas(view, self)
        self.auto = QCheckBox("auto")
        self.auto.setChecked(True)
        self.auto.setToolTip("contrast from the 0.1-99.9 percentiles of each frame")
        self.slider = QLabeledDoubleRangeSlider(Qt.Orientation.Horizontal)
        self.slider.setDecimals(0)
        self.slider.setRange(0, 1)
        self.slider.setValue((0, 1))
        self.slider.setToolTip("manual contrast range (moving it turns 'auto' off)")
        self._data_range: tuple[float, float] | None = None

        controls = QHBoxLayout()
        controls.addWidget(QLabel("contrast"))
        controls.addWidget(self.auto)
        controls.addWidget(self.slider, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.title)
        layout.addWidget(self.canvas, 1)
        layout.addLayout(controls)

        self.auto.toggled.connect(self._on_auto)
        self.slider.valueChanged.connect(self._on_slider)
        self.canvas.contrastChanged.connect(self._show_limits)

    def show_frame(self, frame: np.ndarray) -> None:
        """Display a frame; the slider's range grows to cover the data it has seen."""
        plane = display_plane(frame)
        step = max(1, plane.shape[0] // 256)
        sample = plane[::step, ::step]
        lo, hi = float(np.nanmin(sample)), float(np.nanmax(sample))
        if self._data_range is None or lo < self._data_range[0] or hi > self._data_range[1]:
            old = self._data_range or (lo, hi)
            self._data_range = (min(lo, old[0]), max(hi, old[1], min(lo, old[0]) + 1))
            self.slider.blockSignals(True)
            value = self.slider.value()
            self.slider.setRange(*self._data_range)
            self.slider.setValue(value)
            self.slider.blockSignals(False)
        self.canvas.set_data(plane)

    def _on_auto(self, checked: bool) -> None:
        if checked:
            self.canvas.set_auto_contrast(True)
        else:
            self.canvas.set_contrast(*self.slider.value())

    def _on_slider(self, value: tuple[float, float]) -> None:
        if self.auto.isChecked():
            self.auto.blockSignals(True)
            self.auto.setChecked(False)
            self.auto.blockSignals(False)
        self.canvas.set_contrast(*value)

    def _show_limits(self, lo: float, hi: float) -> None:
        self.slider.blockSignals(True)
        low, high = self.slider.minimum(), self.slider.maximum()
        if lo < low or hi > high:
            self.slider.setRange(min(lo, low), max(hi, high))
        self.slider.setValue((lo, hi))
        self.slider.blockSignals(False)


class LiveWindow(QMainWindow):
    """Raw | cTIRF with linked zoom/pan, contrast, statistics and acquisition controls.

    `processor` is a `LiveProcessor` (or anything with its signals and methods);
    `make_processor(model, policy)` builds a new one when another model is chosen
    (default: same device, tiles and channels as the current one). With `output_dir`,
    each MDA saves raw and cTIRF stores in a new `run-YYYYmmdd-HHMMSS` folder there.
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
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.core = core
        self.rig = rig
        self.sequence_path = Path(sequence_path) if sequence_path else None
        self.processor: Any = None
        self._make_processor = make_processor
        self._latest = LatestFrames()
        self._stats: Any = None
        self._errors: deque[str] = deque(maxlen=20)
        self._mode = "idle"
        self._worker: threading.Thread | None = None
        self._closed = False
        self._pixel_check_due = True
        self._live_number: Any = None
        self._cancelled = False
        self.output_dir = Path(output_dir) if output_dir else None
        self.run_dir: Path | None = None
        self.warning_text = ""

        title = f"ctirf live · {rig.config_path.name}" if rig else "ctirf live"
        self.setWindowTitle(title)
        self._build_ui()
        self._set_processor(processor)
        core.mda.events.frameReady.connect(self._on_mda_frame)
        core.events.pixelSizeChanged.connect(self._on_pixel_size_changed)

        self._render_timer = QTimer(self)
        self._render_timer.timeout.connect(self._render)
        self._render_timer.start(RENDER_INTERVAL_MS)
        self._stats_timer = QTimer(self)
        self._stats_timer.timeout.connect(self._refresh_status)
        self._stats_timer.start(STATS_INTERVAL_MS)
        self._refresh_status()

    # -- layout -----------------------------------------------------------------------

    def _build_ui(self) -> None:
        self.view = ViewState(self)
        self.raw_pane = ImagePane(f"Raw ({EPI_PRESET})", self.view)
        self.ctirf_pane = ImagePane("cTIRF", self.view)

        self.snap_button = QPushButton("Snap")
        self.live_button = QPushButton("Live")
        self.stop_button = QPushButton("Stop")
        self.mda_button = QPushButton("Run MDA...")
        self.model_combo = QComboBox()
        self.model_combo.setMinimumContentsLength(24)
        self.model_combo.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.policy_combo = QComboBox()
        self.policy_combo.addItems(POLICIES)
        self.policy_combo.setToolTip(
            "preview: newest frame wins, skips frames the model cannot keep up with; "
            "record: every frame is processed (backlog waits on disk)"
        )
        self.snap_button.setToolTip("switch to EPI, snap one frame and restore it")
        self.live_button.setToolTip("stream the camera and restore frames continuously")
        self.mda_button.setToolTip("run a useq MDA sequence (YAML/JSON) with live restoration")
        self.model_combo.setToolTip("checkpoint that restores the frames (Browse... for a file)")

        bar = QHBoxLayout()
        for button in (self.snap_button, self.live_button, self.stop_button, self.mda_button):
            bar.addWidget(button)
        bar.addSpacing(12)
        bar.addWidget(QLabel("model"))
        bar.addWidget(self.model_combo, 1)
        bar.addWidget(QLabel("policy"))
        bar.addWidget(self.policy_combo)

        self.warning_label = QLabel()
        self.warning_label.setWordWrap(True)
        self.warning_label.setStyleSheet(WARNING_STYLE)
        self.warning_label.hide()

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.addWidget(self.raw_pane)
        splitter.addWidget(self.ctirf_pane)
        splitter.setChildrenCollapsible(False)

        self.stats_label = QLabel()
        self.stats_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        central = QWidget()
        layout = QVBoxLayout(central)
        layout.addLayout(bar)
        layout.addWidget(self.warning_label)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.stats_label)
        self.setCentralWidget(central)
        self.statusBar().showMessage("ready")
        self.resize(1200, 720)

        self.snap_button.clicked.connect(self.snap)
        self.live_button.clicked.connect(self.start_live)
        self.stop_button.clicked.connect(self.stop)
        self.mda_button.clicked.connect(self._on_mda_clicked)
        self.model_combo.activated.connect(self._on_model_chosen)
        self.policy_combo.activated.connect(self._on_policy_chosen)

    def _fill_models(self) -> None:
        current = str(self.processor.restorer.metadata.get("path") or "")
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        paths: list[str] = []
        for info in list_checkpoints():
            pixel = f", {info.pixel_size_um * 1000:.0f} nm" if info.pixel_size_um else ""
            label = f"{info.name} ({info.objective or '?'}{pixel})"
            self.model_combo.addItem(label, str(info.path))
            paths.append(str(info.path))
        if current and current not in paths:
            self.model_combo.addItem(Path(current).stem, current)
        elif not current:
            self.model_combo.addItem(f"{self.processor.restorer.model.name} (in memory)", "")
            current = ""
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
        self._stop_processor(wait=True, timeout=CLOSE_TIMEOUT_S)
        self._set_processor(new)
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
        # while the camera streams, the raw pane follows the stream (newest frame), not
        # the older frame this result was made from
        streaming = self._mode in ("live", "mda")
        self._latest.put_result(None if streaming else raw, result)

    def _on_stats(self, stats: Any) -> None:
        self._stats = stats

    def _on_error(self, message: str) -> None:
        self._errors.append(str(message))

    def _on_mda_frame(self, frame: np.ndarray, event: Any = None, meta: Any = None) -> None:
        channel = getattr(getattr(event, "channel", None), "config", None)
        if channel is None or channel in getattr(self.processor, "channels", (EPI_PRESET,)):
            self._latest.put_raw(frame)

    def _on_pixel_size_changed(self, *args: Any) -> None:
        self._pixel_check_due = True

    # -- GUI-thread work --------------------------------------------------------------

    def _render(self) -> None:
        raw, result = self._latest.take()
        if raw is None and self._mode == "live":
            raw = self._newest_live_image()
        if raw is not None:
            self.raw_pane.show_frame(raw)
        if result is not None:
            self.ctirf_pane.show_frame(result)

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

    def _refresh_status(self) -> None:
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
        self.stats_label.setText(self._stats_text())
        self._update_buttons()

    def _saved_text(self) -> str:
        """'; saved in DIR: N raw frames, k of n cTIRF planes' for a run with an output folder."""
        if self.run_dir is None:
            return ""
        from ctirf_live.inference.rawstore import count_raw_frames
        from ctirf_live.inference.writers import raw_output_path

        raw = count_raw_frames(raw_output_path(self.run_dir))
        writer = getattr(self.processor, "result_writer", None)
        planes = getattr(writer, "planes_total", 0)
        ctirf = f", cTIRF {writer.frames_written} of {planes} planes" if planes else ""
        return f"; saved in {self.run_dir}: {raw} raw frames{ctirf}"

    def _stats_text(self) -> str:
        head = f"<b>{self._mode}</b>"
        s = self._stats
        if s is None:
            return f"{head} · no frames processed yet"
        parts = [
            head,
            f"{s.processed_fps:.1f} fps",
            f"latency p50 {s.latency_p50_ms:.0f} ms / p95 {s.latency_p95_ms:.0f} ms",
            f"processed {s.processed}/{s.acquired}",
            f"skipped {s.skipped}",
            f"queue {s.queue_depth}",
        ]
        if getattr(s, "spilled", 0):
            parts.append(f"on disk {s.spilled}")
        if s.errors:
            parts.append(f"<span style='color:#c33'>errors {s.errors}</span>")
        return " · ".join(parts)

    def _update_buttons(self) -> None:
        idle = self._mode == "idle"
        for widget in (
            self.snap_button, self.live_button, self.mda_button,
            self.model_combo, self.policy_combo,
        ):
            widget.setEnabled(idle)
        self.stop_button.setEnabled(self._mode in ("live", "mda"))

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
        if self.warning_text:
            log.warning("%s", self.warning_text)
            self.warning_label.setText(f"⚠ {self.warning_text}")
        self.warning_label.setVisible(bool(self.warning_text))
        return self.warning_text

    def _worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _finish_run(self, message: str) -> None:
        self._mode = "idle"
        self._worker = None
        if message:
            self.statusBar().showMessage(message, 10000)

    # -- actions ----------------------------------------------------------------------

    def snap(self) -> None:
        """Switch to EPI, snap one frame and restore it, off the GUI thread."""
        if self._mode != "idle":
            return
        self._mode = "snap"
        self._worker = threading.Thread(target=self._snap_work, name="ctirf-snap", daemon=True)
        self._worker.start()
        self._update_buttons()

    def _snap_work(self) -> None:
        try:
            set_illumination(self.core, EPI_PRESET)
            frame = self.core.snap()
            self._latest.put_raw(frame)
            self._latest.put_result(frame, self.processor.restorer.restore(frame))
        except Exception as exc:  # reported in the status bar, the window goes on
            self._errors.append(f"snap failed: {exc}")

    def start_live(self) -> None:
        """Stream the camera continuously; the processor restores what it can keep up with."""
        if self._mode != "idle":
            return
        try:
            set_illumination(self.core, EPI_PRESET)
            self.processor.attach_live(self.core)
            self.core.startContinuousSequenceAcquisition(0)
        except Exception as exc:
            self._report_error(f"live failed: {exc}")
            self._stop_live()
            return
        self._mode = "live"
        self.statusBar().showMessage("live")
        self._update_buttons()

    def _on_mda_clicked(self) -> None:
        self.run_mda()

    def run_mda(self, sequence: Any = None) -> None:
        """Run an MDA (a useq.MDASequence, a YAML/JSON file, or chosen in a file dialog)."""
        if self._mode != "idle":
            return
        import useq

        from ctirf_live.inference.acquire import fit_channels, load_sequence

        if sequence is None:
            sequence = self.sequence_path
        if sequence is None:
            path, _ = QFileDialog.getOpenFileName(
                self, "Choose an MDA sequence", "", "useq sequences (*.yaml *.yml *.json)"
            )
            if not path:
                return
            sequence = path
        try:
            if not isinstance(sequence, useq.MDASequence):
                sequence = load_sequence(sequence)
            if self.rig is not None:
                from ctirf_live.acquisition.limits import stage_limits

                stage_limits(self.core, self.rig.config_path).check_sequence(sequence)
            outputs = [*self._prepare_stores(), self.processor]
            self._worker = self.core.run_mda(fit_channels(sequence, self.core), output=outputs)
        except Exception as exc:
            self._report_error(f"could not run the sequence: {exc}")
            return
        self._mode, self._cancelled = "mda", False
        where = f", saving to {self.run_dir}" if self.run_dir else ""
        self.statusBar().showMessage(f"MDA running{where}")
        self._update_buttons()

    def _prepare_stores(self) -> list[str]:
        """With an output folder: a new run folder, its raw path and the cTIRF writer."""
        if self.output_dir is None:
            return []
        from ctirf_live.inference.writers import make_result_writer, raw_output_path

        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = self.output_dir / f"run-{stamp}"
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = self.output_dir / f"run-{stamp}-{n}"
        run_dir.mkdir(parents=True)
        self.processor.result_writer = make_result_writer(run_dir)
        self.run_dir = run_dir
        return [str(raw_output_path(run_dir))]

    def stop(self) -> None:
        """Stop live streaming or cancel the MDA (the acquired frames are kept)."""
        if self._mode == "live":
            self._stop_live()
            self._finish_run("live stopped")
        elif self._mode == "mda":
            self._cancelled = True
            self.core.mda.cancel()
            self.statusBar().showMessage("cancelling the MDA...")
        self._update_buttons()

    def _stop_live(self) -> None:
        if self.core.isSequenceRunning():
            self.core.stopSequenceAcquisition()
        try:
            self.processor.detach_live(self.core)
        except Exception as exc:
            log.debug("detach_live: %s", exc)

    def shutdown(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop acquisition and processing and wait for them (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._render_timer.stop()
        self._stats_timer.stop()
        if self._mode == "live":
            self._stop_live()
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
            (self.core.events.pixelSizeChanged, self._on_pixel_size_changed),
        ):
            try:
                signal.disconnect(slot)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._mode = "idle"

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
    from ctirf_live.inference.live import LiveProcessor

    # psygnal core events: processing and acquisition never wait for the GUI thread
    os.environ.setdefault("PYMM_SIGNALS_BACKEND", "psygnal")
    app = QApplication.instance() or QApplication(sys.argv[:1])
    restorer = Restorer(model, device=device, tile=tile, backend=backend)
    with open_core(config) as core:
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
