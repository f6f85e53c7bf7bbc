"""`acquire` under faults: a full disk, Ctrl-C, lost raw writes, bad plans and sequences."""

from __future__ import annotations

import json
import threading
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import useq
from conftest import DEMO_CFG

from ctirf_live.acquisition.core import open_core
from ctirf_live.acquisition.limits import StageLimits, stage_limits
from ctirf_live.config import ConfigError, Optics
from ctirf_live.inference import diskspace
from ctirf_live.inference.acquire import AcquireError, acquire, load_sequence
from ctirf_live.inference.diskspace import DiskBudget, DiskFullError
from ctirf_live.inference.live import LiveStats
from ctirf_live.inference.rawstore import count_raw_frames
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.writers import read_result
from ctirf_live.models.etnet import ET2dNet

ROI = 64
MIB = 2**20
Usage = namedtuple("Usage", "total used free")


class Slow:
    """A real Restorer whose restore() takes at least `delay_s`."""

    def __init__(self, restorer: Restorer, delay_s: float) -> None:
        self._r, self.delay_s = restorer, delay_s

    def __getattr__(self, name: str):
        return getattr(self._r, name)

    def restore(self, image: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return self._r.restore(image)


@pytest.fixture(scope="module")
def tiny2d() -> Restorer:
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=128, overlap=32)


@pytest.fixture(scope="module")
def rig() -> Iterator:
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        yield core


@pytest.fixture
def core(rig) -> Iterator:
    rig.setExposure(2)
    rig.setROI(992, 992, ROI, ROI)
    rig.setConfig("Illumination", "EPI")
    yield rig
    assert not rig.mda.is_running()


def _seq(loops: int, interval: float = 0.0) -> useq.MDASequence:
    return useq.MDASequence(time_plan={"interval": interval, "loops": loops},
                            channels=[{"config": "EPI", "exposure": 2}])


def _fake_disk(monkeypatch, free: callable) -> None:
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda p: Usage(10**12, 0, free()))


# -- disk space -----------------------------------------------------------------------


def test_budget_keeps_room_for_the_raw_frames_to_come(monkeypatch, tmp_path: Path) -> None:
    free = [1000 * MIB]
    _fake_disk(monkeypatch, lambda: free[0])
    done = [0]
    budget = DiskBudget(tmp_path, MIB, 500, lambda: done[0], reserve_bytes=64 * MIB)
    assert budget.check_start(ctirf_bytes=2000 * MIB)  # raw fits, cTIRF will not: a warning
    assert not budget.allows(500 * MIB) and budget.allows(100 * MIB)
    done[0] = 400  # 100 raw frames still due
    assert budget.allows(800 * MIB) and not budget.raw_in_danger()
    free[0] = 50 * MIB
    assert budget.raw_in_danger() and not budget.allows(1)
    with pytest.raises(DiskFullError, match="free space or choose another --out"):
        DiskBudget(tmp_path, MIB, 2000).check_start()


def test_a_run_that_cannot_fit_is_refused_before_anything_moves(core, tiny2d, tmp_path: Path,
                                                                monkeypatch) -> None:
    _fake_disk(monkeypatch, lambda: 10 * MIB)
    xy = core.getXYPosition()
    with pytest.raises(DiskFullError, match="not enough disk space"):
        acquire(core, _seq(4), tiny2d, tmp_path / "run")
    assert not (tmp_path / "run").exists() and core.getXYPosition() == xy


def test_disk_filling_up_stops_the_run_and_keeps_every_raw_frame(core, tiny2d, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """The disk "fills" after frame 5; the run's free-space watch (polled by the caller's
    thread every 0.1 s) must stop the MDA there, with every raw frame so far saved.

    The runner is held before its 6th event until the watch has seen the full disk and
    cancelled the MDA (through the engine's event iterator, on the acquisition thread
    whatever the signal backend): a watch starved of CPU for the ~2 s the other frames
    take would otherwise let the run complete first, with nothing to stop ("did not
    raise"), and a runner let go before the cancel would take a 6th frame.
    """
    started, canceled = [0], threading.Event()
    cancel = core.mda.cancel
    engine_iterator = getattr(core.mda.engine, "event_iterator", iter)

    def cancel_seen() -> None:
        cancel()
        canceled.set()

    def held(events):
        for event in engine_iterator(events):
            if started[0] == 5:
                canceled.wait(120)
            started[0] += 1
            yield event

    monkeypatch.setattr(core.mda, "cancel", cancel_seen)
    monkeypatch.setattr(core.mda.engine, "event_iterator", held, raising=False)
    _fake_disk(monkeypatch, lambda: 10**11 if started[0] < 5 else 10 * MIB)
    with pytest.raises(AcquireError, match="disk full") as err:
        acquire(core, _seq(200, 0.01), tiny2d, tmp_path / "run", fmt="ome-zarr")
    assert canceled.is_set()
    result = err.value.result
    assert result.frames_acquired == 5  # stopped at the event the watch saw it in
    assert result.raw_frames_saved == result.frames_acquired == count_raw_frames(result.raw_path)
    assert len(str(err.value).splitlines()) == 1
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "failed" and summary["failed"].startswith("disk full")
    assert summary["raw_frames_saved"] == result.frames_acquired
    _, meta = read_result(result.ctirf_path)  # the cTIRF store is closed and readable
    assert meta["processed"].count("1") == summary["ctirf_planes_saved"]


def test_ctirf_results_give_way_to_raw_frames(core, tiny2d, tmp_path: Path, monkeypatch) -> None:
    """Room for the raw frames but not for cTIRF: raw complete, cTIRF planes honestly counted."""
    frame, frames = ROI * ROI * 2, [0]

    def count(*args) -> None:
        frames[0] += 1

    # the disk holds the raw frames, the margin and one frame more: never a cTIRF plane
    _fake_disk(monkeypatch, lambda: (7 - frames[0]) * frame + diskspace.RESERVE_BYTES
               + diskspace.RESERVE_FRAMES * frame)
    core.mda.events.frameReady.connect(count)
    try:
        result = acquire(core, _seq(6), tiny2d, tmp_path / "run")
    finally:
        core.mda.events.frameReady.disconnect(count)
    assert result.raw_frames_saved == 6 and result.stats.errors == 6
    assert result.ctirf_planes_saved == 0 and result.ctirf_planes == 6
    assert any("disk space is kept for raw frames" in e for e in result.errors)
    assert any("cTIRF saving stops" in w for w in result.warnings)


def test_a_raw_write_that_fails_is_an_error_not_exit_0(core, tiny2d, tmp_path: Path,
                                                       monkeypatch) -> None:
    """A raw write lost without an exception (tensorstore futures): the run must not pass."""
    from ome_writers._backends._tensorstore import TensorstoreBackend

    original = TensorstoreBackend._write

    def flaky(self, array, index, frame):
        if index[0] < 3:  # later writes are lost as a failed future would lose them
            original(self, array, index, frame)

    monkeypatch.setattr(TensorstoreBackend, "_write", flaky)
    with pytest.raises(AcquireError, match="raw frames are missing") as err:
        acquire(core, _seq(6), tiny2d, tmp_path / "run", fmt="ome-zarr")
    assert err.value.result.raw_frames_saved == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["raw_frames_saved"] == 3 and summary["status"] == "failed"


def test_spill_files_give_way_and_memory_stays_bounded(tmp_path: Path) -> None:
    from ctirf_live.inference.backlog import Backlog, WorkItem

    backlog = Backlog("record", 2, tmp_path / "spill", space_check=lambda n: False)
    dropped = [backlog.put(WorkItem(np.zeros((8, 8)), {"t": i}, None, 0.0)) for i in range(5)]
    assert [len(d) for d in dropped] == [0, 0, 1, 1, 1] and backlog.depth == 2
    assert "kept for raw frames" in backlog.spill_error
    assert not (tmp_path / "spill").exists()


# -- Ctrl-C -----------------------------------------------------------------------------


def _interrupt_at(n: int, phases: tuple[str, ...] = ("acquiring",), times: int = 1):
    seen: list[str] = []

    def progress(stats: LiveStats, frames: int, total: int, phase: str) -> None:
        seen.append(phase)
        if phase in phases and frames >= n and seen.count("^C") < times:
            seen.append("^C")
            raise KeyboardInterrupt

    return progress, seen


def test_ctrl_c_waits_for_the_mda_and_finishes_the_record_queue(core, tiny2d,
                                                                  tmp_path: Path) -> None:
    progress, seen = _interrupt_at(4)
    model = Slow(tiny2d, 0.05)
    result = acquire(core, _seq(60, 0.01), model, tmp_path / "run", progress=progress)
    assert not core.mda.is_running() and result.canceled
    assert 4 <= result.frames_acquired < 60
    raw_on_disk = count_raw_frames(result.raw_path)
    assert raw_on_disk == result.frames_acquired == result.raw_frames_saved
    assert result.stats.processed == result.frames_acquired  # record: the queue is finished
    assert "finishing" in seen and result.unprocessed == 0
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "canceled" and summary["stats"]["acquired"] == raw_on_disk


def test_a_second_ctrl_c_drops_the_queue_and_counts_it(core, tiny2d, tmp_path: Path) -> None:
    progress, _ = _interrupt_at(4, ("acquiring", "finishing"), times=2)
    model = Slow(tiny2d, 0.1)
    result = acquire(core, _seq(60, 0.01), model, tmp_path / "run", progress=progress)
    s = result.stats
    assert result.unprocessed > 0 and s.processed + s.skipped + s.errors == s.acquired
    summary = json.loads(result.summary_path.read_text())
    assert summary["unprocessed_at_stop"] == result.unprocessed
    _, meta = read_result(result.ctirf_path)
    assert meta["processed"].count("1") == s.processed


def test_interrupt_inside_the_wait_never_trusts_is_alive(core, tiny2d, tmp_path: Path,
                                                         monkeypatch) -> None:
    """Ctrl-C lands inside the waiting call itself (where `join` would make is_alive lie)."""
    real_wait = threading.Event.wait
    calls = [0]

    def wait(self, timeout=None):
        if threading.current_thread() is threading.main_thread():
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
        return real_wait(self, timeout)

    monkeypatch.setattr(threading.Event, "wait", wait)
    result = acquire(core, _seq(200, 0.01), tiny2d, tmp_path / "run", policy="preview")
    monkeypatch.undo()
    assert result.canceled and not core.mda.is_running()
    assert count_raw_frames(result.raw_path) == result.frames_acquired < 200


def test_releasing_the_core_never_unloads_under_a_running_mda(tmp_path: Path) -> None:
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setROI(992, 992, ROI, ROI)
        core.run_mda(useq.MDASequence(time_plan={"interval": 0.01, "loops": 500}))
        deadline = time.monotonic() + 30
        while not core.mda.is_running() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.mda.is_running()
        unloaded: list[bool] = []
        original = core.unloadAllDevices
        core.unloadAllDevices = lambda: (unloaded.append(core.mda.is_running()), original())
    assert unloaded == [False]


# -- plans and sequences ----------------------------------------------------------------


def test_positions_outside_the_stage_limits_are_refused(core, tiny2d, tmp_path: Path) -> None:
    limits = stage_limits(core, DEMO_CFG)
    assert limits.z == (-2000, 2000) and limits.x == (-30000, 30000)
    far = useq.MDASequence(stage_positions=[{"x": 0, "y": 0}, {"x": 1e9, "y": 0}])
    with pytest.raises(ConfigError, match=r"x = 1e\+09 um is outside the stage limits"):
        acquire(core, far, tiny2d, tmp_path / "a", limits=limits)
    deep = useq.MDASequence(z_plan={"range": 1e6, "step": 1e5})
    with pytest.raises(ConfigError, match="z = "):
        acquire(core, deep, tiny2d, tmp_path / "b", limits=limits)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="not a finite number"):
        StageLimits().check("z", float("nan"))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("z_plna: {range: 1, step: 0.2}\n", "z_plna"),
        ("channels:\n  - {config: EPI, exposre: 5}\n", "channels[0].exposre"),
        ("time_plan: {interval: 0, loops: 2, loop: 3}\n", "time_plan.loop"),
    ],
)
def test_unknown_sequence_keys_are_named(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "seq.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="unknown key") as err:
        load_sequence(path)
    assert named in str(err.value)


def test_validation_errors_name_the_field_and_grid_sub_sequences_load(tmp_path: Path) -> None:
    path = tmp_path / "seq.yaml"
    path.write_text("channels: [{config: EPI, exposure: fast}]\n")
    with pytest.raises(ValueError, match="exposure") as err:
        load_sequence(path)
    assert "validation error" not in str(err.value)
    path.write_text(
        "stage_positions:\n"
        "  - {x: 0, y: 0, sequence: {grid_plan: {rows: 1, columns: 2, fov_width: 5,"
        " fov_height: 5}}}\n"
        "  - {x: 20, y: 0}\n"
        "channels: [{config: EPI, exposure: 2}]\n"
    )
    assert sum(1 for _ in load_sequence(path)) == 3


def test_grid_sub_sequence_run_stores_every_tile(core, tiny2d, tmp_path: Path) -> None:
    seq = useq.MDASequence(
        channels=[{"config": "EPI", "exposure": 2}],
        stage_positions=[
            {"x": 0, "y": 0, "sequence": {"grid_plan": {"rows": 1, "columns": 2,
                                                        "fov_width": 5, "fov_height": 5}}},
            {"x": 20, "y": 0},
        ],
    )
    result = acquire(core, seq, tiny2d, tmp_path / "run", fmt="ome-zarr")
    assert result.stats.errors == 0 and result.stats.processed == 3
    for pos in range(3):
        data, meta = read_result(result.ctirf_path, position=pos)
        assert meta["processed"] == "1" and data.max() > 0



@pytest.mark.parametrize("fmt", ["ome-zarr", "ome-tiff"])
def test_an_acquired_z_stack_run_is_distillation_data(core, tiny2d, tmp_path: Path, fmt) -> None:
    """ET3dNet's data (b): the raw store `ctirf acquire` writes, OME-Zarr or OME-TIFF, is
    read by `ctirf distill --stacks` as 6-plane stacks with the run's z step and pixels."""
    pytest.importorskip("dask")
    from ctirf_live.cli import _read_stack_file, _stack_files
    from ctirf_live.data.stacks import stacks_from_files

    seq = useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        z_plan={"range": 1.0, "step": 0.2},
        channels=[{"config": "EPI", "exposure": 2}],
    )
    result = acquire(core, seq, tiny2d, tmp_path / "run", fmt=fmt)
    assert result.frames_acquired == 12
    files = _stack_files(result.out_dir)  # the run folder: its raw store, not the cTIRF
    assert files == [result.raw_path]
    data = stacks_from_files(files, planes=6, reader=_read_stack_file)
    assert len(data) == 2 and data.stacks[0].epi.shape == (6, ROI, ROI)
    assert data.z_step_um == pytest.approx(0.2)
    assert data.optics.pixel_size_um == pytest.approx(core.getPixelSizeUm())
    assert data.stacks[0].epi.std(axis=(1, 2)).min() > 0  # real frames, not padding
