"""The live window's parts that need no window: buffers, scale bar, statistics, models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ndv")
pytest.importorskip("pymmcore_widgets")

from ctirf_live.gui.buffers import Inbox, PlaneBuffer, describe_index
from ctirf_live.gui.controls import run_folder_and_format
from ctirf_live.gui.panes import ScaleBar, format_age, format_length, nice_length
from ctirf_live.gui.stats import RunStats, stats_text, trust


def test_plane_buffer_reads_planes_and_zeros_for_missing() -> None:
    buf = PlaneBuffer({"t": 3, "c": 2, "z": 4}, (8, 10), np.uint16, channels=("EPI", "TIRF"))
    assert buf.dims == ("t", "c", "z", "y", "x") and buf.shape == (3, 2, 4, 8, 10)
    assert buf.coords["c"] == ["EPI", "TIRF"]
    assert buf.put({"t": 1, "c": 0, "z": 2}, np.full((8, 10), 7))
    assert not buf.put({"t": 0}, np.ones((9, 10)))  # another frame size is refused
    np.testing.assert_array_equal(buf[1, 0, 2], np.full((8, 10), 7))
    assert not buf[0, 0, 0].any() and buf[1, 0, 2].dtype == np.uint16
    xz = buf[1, 0, :, 3, :]  # what an XZ view asks for: all z at one y
    assert xz.shape == (4, 10) and (xz[2] == 7).all() and not xz[[0, 1, 3]].any()
    assert np.asarray(buf).shape == buf.shape


def test_plane_buffer_stacks_and_budget() -> None:
    buf = PlaneBuffer({"t": 10, "z": 3}, (4, 4), np.float32, budget_bytes=4 * 16 * 4)
    stack = np.arange(48, dtype=np.float32).reshape(3, 4, 4)
    assert buf.put_stack({"t": 0, "z": 2}, stack)  # a stack's z is its own
    np.testing.assert_array_equal(buf[0], stack)
    buf.put_stack({"t": 1}, stack)
    assert buf.nbytes <= 4 * 16 * 4
    assert not buf.has({"t": 0, "z": 0}) and buf.has({"t": 1, "z": 2})  # oldest gave way
    with pytest.raises(ValueError, match="2D"):
        PlaneBuffer({}, (4,))


def test_inbox_hands_over_in_order() -> None:
    inbox = Inbox(maxlen=2)
    for i in range(3):
        inbox.put_raw(np.full((2, 2), i))
    inbox.put_result(None, np.zeros((2, 2)), "event")
    raw, results = inbox.take()
    assert [int(r.data[0, 0]) for r in raw] == [1, 2] and results[0].event == "event"
    assert inbox.take() == ([], [])
    assert describe_index({"t": 3, "z": 1, "c": 0}, "EPI") == "t=3 z=1 EPI"


def test_scale_bar_lengths() -> None:
    assert nice_length(7.3) == 5 and nice_length(0.26) == 0.2 and nice_length(10) == 10
    assert format_length(0.5) == "500 nm" and format_length(20) == "20 µm"
    assert format_age(0.42) == "0.4 s old" and format_age(None) == ""


def test_scale_bar_follows_zoom(qtbot) -> None:
    bar = ScaleBar()
    qtbot.addWidget(bar)
    bar.resize(500, 20)
    bar.update_scale(None, 2.0)
    assert bar.bar() is None
    bar.update_scale(0.0975, 2.0)  # 97.5 nm pixels, 2 screen px each: 4.9 µm in 100 px
    length_um, length_px = bar.bar()
    assert length_um == 2 and length_px == pytest.approx(2 / 0.0975 * 2.0)
    bar.update_scale(0.0975, 8.0)  # zoomed in 4x: a shorter bar of a round length
    assert bar.bar()[0] == 1


def test_panes_slice_on_the_gui_thread(qtbot, monkeypatch) -> None:
    """ndv's thread pool moved QObjects across threads and deadlocked the window: a pane's
    slices are read on the thread that asks, and drawn before refresh returns."""
    import threading

    import ndv.controllers._array_viewer as array_viewer

    from ctirf_live.gui.panes import ImagePane

    monkeypatch.setenv("NDV_CANVAS_BACKEND", "vispy")
    threads: list[int] = []
    real = array_viewer.process_request

    def recording(req):
        threads.append(threading.get_ident())
        return real(req)

    monkeypatch.setattr(array_viewer, "process_request", recording)
    pane = ImagePane("raw")
    qtbot.addWidget(pane)
    buf = PlaneBuffer({"t": 2}, (16, 16), np.uint16)
    pane.set_buffer(buf)
    buf.put({"t": 1}, np.full((16, 16), 9))
    pane.set_index({"t": 1})
    pane.refresh()
    assert threads and set(threads) == {threading.get_ident()}
    assert pane.viewer._is_idle()  # nothing left in flight for a later callback
    pane.dispose()


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
    ignored: int = 0
    consistency_frames: int = 0
    consistency_flagged: int = 0
    consistency_last: dict[str, Any] = field(default_factory=dict)


def test_run_stats_start_from_zero_at_each_run() -> None:
    run = RunStats()
    run.reset(Stats())
    assert "processed 0/0" in stats_text("mda", Stats(), run)
    assert "latency" not in stats_text("mda", Stats(), run)  # nothing of this run yet
    later = Stats(acquired=16, processed=13, skipped=3, errors=1)
    text = stats_text("mda", later, run)
    assert "processed 5/6" in text and "skipped 1" in text and "errors 1" in text
    assert "12.5 fps" in text and "p50 41 ms" in text and "p95 77 ms" in text
    assert "queue 1" in text


def test_trust_indicator_reads_what_the_processor_reports() -> None:
    assert trust(object()).level == "unknown"  # a processor without consistency fields
    assert trust(Stats()).level == "unknown"  # monitor off: empty scores
    scores = {"residual": 0.2, "in_focus": 0.6}
    assert trust(Stats(consistency_last={**scores, "flagged": None})).level == "uncalibrated"
    run = RunStats()
    run.reset(Stats(consistency_frames=10, consistency_flagged=4))
    ok = trust(Stats(consistency_frames=15, consistency_flagged=4,
                     consistency_last={**scores, "flagged": False}), run)
    assert ok.level == "ok" and "0 of 5 planes" in ok.tooltip
    bad = trust(Stats(consistency_frames=15, consistency_flagged=6,
                      consistency_last={**scores, "flagged": True, "reason": "residual high"}), run)
    assert bad.level == "flagged" and "(2)" in bad.text and "residual high" in bad.tooltip


def test_run_folder_and_format() -> None:
    assert run_folder_and_format("/d/exp_001.ome.tiff") == (Path("/d/exp_001"), "ome-tiff")
    assert run_folder_and_format("/d/exp.ome.zarr") == (Path("/d/exp"), "ome-zarr")
    with pytest.raises(ValueError, match="ome-tiff or ome-zarr"):
        run_folder_and_format("/d/exp")


def test_local_models_are_listed_by_run_folder(tmp_path, monkeypatch) -> None:
    import torch

    from ctirf_live.config import Optics
    from ctirf_live.gui.model_list import model_entries, search_folders
    from ctirf_live.models.etnet import ET2dNet, save_model

    torch.manual_seed(0)
    net = ET2dNet(Optics(objective="60X", pixel_size_um=0.0975), "tiny")
    run = tmp_path / "runs" / "rig2_finetune"
    run.mkdir(parents=True)
    best = save_model(net, run / "best.safetensors")
    save_model(net, run / "last.safetensors")
    monkeypatch.chdir(tmp_path)
    entries = model_entries(search_folders(best))
    local = [e for e in entries if e.path.parent == run]
    assert [e.path.name for e in local] == ["best.safetensors"]  # no separate "last"
    assert local[0].label.startswith("rig2_finetune (60X, 98 nm")
    assert not any("best" in e.label for e in entries)
