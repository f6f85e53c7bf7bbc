"""The live window on the demo rig (pytest-qt, offscreen): buttons pressed, runs to the end,
closing mid-run, the 3D model's z slider, linked panes, statistics per run, model names.

Behaviour, not pixels: the canvases are vispy's, which draw nothing on Qt's offscreen
platform (what a CI machine without a Vulkan driver gets anyway); pygfx on Mesa's software
Vulkan (lavapipe) crashed natively during z-stack runs here, so it is not used for these.
Pixels are checked by benchmarks/screens.py.
Most tests share one window (each ndv viewer costs about a second to build); each test
gives it the processor it needs. Set CTIRF_SCREENS=folder to keep grabs of the states.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import useq

pytest.importorskip("ndv")
pytest.importorskip("pymmcore_widgets")

from conftest import DEMO_CFG
from psygnal import Signal
from qtpy.compat import isalive
from qtpy.QtCore import QEvent
from qtpy.QtWidgets import QApplication

from ctirf_live.config import Optics
from ctirf_live.gui import icons
from ctirf_live.gui.live_window import LiveWindow
from ctirf_live.inference.live import LiveProcessor
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet, ET3dNet

os.environ.setdefault("NDV_CANVAS_BACKEND", "vispy")

# The window crashed natively here in about one run of four, for two reasons, both fixed:
# ndv sliced on a thread pool whose results moved QObjects to the GUI thread while
# holding the GIL, against a disconnect there waiting for it (a deadlock, gdb; the panes
# now slice on the GUI thread, panes.make_synchronous); and pymmcore-plus started its
# output-handler relay through a queued call on the GUI thread, which could run on the
# freed relay (a segfault in Thread.start from Qt's event processing, a core dump; the
# window now runs MDAs through acquisition.mda.run_mda, tests/test_mda.py).

ROI = 128


@pytest.fixture(autouse=True, scope="module")
def _offline_icons() -> Iterator[None]:
    """No request to iconify.design: the generated stand-ins, as offline."""
    icons.set_offline(True)
    yield
    icons.set_offline(False)


def grab(win: LiveWindow, name: str) -> None:
    folder = os.environ.get("CTIRF_SCREENS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        assert win.grab().save(str(Path(folder) / f"{name}.png"))


@dataclass
class Stats:
    acquired: int = 0
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    queue_depth: int = 0
    spilled: int = 0
    latency_p50_ms: float = 41.0
    latency_p95_ms: float = 77.0
    processed_fps: float = 12.5
    ignored: int = 0
    consistency_frames: int = 0
    consistency_flagged: int = 0
    consistency_last: dict[str, Any] = field(default_factory=dict)


class FakeProcessor:
    """The LiveProcessor surface the window uses, without a worker thread."""

    resultReady = Signal(object, object, object)
    statsChanged = Signal(object)
    errorOccurred = Signal(str)

    def __init__(self, restorer: Restorer, policy: str = "preview") -> None:
        self.restorer, self.policy, self.channels = restorer, policy, ("EPI",)
        self.stats = Stats()
        self.stopped = False
        self.live_attached = False

    def stop(self, wait: bool = True) -> None:
        self.stopped = True

    def attach_live(self, core) -> None:
        self.live_attached = True

    def detach_live(self, core=None) -> None:
        self.live_attached = False

    def sequenceStarted(self, seq, meta=None) -> None: ...

    def frameReady(self, frame, event, meta=None) -> None: ...

    def sequenceFinished(self, seq) -> None: ...


def tiny_restorer(pixel_size_um: float = 0.0975, dims: int = 2) -> Restorer:
    torch.manual_seed(0)
    net = ET2dNet if dims == 2 else ET3dNet
    return Restorer(net(Optics(pixel_size_um=pixel_size_um), "tiny"), device="cpu", tile=ROI,
                    overlap=32)


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    return tiny_restorer()


@pytest.fixture(scope="module")
def core() -> Iterator[Any]:
    """The demo rig for this module's windows (small, fast camera)."""
    from ctirf_live.acquisition.core import open_core

    with open_core(DEMO_CFG, signals="qt") as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setExposure(20)
        core.setROI(960, 960, ROI, ROI)
        yield core


def close_window(win: LiveWindow) -> None:
    """What closing does, then Qt deletes the widgets (as the CLI does)."""
    win.close()
    win.deleteLater()
    QApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QApplication.processEvents()


@pytest.fixture(scope="module")
def win(qapp, core, restorer) -> Iterator[LiveWindow]:
    """One window for the tests that do not close it."""
    window = LiveWindow(core, FakeProcessor(restorer))
    window.resize(1500, 860)
    window.show()
    yield window
    close_window(window)


def use(win: LiveWindow, processor: Any) -> Any:
    """Give the shared window a fresh processor and its default view."""
    win.set_processor(processor)
    win.compare_combo.setCurrentText("side by side")
    win.residual_box.setChecked(False)
    return processor


def wait_for_stats(qtbot, win: LiveWindow, text: str, timeout_ms: int = 20000) -> None:
    """Wait until the statistics line shows `text`; on a timeout say what it showed."""
    try:
        qtbot.waitUntil(lambda: text in win.stats_label.text(), timeout=timeout_ms)
    except Exception:
        stats = getattr(win.processor, "stats", None)
        raise AssertionError(
            f"statistics never showed {text!r}: the line reads {win.stats_label.text()!r}; "
            f"processor stats {stats}"
        ) from None


def filled(pane) -> bool:
    plane = pane.shown_plane()
    return plane is not None and bool(np.any(plane))


def test_snap_presets_compare_linked_zoom_and_live(qtbot, win, core, restorer,
                                                  monkeypatch) -> None:
    """Snap (the pymmcore-widgets button), the EPI/TIRF selector both ways, overlay and
    blink, linked zoom, live streaming; the model never runs on the GUI thread."""
    processor = use(win, FakeProcessor(restorer))
    threads: list[int] = []
    restore = restorer.restore

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return restore(*args, **kwargs)

    monkeypatch.setattr(restorer, "restore", recording)
    assert win.devices.illumination.isEnabled() and win.devices.objective is not None
    assert len(win.devices.stages) == 2  # XY stage and focus

    core.setConfig("Illumination", "TIRF")
    combo = win.devices.illumination._combo  # the preset selector follows the rig
    qtbot.waitUntil(lambda: combo.currentText() == "TIRF", timeout=5000)
    qtbot.wait(50)  # and stays there once the property change has settled
    assert combo.currentText() == "TIRF"
    win.snap_button.click()
    qtbot.waitUntil(lambda: filled(win.raw_pane), timeout=20000)
    assert win.ctirf_pane.shown_plane() is None  # a TIRF snap is shown raw only
    assert "TIRF frame shown raw" in win.statusBar().currentMessage()

    combo.setCurrentText("EPI")
    assert core.getCurrentConfig("Illumination") == "EPI"
    win.snap_button.click()
    qtbot.waitUntil(lambda: filled(win.ctirf_pane), timeout=30000)
    assert win.ctirf_pane.buffer.dtype == np.float32
    assert win.ctirf_pane.shown_plane().shape == (ROI, ROI)
    assert threads and threading.get_ident() not in threads  # restored on a worker
    qtbot.waitUntil(lambda: win._mode == "idle" and win.residual_box.isEnabled(), timeout=5000)
    qtbot.waitUntil(lambda: "old" in win.ctirf_pane.info.text(), timeout=5000)
    assert win.raw_pane.scale_bar.pixel_size_um == pytest.approx(0.0975)
    grab(win, "snap")

    # pan/zoom in one pane moves the other (camera state, whether or not it draws)
    qtbot.waitUntil(lambda: win.raw_pane.screen_px_per_data_px() is not None, timeout=5000)
    before = win.ctirf_pane.screen_px_per_data_px()
    win.raw_pane.zoom(2.0)
    win.view_link.sync()
    assert win.raw_pane.screen_px_per_data_px() == pytest.approx(2 * before, rel=0.02)
    assert win.ctirf_pane.screen_px_per_data_px() == pytest.approx(2 * before, rel=0.02)

    win.compare_combo.setCurrentText("overlay")
    compare = win.compare_pane
    assert win.pages.currentWidget() is compare and compare.mode == "overlay"
    overlay = compare.buffer
    np.testing.assert_array_equal(overlay.plane({"c": 1}), win.ctirf_pane.shown_plane())
    assert overlay.plane({"c": 0}).any()  # the raw frame the cTIRF was made from,
    np.testing.assert_array_equal(overlay.plane({"c": 0}), win.raw_pane.shown_plane())  # shown
    win.residual_box.setChecked(True)
    assert overlay.plane({"c": 2}).any()  # |x^ - x| from the same forward pass
    grab(win, "overlay")
    win.compare_combo.setCurrentText("blink")
    first = compare.pane.index().get("c", 0)
    qtbot.waitUntil(lambda: compare.pane.index().get("c", 0) != first, timeout=3000)
    win.compare_combo.setCurrentText("side by side")
    assert win.pages.currentWidget() is win.side_by_side

    win.live_button.click()  # pymmcore-widgets' Live button; the window notices
    qtbot.waitUntil(lambda: win._mode == "live" and processor.live_attached, timeout=5000)
    assert not win.raw_pane.buffer.channels and not win.snap_button.isEnabled()
    qtbot.waitUntil(lambda: "live" in win.stats_label.text(), timeout=3000)
    win.live_button.click()
    qtbot.waitUntil(lambda: win._mode == "idle" and not processor.live_attached, timeout=5000)


def test_mda_editor_run_to_completion_with_z_stacks(qtbot, win, restorer, tmp_path) -> None:
    """Run pressed in pymmcore-widgets' MDA editor with its save box: raw + cTIRF stores,
    per-run statistics, t/z sliders linked, an XZ view; the next run counts from zero."""
    from ctirf_live.inference.writers import read_result

    processor = use(win, LiveProcessor(restorer, policy="record"))
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 2},
                           z_plan={"range": 1.0, "step": 0.2})
    win.mda_widget.setValue(seq)
    win.mda_widget.save_info.setValue({"save_dir": str(tmp_path), "save_name": "exp.ome.tiff",
                                       "format": "ome-tiff", "should_save": True})
    win.mda_widget.control_btns.run_btn.click()
    qtbot.waitUntil(lambda: win._mode == "mda", timeout=5000)
    qtbot.waitUntil(lambda: win._mode == "idle", timeout=60000)
    status = win.statusBar().currentMessage()
    assert "MDA finished" in status and "12 raw frames" in status and "12 of 12 planes" in status
    run_dir = win.run_dir
    assert run_dir.parent == tmp_path and run_dir.name.startswith("exp")
    ctirf, meta = read_result(run_dir / "ctirf.ome.tiff")
    assert ctirf.reshape(-1, ROI, ROI).shape[0] == 12 and meta
    assert (run_dir / "raw.ome.tiff").is_file()
    wait_for_stats(qtbot, win, "processed 12/12")

    assert win.raw_pane.buffer.dims == ("t", "z", "y", "x")
    qtbot.waitUntil(lambda: win.ctirf_pane.index() == {"t": 1, "z": 5}, timeout=10000)  # last
    assert not win.xz_row.isHidden() and win.xz_panes[1].buffer is win.ctirf_pane.buffer
    assert win.xz_panes[1].viewer.display_model.scales["z"] == pytest.approx(0.2 / 0.0975)
    win.raw_pane.viewer.display_model.current_index.update({"t": 0, "z": 2})  # a slider
    assert not win.follow_box.isChecked()
    assert win.ctirf_pane.index() == {"t": 0, "z": 2}  # linked
    win._refresh_status()
    assert win.ctirf_pane.info.text().startswith("t=0 z=2")
    assert win.xz_panes[1].info.text() == f"y={ROI // 2} t=0"  # the row cut, of which stack
    np.testing.assert_allclose(win.ctirf_pane.shown_plane(), ctirf.reshape(2, 6, ROI, ROI)[0, 2])
    grab(win, "mda_z")

    win.run_mda(useq.MDASequence(time_plan={"interval": 0, "loops": 2}))  # counts from 0
    qtbot.waitUntil(lambda: win._mode == "idle", timeout=30000)
    wait_for_stats(qtbot, win, "processed 2/2")
    assert win.xz_row.isHidden() and win.run_dir is None and processor.result_writer is None
    assert win.follow_box.isChecked()  # a new run follows its frames again
    # the newest result reaches the pane on the next display tick after the counters
    qtbot.waitUntil(lambda: win.ctirf_pane.index() == {"t": 1}, timeout=10000)


def test_3d_model_shows_the_stack_with_a_z_slider_and_xz(qtbot, win) -> None:
    use(win, LiveProcessor(tiny_restorer(dims=3), policy="record"))
    win.run_mda(useq.MDASequence(z_plan={"range": 1.0, "step": 0.2}))
    qtbot.waitUntil(lambda: win._mode == "idle", timeout=60000)
    assert win.ctirf_pane.buffer.dims == ("z", "y", "x")

    def restored() -> list:
        return [win.ctirf_pane.buffer.plane({"z": z}) for z in range(6)]

    # the MDA is over before the model has restored its stack: wait for the whole stack
    qtbot.waitUntil(lambda: all(p is not None and p.any() for p in restored()), timeout=60000)
    planes = restored()
    win.ctirf_pane.viewer.display_model.current_index.update({"z": 1})
    assert win.raw_pane.index() == {"z": 1}
    np.testing.assert_array_equal(win.ctirf_pane.shown_plane(), planes[1])
    assert win.xz_panes and win.xz_panes[1].buffer is win.ctirf_pane.buffer


def test_selectors_errors_warnings_and_trust(qtbot, win, restorer, tmp_path) -> None:
    from ctirf_live.models.etnet import save_model

    made: list[tuple[str, str]] = []

    def make(model: str, policy: str) -> FakeProcessor:
        made.append((model, policy))
        return FakeProcessor(restorer, policy)

    run = tmp_path / "runs" / "rig2_finetune"
    run.mkdir(parents=True)
    path = save_model(restorer.model, run / "best.safetensors")
    first = use(win, FakeProcessor(Restorer(path, device="cpu", tile=ROI)))
    win._make_processor = make
    assert win.model_combo.currentData() == str(path)
    assert win.model_combo.currentText().startswith("rig2_finetune")  # the run, not "best"
    assert win.warning_label.isHidden()  # 97.5 nm model on the 97.5 nm rig

    win.policy_combo.setCurrentIndex(1)
    win.policy_combo.activated.emit(1)
    assert first.policy == "record" and not made  # a policy change keeps the processor

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    win._make_processor = None  # the default factory loads a real checkpoint
    win.model_combo.insertItem(0, "bad", str(bad))
    win.model_combo.activated.emit(0)
    assert win.processor is first and "could not load model" in win.statusBar().currentMessage()

    win._make_processor = make
    other = save_model(restorer.model, tmp_path / "other.safetensors")
    win.model_combo.insertItem(0, "other", str(other))
    win.model_combo.activated.emit(0)
    assert made == [(str(other), "record")] and first.stopped and win.processor is not first
    first.resultReady.emit(None, np.ones((8, 8), np.float32), None)  # disconnected now
    assert win._inbox.take() == ([], [])

    win.processor.errorOccurred.emit("model crashed on frame 3")
    win.processor.stats = Stats(processed=5, acquired=5, consistency_frames=5,
                                consistency_flagged=2,
                                consistency_last={"residual": 0.9, "flagged": True,
                                                  "reason": "residual 0.9 > 0.3"})
    win._refresh_status()
    assert "model crashed" in win.statusBar().currentMessage()
    assert "not trusted" in win.trust_label.text() and "residual 0.9" in win.trust_label.toolTip()
    assert "processed 5/5" in win.stats_label.text()

    use(win, FakeProcessor(tiny_restorer(pixel_size_um=0.065)))
    win._refresh_status()
    assert not win.warning_label.isHidden() and "65.0 nm" in win.warning_label.text()
    win._make_processor = None


def open_window(qtbot, core, processor, register: bool = True) -> LiveWindow:
    """A window of its own (`register`: pytest-qt closes it after the test)."""
    win = LiveWindow(core, processor)
    if register:
        qtbot.addWidget(win)
    win.resize(1200, 700)
    win.show()
    qtbot.waitExposed(win)
    return win


def test_close_during_mda_cancels_it_and_stops_all_drawing(qtbot, core, restorer,
                                                           tmp_path) -> None:
    import tifffile

    processor = LiveProcessor(restorer, policy="record")
    win = open_window(qtbot, core, processor, register=False)  # deleted here
    loops = 400
    win.run_mda(useq.MDASequence(time_plan={"interval": 0.05, "loops": loops},
                                 z_plan={"range": 0.2, "step": 0.2}),
                save_to=tmp_path / "run.ome.tiff")
    assert not win.snap_button.isEnabled()
    qtbot.waitUntil(core.mda.is_running, timeout=10000)  # the runner thread starts it
    qtbot.waitUntil(lambda: filled(win.ctirf_pane) and filled(win.xz_panes[1]), timeout=30000)
    panes = [win.raw_pane, win.ctirf_pane, *win.xz_panes]
    close_window(win)
    assert not core.mda.is_running() and not processor.running
    assert all(p.disposed and p.buffer is None for p in panes)
    acquired = processor.stats.acquired
    assert 0 < acquired < 2 * loops  # cancelled, not run to the end
    with tifffile.TiffFile(tmp_path / "run" / "raw.ome.tiff") as tf:
        pages, series = len(tf.pages), [s.shape for s in tf.series]
    assert pages >= acquired, f"{acquired} frames counted, {pages} pages on disk ({series})"
    # the closed window's widgets are off the core: changes to it reach no deleted widget
    core.setConfig("Illumination", "TIRF")
    core.setConfig("Illumination", "EPI")
    core.setExposure(21)
    core.setPosition(core.getPosition() + 0.2)
    qtbot.wait(300)  # render timers would fire here: nothing may draw any more


class Held:
    """A real Restorer whose restore() waits for a gate (a model that is very slow)."""

    def __init__(self, restorer: Restorer, gate) -> None:
        self._r, self.gate = restorer, gate

    def __getattr__(self, name: str):
        return getattr(self._r, name)

    def restore(self, image: np.ndarray, **kwargs) -> np.ndarray:
        self.gate.wait(60)
        return self._r.restore(image, **kwargs)


def test_closing_during_a_record_run_never_hangs(qtbot, core, restorer, tmp_path) -> None:
    """The MDA is over, the model is stuck: no "saved" yet, and closing keeps its deadline."""
    gate = threading.Event()
    processor = LiveProcessor(Held(restorer, gate), policy="record",  # type: ignore[arg-type]
                              spill_dir=tmp_path / "spill")
    win = open_window(qtbot, core, processor)
    try:
        win.run_mda(useq.MDASequence(time_plan={"interval": 0, "loops": 6}),
                    save_to=tmp_path / "run.ome.tiff")
        qtbot.waitUntil(lambda: not core.mda.is_running() and not win._worker_alive(),
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
    """-s fills the MDA editor and -o its save box (-s must not clear -o)."""
    from qtpy.QtCore import QTimer
    from typer.testing import CliRunner

    from ctirf_live.cli import app
    from ctirf_live.models.etnet import save_model

    model = save_model(restorer.model, tmp_path / "tiny.safetensors")
    seq = tmp_path / "seq.yaml"
    seq.write_text(useq.MDASequence(time_plan={"interval": 0, "loops": 3}).yaml())
    seen: list[Any] = []
    before = [w for w in QApplication.topLevelWidgets() if isinstance(w, LiveWindow) and isalive(w)]

    def close_window() -> None:  # what a user does: look, then close the window
        for w in QApplication.topLevelWidgets():
            if isinstance(w, LiveWindow) and w.isVisible() and w not in before:
                seen.append((w.model_combo.currentData(), w.mda_widget.value().sizes.get("t"),
                             w.mda_widget.save_info.value()["save_dir"]))
                w.close()

    QTimer.singleShot(300, close_window)
    guard = QTimer()  # never hang the suite if the window failed to close
    guard.setSingleShot(True)
    guard.timeout.connect(QApplication.quit)
    guard.start(30000)
    result = CliRunner().invoke(app, ["live", "--config", str(DEMO_CFG), "--model", str(model),
                                      "--device", "cpu", "-s", str(seq), "-o", str(tmp_path)])
    guard.stop()
    assert result.exit_code == 0, result.output
    assert seen == [(str(model), 3, str(tmp_path))]
    after = [w for w in QApplication.topLevelWidgets() if isinstance(w, LiveWindow) and isalive(w)]
    assert after == [w for w in before if isalive(w)]  # the CLI's window is gone
