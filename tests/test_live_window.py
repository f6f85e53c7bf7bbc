"""The Qt live window (pytest-qt, offscreen): panes, updates, contrast, zoom, shutdown."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# psygnal core events: Qt-queued core signals would need the GUI thread to deliver
# MDA events to output handlers (see live_window.run_live_window)
os.environ.setdefault("PYMM_SIGNALS_BACKEND", "psygnal")

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import useq
from psygnal import Signal
from qtpy.QtCore import QPoint, QPointF, Qt
from qtpy.QtGui import QWheelEvent
from qtpy.QtWidgets import QApplication

from ctirf_live.config import Optics
from ctirf_live.gui.canvas import ImageCanvas, ViewState, auto_range, to_uint8
from ctirf_live.gui.live_window import LiveWindow
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet


@dataclass
class Stats:
    acquired: int = 10
    processed: int = 8
    skipped: int = 2
    errors: int = 0
    queue_depth: int = 1
    spilled: int = 0
    latency_p50_ms: float = 41.0
    latency_p95_ms: float = 77.0
    processed_fps: float = 12.5


class FakeProcessor:
    """The LiveProcessor surface the window uses, without a worker thread."""

    resultReady = Signal(object, object, object)
    statsChanged = Signal(object)
    errorOccurred = Signal(str)

    def __init__(self, restorer: Restorer, policy: str = "preview") -> None:
        self.restorer, self.policy, self.channels = restorer, policy, ("EPI",)
        self.stopped = False

    def start(self) -> None: ...

    def stop(self, wait: bool = True) -> None:
        self.stopped = True

    def attach_live(self, core) -> None: ...

    def detach_live(self, core) -> None: ...

    def sequenceStarted(self, seq, meta=None) -> None: ...

    def frameReady(self, frame, event, meta=None) -> None: ...

    def sequenceFinished(self, seq) -> None: ...


def tiny_restorer(pixel_size_um: float = 0.0975) -> Restorer:
    torch.manual_seed(0)
    model = ET2dNet(Optics(pixel_size_um=pixel_size_um), "tiny")
    return Restorer(model, device="cpu", tile=128, overlap=32)


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    return tiny_restorer()


@pytest.fixture
def window(qtbot, demo_core, restorer):
    win = LiveWindow(demo_core, FakeProcessor(restorer))
    qtbot.addWidget(win)
    win.resize(900, 520)
    win.show()
    qtbot.waitExposed(win)
    yield win
    win.shutdown()


def ramp(shape=(64, 96), top: int = 4000) -> np.ndarray:
    return np.linspace(0, top, shape[0] * shape[1]).reshape(shape).astype(np.uint16)


def painted(canvas: ImageCanvas, n: int = 1) -> bool:
    return canvas.frames_painted >= n


def test_window_shows_both_panes_and_controls(window: LiveWindow) -> None:
    assert window.raw_pane.isVisible() and window.ctirf_pane.isVisible()
    assert "Raw" in window.raw_pane.title.text() and "cTIRF" in window.ctirf_pane.title.text()
    assert window.raw_pane.x() < window.ctirf_pane.x()  # side by side
    for button in ("Snap", "Live", "Stop", "Run MDA..."):
        assert any(b.text() == button for b in window.findChildren(type(window.snap_button)))
    assert window.model_combo.itemText(window.model_combo.count() - 1) == "Browse..."
    assert [window.policy_combo.itemText(i) for i in range(2)] == ["preview", "record"]
    assert not window.stop_button.isEnabled()  # nothing to stop while idle
    assert window.warning_label.isHidden()  # demo 60X pixel matches the model


def test_result_signal_updates_both_canvases(qtbot, window: LiveWindow) -> None:
    raw, result = ramp(), ramp(top=100).astype(np.float32)
    # emitted from a worker thread, as LiveProcessor does
    worker = threading.Thread(
        target=window.processor.resultReady.emit, args=(raw, result, None)
    )
    worker.start()
    worker.join()
    qtbot.waitUntil(lambda: painted(window.raw_pane.canvas) and painted(window.ctirf_pane.canvas))
    assert window.raw_pane.canvas.data() is raw
    assert window.ctirf_pane.canvas.data() is result


def test_only_the_newest_result_is_drawn_and_emitting_is_cheap(qtbot, window: LiveWindow) -> None:
    frames = [np.full((64, 64), i, np.uint16) for i in range(500)]
    t0 = time.perf_counter()
    for f in frames:  # faster than any repaint: no Qt events processed in between
        window.processor.resultReady.emit(f, f.astype(np.float32), None)
    per_emit = (time.perf_counter() - t0) / len(frames)
    assert per_emit < 1e-3  # the processing thread never waits for the display
    canvas = window.ctirf_pane.canvas
    qtbot.waitUntil(lambda: painted(canvas))
    assert canvas.frames_received == 1
    assert canvas.data()[0, 0] == 499


def test_stack_results_show_the_middle_plane(qtbot, window: LiveWindow) -> None:
    stack = np.stack([np.full((64, 64), z, np.float32) for z in range(6)])
    window.processor.resultReady.emit(stack, stack, None)
    qtbot.waitUntil(lambda: painted(window.ctirf_pane.canvas))
    assert window.ctirf_pane.canvas.data().shape == (64, 64)
    assert window.ctirf_pane.canvas.data()[0, 0] == 3


def test_contrast_auto_vs_manual_changes_rendered_pixels(qtbot, window: LiveWindow) -> None:
    pane = window.raw_pane
    pane.show_frame(ramp())
    qtbot.waitUntil(lambda: painted(pane.canvas))
    auto = pane.canvas.rendered().copy()
    assert auto.min() == 0 and auto.max() == 255
    lo, hi = pane.slider.value()
    assert 0 <= lo < 50 and 3950 < hi <= 4000  # the slider shows the auto limits

    pane.slider.setValue((1000.0, 2000.0))  # moving the slider switches auto off
    assert not pane.auto.isChecked()
    manual = pane.canvas.rendered()
    assert pane.canvas.contrast() == (1000.0, 2000.0)
    assert not np.array_equal(auto, manual)
    assert (manual[ramp() <= 1000] == 0).all() and (manual[ramp() >= 2000] == 255).all()
    before = pane.canvas.grab().toImage()

    pane.auto.setChecked(True)
    assert np.array_equal(pane.canvas.rendered(), auto)
    assert pane.canvas.grab().toImage() != before


def test_linked_zoom_and_pan(qtbot, window: LiveWindow) -> None:
    window.processor.resultReady.emit(ramp(), ramp().astype(np.float32), None)
    raw, ctirf = window.raw_pane.canvas, window.ctirf_pane.canvas
    qtbot.waitUntil(lambda: painted(raw) and painted(ctirf))
    scale_before = ctirf.scale()
    centre = QPointF(raw.width() / 2, raw.height() / 2)
    wheel = QWheelEvent(
        centre, raw.mapToGlobal(centre), QPoint(0, 0), QPoint(0, 240),
        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase,
        False,
    )
    QApplication.sendEvent(raw, wheel)
    assert raw.view is ctirf.view
    assert ctirf.view.zoom == pytest.approx(1.25**2)
    assert ctirf.scale() == pytest.approx(scale_before * 1.25**2)

    start = QPoint(raw.width() // 2, raw.height() // 2)
    qtbot.mousePress(raw, Qt.MouseButton.LeftButton, pos=start)
    qtbot.mouseMove(raw, start + QPoint(40, 0))
    qtbot.mouseRelease(raw, Qt.MouseButton.LeftButton, pos=start + QPoint(40, 0))
    assert ctirf.view.centre[0] < 0.5  # dragged right: the view moved left, in both panes
    qtbot.mouseDClick(ctirf, Qt.MouseButton.LeftButton)
    assert raw.view.zoom == 1.0 and raw.view.centre == (0.5, 0.5)


def test_canvas_nearest_neighbour_when_zoomed_in(qtbot) -> None:
    canvas = ImageCanvas(ViewState())
    qtbot.addWidget(canvas)
    canvas.resize(200, 200)
    checker = (np.indices((4, 4)).sum(0) % 2 * 1000).astype(np.uint16)
    canvas.set_data(checker)
    image = canvas.grab().toImage()
    values = {image.pixelColor(x, 100).red() for x in range(0, 200, 5)}
    assert values == {0, 255}  # 50 px squares, no interpolated greys


def test_auto_range_and_lut() -> None:
    data = ramp((512, 512))
    lo, hi = auto_range(data)
    assert lo == pytest.approx(4, abs=5) and hi == pytest.approx(3996, abs=5)
    assert to_uint8(data, 0, 4000)[-1, -1] == 255
    floats = data.astype(np.float32)
    floats[0, 0] = np.nan
    np.testing.assert_array_equal(to_uint8(floats, 0, 4000)[1:], to_uint8(data, 0, 4000)[1:])


def test_pixel_size_mismatch_shows_a_warning(qtbot, demo_core, caplog) -> None:
    win = LiveWindow(demo_core, FakeProcessor(tiny_restorer(pixel_size_um=0.065)))
    qtbot.addWidget(win)
    win.show()
    assert not win.warning_label.isHidden()
    assert "65.0 nm" in win.warning_label.text() and "97.5 nm" in win.warning_label.text()
    assert any("fine-tune" in r.getMessage() for r in caplog.records)
    win.shutdown()


def test_errors_and_stats_reach_the_status_readout(qtbot, window: LiveWindow) -> None:
    window.processor.errorOccurred.emit("model crashed on frame 3")
    window.processor.statsChanged.emit(Stats())
    qtbot.waitUntil(lambda: "model crashed" in window.statusBar().currentMessage())
    qtbot.waitUntil(lambda: "fps" in window.stats_label.text())
    text = window.stats_label.text()
    assert "12.5 fps" in text and "p50 41 ms" in text and "p95 77 ms" in text
    assert "skipped 2" in text and "queue 1" in text


def test_snap_shows_raw_and_restored_frame(qtbot, window: LiveWindow, demo_core) -> None:
    demo_core.setConfig("Illumination", "TIRF")
    window.snap()
    qtbot.waitUntil(lambda: painted(window.ctirf_pane.canvas), timeout=20000)
    assert demo_core.getCurrentConfig("Illumination") == "EPI"
    raw, result = window.raw_pane.canvas.data(), window.ctirf_pane.canvas.data()
    assert raw.shape == result.shape == (128, 128) and result.dtype == np.float32
    qtbot.waitUntil(lambda: window.snap_button.isEnabled())


def test_model_and_policy_selectors(qtbot, demo_core, restorer, tmp_path) -> None:
    from ctirf_live.models.etnet import save_model

    made: list[tuple[str, str]] = []

    def make(model: str, policy: str) -> FakeProcessor:
        made.append((model, policy))
        return FakeProcessor(restorer, policy)

    path = save_model(restorer.model, tmp_path / "tiny.safetensors")
    first = FakeProcessor(Restorer(path, device="cpu", tile=128))
    win = LiveWindow(demo_core, first, make_processor=make)
    qtbot.addWidget(win)
    assert win.model_combo.currentData() == str(path)

    win.policy_combo.setCurrentIndex(1)
    win.policy_combo.activated.emit(1)
    assert first.policy == "record" and not made  # a policy change keeps the processor

    other = save_model(restorer.model, tmp_path / "other.safetensors")
    win.model_combo.insertItem(0, "other", str(other))
    win.model_combo.setCurrentIndex(0)
    win.model_combo.activated.emit(0)
    assert made == [(str(other), "record")]
    assert first.stopped and win.processor is not first
    first.resultReady.emit(ramp(), ramp(), None)  # the old processor is disconnected
    assert win._latest.take() == (None, None)
    win.shutdown()


def test_a_bad_model_choice_keeps_the_current_processor(qtbot, window: LiveWindow, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    window._make_processor = None  # the default factory loads a real checkpoint
    current = window.processor
    window.model_combo.insertItem(0, "bad", str(bad))
    window.model_combo.activated.emit(0)
    assert window.processor is current
    assert "could not load model" in window.statusBar().currentMessage()


def test_screenshot_with_a_demo_frame(qtbot, window: LiveWindow, demo_core, tmp_path) -> None:
    frame = demo_core.snap()
    window.processor.resultReady.emit(frame, window.processor.restorer.restore(frame), None)
    qtbot.waitUntil(lambda: painted(window.ctirf_pane.canvas))
    path = tmp_path / "live_window.png"
    assert window.grab().save(str(path))
    assert path.stat().st_size > 10_000
    canvas_image = window.ctirf_pane.canvas.grab().toImage()
    greys = {canvas_image.pixelColor(x, canvas_image.height() // 2).red() for x in range(0, 300, 3)}
    assert len(greys) > 10  # an image, not an empty canvas


def test_close_during_mda_cancels_it_and_leaves_valid_files(
    qtbot, demo_core, restorer, tmp_path
) -> None:
    import tifffile

    from ctirf_live.inference.live import LiveProcessor
    from ctirf_live.inference.writers import read_result

    processor = LiveProcessor(restorer, policy="record")
    win = LiveWindow(demo_core, processor, output_dir=tmp_path)
    qtbot.addWidget(win)
    win.show()
    loops = 400
    win.run_mda(useq.MDASequence(time_plan={"interval": 0.05, "loops": loops}))
    assert demo_core.mda.is_running() and not win.snap_button.isEnabled()
    qtbot.waitUntil(lambda: painted(win.ctirf_pane.canvas), timeout=30000)
    assert painted(win.raw_pane.canvas)
    win.close()
    assert not demo_core.mda.is_running()
    assert win._worker is None or not win._worker.is_alive()
    assert not processor.running
    acquired = processor.stats.acquired
    assert 0 < acquired < loops  # cancelled, not run to the end
    (run_dir,) = tmp_path.glob("run-*")
    raw = tifffile.imread(run_dir / "raw.ome.tiff")
    assert raw.shape[-2:] == (128, 128) and raw.reshape(-1, 128, 128).shape[0] >= acquired
    ctirf, meta = read_result(run_dir / "ctirf.ome.tiff")
    assert ctirf.shape[0] == loops and ctirf.shape[-2:] == (128, 128)
    assert np.count_nonzero(ctirf.reshape(loops, -1).any(axis=1)) >= 1
    assert meta  # model metadata recorded


def test_live_mode_streams_and_stops(qtbot, demo_core, restorer) -> None:
    from ctirf_live.inference.live import LiveProcessor

    processor = LiveProcessor(restorer, policy="preview")
    win = LiveWindow(demo_core, processor)
    qtbot.addWidget(win)
    win.show()
    win.start_live()
    assert demo_core.isSequenceRunning() and win.stop_button.isEnabled()
    qtbot.waitUntil(lambda: painted(win.ctirf_pane.canvas), timeout=30000)
    qtbot.waitUntil(lambda: win.raw_pane.canvas.frames_received >= 2, timeout=10000)
    win.stop()
    assert not demo_core.isSequenceRunning() and win.snap_button.isEnabled()
    assert processor.stats.processed >= 1
    win.shutdown()


def test_run_mda_from_a_sequence_file(qtbot, window: LiveWindow, tmp_path: Path) -> None:
    path = tmp_path / "seq.yaml"
    path.write_text(useq.MDASequence(time_plan={"interval": 0, "loops": 3}).yaml())
    window.sequence_path = path
    window.run_mda()
    qtbot.waitUntil(lambda: window.snap_button.isEnabled(), timeout=20000)
    assert "MDA finished" in window.statusBar().currentMessage()
    assert painted(window.raw_pane.canvas)


def test_cli_live_without_a_display_is_one_line_exit_2(monkeypatch) -> None:
    from typer.testing import CliRunner

    from ctirf_live.cli import app

    for var in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    result = CliRunner().invoke(app, ["live", "--config", "rig.cfg", "--model", "m"])
    assert result.exit_code == 2
    assert "QT_QPA_PLATFORM" in result.output and "ctirf acquire" in result.output
    assert "Traceback" not in result.output


def test_cli_live_opens_the_window_and_exits_0(qtbot, restorer, tmp_path) -> None:
    from conftest import DEMO_CFG
    from qtpy.QtCore import QTimer
    from typer.testing import CliRunner

    from ctirf_live.cli import app
    from ctirf_live.models.etnet import save_model

    model = save_model(restorer.model, tmp_path / "tiny.safetensors")
    seen: list[str] = []

    def close_window() -> None:  # what a user does: look, then close the window
        for w in QApplication.topLevelWidgets():
            if isinstance(w, LiveWindow) and w.isVisible():
                seen.append(w.model_combo.currentData())
                w.close()

    QTimer.singleShot(300, close_window)
    guard = QTimer()  # never hang the suite if the window failed to close
    guard.setSingleShot(True)
    guard.timeout.connect(QApplication.quit)
    guard.start(30000)
    result = CliRunner().invoke(
        app, ["live", "--config", str(DEMO_CFG), "--model", str(model), "--device", "cpu"]
    )
    guard.stop()
    assert result.exit_code == 0, result.output
    assert seen == [str(model)]
    assert not [w for w in QApplication.topLevelWidgets() if isinstance(w, LiveWindow)]


class Held:
    """A real Restorer whose restore() waits for a gate (a model that is very slow)."""

    def __init__(self, restorer: Restorer, gate) -> None:
        self._r, self.gate = restorer, gate

    def __getattr__(self, name: str):
        return getattr(self._r, name)

    def restore(self, image: np.ndarray) -> np.ndarray:
        self.gate.wait(60)
        return self._r.restore(image)


def test_closing_during_a_record_run_never_hangs(qtbot, demo_core, restorer, tmp_path) -> None:
    """The MDA is over, the model is stuck: no "saved" yet, and closing keeps its deadline."""
    import threading
    import time

    from ctirf_live.inference.live import LiveProcessor

    gate = threading.Event()
    processor = LiveProcessor(Held(restorer, gate), policy="record",  # type: ignore[arg-type]
                              spill_dir=tmp_path / "spill")
    win = LiveWindow(demo_core, processor, output_dir=tmp_path)
    qtbot.addWidget(win)
    try:
        win.run_mda(useq.MDASequence(time_plan={"interval": 0, "loops": 6}))
        qtbot.waitUntil(lambda: not demo_core.mda.is_running() and not win._worker_alive(),
                        timeout=30000)
        win._refresh_status()
        status = win.statusBar().currentMessage()
        assert "queued" in status and "saved" not in status and win._mode == "mda"
        t0 = time.monotonic()
        win.shutdown(timeout=1.0)
        assert time.monotonic() - t0 < 5
        assert "cTIRF worker" in win.statusBar().currentMessage()
        assert processor.dropped_on_stop > 0
    finally:
        gate.set()
    assert processor.stop(timeout=30)  # the worker ends once the model returns


def test_run_mda_says_what_was_saved(qtbot, demo_core, restorer, tmp_path) -> None:
    from ctirf_live.inference.live import LiveProcessor

    processor = LiveProcessor(restorer, policy="preview")
    win = LiveWindow(demo_core, processor, output_dir=tmp_path)
    qtbot.addWidget(win)
    win.run_mda(useq.MDASequence(time_plan={"interval": 0, "loops": 4}))
    qtbot.waitUntil(lambda: win._mode == "idle", timeout=30000)
    status = win.statusBar().currentMessage()
    assert "saved in" in status and "4 raw frames" in status
    assert "of 4 planes" in status
    win.shutdown()
