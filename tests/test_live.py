"""The live processing hook: policies, stacks, faults, MDA storage and `ctirf acquire`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import tifffile
import torch
import useq
from conftest import DEMO_CFG
from typer.testing import CliRunner

from ctirf_live.acquisition.core import open_core
from ctirf_live.cli import app
from ctirf_live.config import Optics
from ctirf_live.inference.acquire import acquire
from ctirf_live.inference.backlog import Backlog, StackAssembler, WorkItem
from ctirf_live.inference.live import LiveProcessor, LiveStats
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.runners import make_runner, restore_tensor
from ctirf_live.inference.writers import OmeTiffResultWriter, OmeZarrResultWriter, read_result
from ctirf_live.models.etnet import ET2dNet, ET3dNet, save_model

ROI = 64
EPI_TIRF = [{"config": "EPI", "group": "Illumination"}, {"config": "TIRF", "group": "Illumination"}]
GATE_TIMEOUT_S = 60


class FakeRestorer:
    """The Restorer surface LiveProcessor uses; optionally held by a gate or failing."""

    def __init__(self, dims: int = 2, gate: threading.Event | None = None) -> None:
        self.dims, self.gate = dims, gate
        self.device = torch.device("cpu")
        self.calls, self.threads = 0, set()
        self.entered = threading.Event()
        self.fail_from: int | None = None
        self.nan = False

    def restore(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.threads.add(threading.get_ident())
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(GATE_TIMEOUT_S), "gate never opened"
        if self.fail_from is not None and self.calls >= self.fail_from:
            raise RuntimeError("boom")
        out = np.asarray(image, np.float32) * 2
        return out * np.nan if self.nan else out

    def warmup(self, shape) -> None: ...

    def describe(self) -> dict:
        return {"model": "fake"}


class Wrapped:
    """A real Restorer whose restore() can be held by a gate or made to fail."""

    def __init__(self, restorer: Restorer, gate: threading.Event | None = None,
                 fail_from: int | None = None) -> None:
        self._r, self.gate, self.fail_from, self.calls = restorer, gate, fail_from, 0

    def __getattr__(self, name: str):
        return getattr(self._r, name)

    def restore(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(GATE_TIMEOUT_S), "gate never opened"
        if self.fail_from is not None and self.calls >= self.fail_from:
            raise RuntimeError("model exploded")
        return self._r.restore(image)


@pytest.fixture(scope="module")
def tiny2d() -> Restorer:
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=128, overlap=32)


@pytest.fixture(scope="module")
def tiny3d() -> Restorer:
    torch.manual_seed(1)
    return Restorer(ET3dNet(Optics(), "tiny"), device="cpu", tile=128, overlap=32)


@pytest.fixture(scope="module")
def demo_rig() -> Iterator:
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        yield core


@pytest.fixture
def core(demo_rig) -> Iterator:
    """The module's rig with a small ROI, set per test: opening another demo core (the CLI
    test) replaces the shared simulated microscope and its ROI."""
    demo_rig.setExposure(5)
    demo_rig.setROI(992, 992, ROI, ROI)
    demo_rig.setConfig("Illumination", "EPI")
    yield demo_rig


def _events(n: int, channels=None, z: bool = False) -> list[useq.MDAEvent]:
    seq = useq.MDASequence(
        time_plan={"interval": 0, "loops": n},
        channels=channels or [],
        z_plan={"range": 1.0, "step": 0.2} if z else None,
    )
    return list(seq)


def _frame(seed: int = 0, shape=(ROI, ROI)) -> np.ndarray:
    return np.random.default_rng(seed).poisson(200, shape).astype(np.uint16)


def _feed(p: LiveProcessor, events, shape=(ROI, ROI)) -> None:
    seq = events[0].sequence
    p.sequenceStarted(seq, {"image_infos": [{"height": shape[0], "width": shape[1]}]})
    for i, ev in enumerate(events):
        p.frameReady(_frame(i, shape), ev, {})
    p.sequenceFinished(seq)


def _settled(stats: LiveStats) -> bool:
    return stats.acquired == stats.processed + stats.skipped + stats.errors


# -- the queue and the policies, without a microscope -----------------------------------


def test_preview_keeps_only_the_newest_frame_and_never_blocks() -> None:
    gate = threading.Event()
    model = FakeRestorer(gate=gate)
    results = []
    with LiveProcessor(model, policy="preview") as p:  # type: ignore[arg-type]
        p.resultReady.connect(lambda raw, res, ev: results.append(ev.index["t"]))
        events = _events(6)
        p.sequenceStarted(events[0].sequence, {})
        p.frameReady(_frame(0), events[0], {})
        assert model.entered.wait(30)  # the model now holds frame 0 ...
        for i, ev in enumerate(events[1:], 1):  # ... and every frameReady returns anyway
            p.frameReady(_frame(i), ev, {})
        p.sequenceFinished(events[0].sequence)
        assert p.stats.acquired == 6 and p.stats.queue_depth == 1
        gate.set()
        assert p.wait_until_idle(30)
    stats = p.stats
    assert threading.get_ident() not in model.threads  # the model never ran on the caller
    assert stats.processed == 2 and stats.skipped == 4 and _settled(stats)
    assert results == [0, 5]  # the first frame (already running) and the newest
    raw, result, event = p.latest()
    np.testing.assert_allclose(result, raw * 2.0)
    assert event.index["t"] == 5


def test_record_spills_to_disk_and_processes_every_frame(tmp_path: Path) -> None:
    gate = threading.Event()
    spill = tmp_path / "spill"
    with LiveProcessor(FakeRestorer(gate=gate), policy="record", queue_size=2,  # type: ignore[arg-type]
                       spill_dir=spill) as p:
        _feed(p, _events(8))
        assert p.stats.spilled >= 4 and len(list(spill.glob("*.npy"))) >= 4
        gate.set()
        assert p.wait_until_idle(30)
    stats = p.stats
    assert stats.processed == 8 and stats.skipped == 0 and stats.queue_depth == 0
    assert list(spill.glob("*.npy")) == []  # spill files are removed once processed


def test_backlog_spill_round_trip_and_order(tmp_path: Path) -> None:
    backlog = Backlog("record", queue_size=1, spill_dir=tmp_path)
    frames = [_frame(i, (8, 8)) for i in range(3)]
    for i, f in enumerate(frames):
        backlog.put(WorkItem(f, {"t": i}, None, 0.0))
    assert backlog.depth == 3 and backlog.on_disk == 2 and backlog.spilled == 2
    got = [backlog.get(0) for _ in range(3)]
    assert [g.index["t"] for g in got] == [0, 1, 2]
    for g, f in zip(got, frames, strict=True):
        np.testing.assert_array_equal(g.load(), f)
    with pytest.raises(ValueError, match="policy"):
        Backlog("fast")  # type: ignore[arg-type]


def test_stack_assembler_groups_by_index_without_z() -> None:
    asm = StackAssembler()
    events = _events(2, channels=EPI_TIRF, z=True)  # t, c, z order: planes arrive in turn
    done = []
    for i, ev in enumerate(events):
        item = asm.add(ev.index, np.full((4, 4), i), ev, float(i), planes=6)
        if item is not None:
            done.append(item)
    assert len(done) == 4 and asm.pending_frames == 0
    assert done[0].index == {"t": 0, "c": 0} and done[0].data.shape == (6, 4, 4)
    assert done[0].n_frames == 6 and [p[0, 0] for p in done[0].data] == list(range(6))


def test_stack_mode_sends_whole_stacks_of_the_processed_channel() -> None:
    model = FakeRestorer(dims=3)
    with LiveProcessor(model, policy="record") as p:  # type: ignore[arg-type]
        assert p.stack_mode
        _feed(p, _events(2, channels=EPI_TIRF, z=True))
        assert p.wait_until_idle(30)
    stats = p.stats
    assert model.calls == 2  # one call per EPI stack
    assert stats.processed == 12 and stats.ignored == 12 and _settled(stats)
    raw, result, _ = p.latest()
    assert raw.shape == result.shape == (6, ROI, ROI)


def test_faults_are_counted_and_reported_once() -> None:
    model = FakeRestorer()
    model.fail_from = 3
    messages: list[str] = []
    with LiveProcessor(model, policy="record") as p:  # type: ignore[arg-type]
        p.errorOccurred.connect(messages.append)
        _feed(p, _events(6))
        assert p.wait_until_idle(30)
        assert p.stats.processed == 2 and p.stats.errors == 4
        # NaN output and frames of a different size are errors for those frames only
        model.fail_from, model.nan = None, True
        seq = _events(1)[0].sequence
        p.sequenceStarted(seq, {"image_infos": [{"height": ROI, "width": ROI}]})
        p.frameReady(_frame(1), _events(1)[0], {})
        p.frameReady(_frame(2, (ROI, 2 * ROI)), _events(1)[0], {})
        p.sequenceFinished(seq)
        assert p.wait_until_idle(30)
    stats = p.stats
    assert stats.errors == 6 and stats.processed == 2 and _settled(stats)
    assert len(messages) == 3 and len(set(messages)) == 3
    assert any("boom" in m for m in messages) and any("NaN" in m for m in messages)
    assert any("camera ROI" in m for m in messages)


def test_a_3d_net_needs_stack_mode_and_z_plans() -> None:
    with pytest.raises(ValueError, match="stack_mode"):
        LiveProcessor(FakeRestorer(dims=3), stack_mode=False)  # type: ignore[arg-type]
    with LiveProcessor(FakeRestorer(dims=3)) as p:  # type: ignore[arg-type]
        _feed(p, _events(2))
        assert p.wait_until_idle(30)
    assert p.stats.errors == 2 and "z plan" in p.reported_errors[0]


def test_streaming_restore_matches_restorer(tiny2d: Restorer, tiny3d: Restorer) -> None:
    """The GPU path's on-device normalise/tile/blend, checked on the CPU."""
    assert type(make_runner(tiny2d)).__name__ == "CpuRunner"
    img = _frame(3, (96, 160)).astype(np.float32)
    for r in (tiny2d, Restorer(tiny2d.model, device="cpu", tile=512)):
        ref = r.restore(img)
        got = restore_tensor(r, torch.from_numpy(img)).numpy()
        assert np.abs(got - ref).max() / ref.max() < 1e-3
    stack = np.stack([_frame(s, (64, 64)) for s in range(6)]).astype(np.float32)
    ref = tiny3d.restore(stack)
    got = restore_tensor(tiny3d, torch.from_numpy(stack)).numpy()
    assert got.shape == (6, 64, 64) and np.abs(got - ref).max() / ref.max() < 1e-3


# -- with the simulated microscope ---------------------------------------------------------


def _zseq(loops: int = 2) -> useq.MDASequence:
    return useq.MDASequence(
        time_plan={"interval": 0, "loops": loops},
        z_plan={"range": 1.0, "step": 0.2},
        channels=EPI_TIRF,
        axis_order="tpgcz",
    )


def test_mda_per_frame_tiff_stores(core, tiny2d: Restorer, tmp_path: Path) -> None:
    writer = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    with LiveProcessor(tiny2d, policy="record", result_writer=writer) as p:
        core.mda.run(_zseq(), output=[str(tmp_path / "raw.ome.tiff"), p])
        assert p.wait_until_idle(60)
    stats = p.stats
    assert stats.processed == 12 and stats.ignored == 12 and stats.errors == 0
    assert stats.latency_p50_ms > 0 and stats.processed_fps > 0
    with tifffile.TiffFile(tmp_path / "raw.ome.tiff") as tif:
        raw = tif.series[0].asarray()
    assert raw.shape == (2, 2, 6, ROI, ROI) and (raw.reshape(24, -1).max(1) > 0).all()
    result, meta = read_result(writer.path)
    assert result.shape == (2, 1, 6, ROI, ROI) and result.dtype == np.float32
    assert (result.reshape(12, -1).max(1) > 0).all()  # every EPI plane has its cTIRF
    assert meta["layout"]["channels"] == ["EPI"]  # TIRF frames are not processed
    assert meta["layout"]["pixel_size_um"] == pytest.approx(core.getPixelSizeUm())
    assert meta["model"]["architecture"]["name"] == "ET2dNet" and "psf" in meta["model"]
    np.testing.assert_allclose(result[1, 0, 5], tiny2d.restore(raw[1, 0, 5]), rtol=1e-4,
                               atol=1e-3)


def test_mda_z_stacks_zarr_stores(core, tiny3d: Restorer, tmp_path: Path) -> None:
    model = Wrapped(tiny3d)
    writer = OmeZarrResultWriter(tmp_path / "ctirf.ome.zarr")
    with LiveProcessor(model, policy="record", result_writer=writer) as p:  # type: ignore[arg-type]
        core.mda.run(_zseq(), output=[str(tmp_path / "raw.ome.zarr"), p])
        assert p.wait_until_idle(60)
    assert model.calls == 2 and p.stats.processed == 12
    raw = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                   "path": str(tmp_path / "raw.ome.zarr/0")}})
    raw_data = raw.result().read().result()
    assert raw_data.shape == (2, 2, 6, ROI, ROI)
    result, meta = read_result(writer.path)
    assert result.shape == (2, 1, 6, ROI, ROI) and (result.reshape(12, -1).max(1) > 0).all()
    assert meta["model"]["architecture"]["name"] == "ET3dNet"
    np.testing.assert_allclose(result[0, 0], tiny3d.restore(raw_data[0, 0]), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("policy", ["record", "preview"])
def test_a_model_slower_than_the_camera_never_holds_the_acquisition(
    core, tiny2d: Restorer, tmp_path: Path, policy: str
) -> None:
    """The model is held until the MDA is over: the MDA completes with every raw frame."""
    gate = threading.Event()
    model = Wrapped(tiny2d, gate=gate)
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 8}, channels=EPI_TIRF[:1])
    writer = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    with LiveProcessor(model, policy=policy, queue_size=2, result_writer=writer,  # type: ignore[arg-type]
                       spill_dir=tmp_path / "spill") as p:
        core.mda.run(seq, output=[str(tmp_path / "raw.ome.tiff"), p])
        during = p.stats
        gate.set()
        assert p.wait_until_idle(60)
    assert tifffile.imread(tmp_path / "raw.ome.tiff").shape == (8, ROI, ROI)
    assert during.acquired == 8 and during.processed == 0
    stats = p.stats
    assert _settled(stats)
    result, _ = read_result(writer.path)
    done = result.reshape(8, -1).max(1) > 0
    if policy == "record":
        assert during.spilled > 0 and stats.processed == 8 and done.all()
    else:
        assert stats.skipped > 0 and stats.processed < stats.acquired
        assert done.sum() == stats.processed and done[-1]  # the newest frame is shown


def test_a_model_that_raises_mid_run_costs_no_raw_frame(core, tiny2d: Restorer,
                                                         tmp_path: Path) -> None:
    model = Wrapped(tiny2d, fail_from=3)
    messages: list[str] = []
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 6}, channels=EPI_TIRF[:1])
    with LiveProcessor(model, policy="record") as p:  # type: ignore[arg-type]
        p.errorOccurred.connect(messages.append)
        core.mda.run(seq, output=[str(tmp_path / "raw.ome.tiff"), p])
        assert p.wait_until_idle(60)
    assert tifffile.imread(tmp_path / "raw.ome.tiff").shape == (6, ROI, ROI)
    assert p.stats.processed == 2 and p.stats.errors == 4
    assert messages == ["RuntimeError: model exploded"]


# -- ctirf acquire -------------------------------------------------------------------------


def test_acquire_command_end_to_end(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny.safetensors")
    seq_file = tmp_path / "seq.yaml"
    seq_file.write_text(
        "time_plan: {interval: 0, loops: 2}\n"
        "channels:\n  - {config: EPI, exposure: 2}\n  - {config: TIRF, exposure: 2}\n"
    )
    out = tmp_path / "run"
    args = ["acquire", "-c", str(DEMO_CFG), "-s", str(seq_file), "-m", str(model), "-o", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "processed" in res.output and "latency" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_acquired"] == summary["frames_expected"] == 4
    assert summary["stats"]["processed"] == 2 and summary["stats"]["ignored"] == 2
    assert tifffile.imread(out / "raw.ome.tiff").shape == (2, 2, 512, 512)
    result, meta = read_result(out / "ctirf.ome.tiff")
    assert result.shape == (2, 1, 512, 512) and (result.reshape(2, -1).max(1) > 0).all()
    assert meta["model"]["model"] == str(model)
    assert not (out / ".spill").exists()
    # outputs are never overwritten by accident; bad inputs give one line and exit 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    bad_seq = tmp_path / "bad.yaml"
    bad_seq.write_text("time_plan: {loops: [1, 2]}\n")
    for bad in (["-s", str(bad_seq)], ["-m", str(tmp_path / "missing.safetensors")]):
        swapped = list(args)
        swapped[swapped.index(bad[0]) + 1] = bad[1]
        res = CliRunner().invoke(app, [*swapped, "-o", str(tmp_path / "other")])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def test_acquire_api_cancel_keeps_valid_stores(core, tiny2d: Restorer, tmp_path: Path) -> None:
    """Ctrl-C (a KeyboardInterrupt in the caller's thread) cancels the MDA cleanly."""
    seq = useq.MDASequence(time_plan={"interval": 0.05, "loops": 40},
                           channels=[{"config": "EPI", "exposure": 2}])
    phases: list[str] = []

    def progress(stats: LiveStats, frames: int, total: int, phase: str) -> None:
        phases.append(phase)
        if phase == "acquiring" and frames >= 3 and "interrupted" not in phases:
            phases.append("interrupted")
            raise KeyboardInterrupt

    result = acquire(core, seq, tiny2d, tmp_path / "run", fmt="ome-zarr", progress=progress)
    assert result.canceled and 3 <= result.frames_acquired < 40
    assert result.frames_expected == 40 and phases[-1] == "done"
    summary = json.loads(result.summary_path.read_text())
    assert summary["canceled"] and summary["stats"]["acquired"] == result.frames_acquired
    ctirf, meta = read_result(result.ctirf_path)  # closed and readable
    assert ctirf.shape == (40, 1, ROI, ROI) and meta["layout"]["channels"] == ["EPI"]
    raw = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                   "path": str(result.raw_path / "0")}})
    assert raw.result().read().result()[result.frames_acquired - 1].max() > 0


def test_attach_live_processes_continuous_streaming(core) -> None:
    model = FakeRestorer()
    with LiveProcessor(model) as p:  # type: ignore[arg-type]
        p.attach_live(core, poll_interval_s=0.005)
        core.startContinuousSequenceAcquisition(0)
        try:
            for _ in range(600):
                if p.stats.processed >= 3:
                    break
                threading.Event().wait(0.05)
            core.setConfig("Illumination", "TIRF")  # frames of other presets are ignored
            ignored_before = p.stats.ignored
            for _ in range(600):
                if p.stats.ignored > ignored_before:
                    break
                threading.Event().wait(0.05)
        finally:
            core.stopSequenceAcquisition()
            core.setConfig("Illumination", "EPI")
        p.detach_live(core)
    stats = p.stats
    assert stats.processed >= 3 and stats.ignored > 0 and stats.errors == 0
    raw, result, event = p.latest()
    assert event is None and raw.shape == (ROI, ROI)
    np.testing.assert_allclose(result, raw * 2.0)


def test_a_3d_net_refuses_stacks_of_another_plane_count_or_step(
    core, tiny3d: Restorer, tmp_path: Path
) -> None:
    four = useq.MDASequence(
        z_plan={"range": 0.6, "step": 0.2}, channels=EPI_TIRF, axis_order="tpgcz"
    )  # 4 planes; the model was trained on 6
    with LiveProcessor(tiny3d, policy="record") as p:
        core.mda.run(four, output=[str(tmp_path / "raw.ome.zarr"), p])
        assert p.wait_until_idle(60)
    assert p.stats.processed == 0 and p.stats.errors > 0
    assert "4 planes but ET3dNet was trained on 6" in p.reported_errors[0]
    wide = useq.MDASequence(
        z_plan={"range": 2.5, "step": 0.5}, channels=EPI_TIRF, axis_order="tpgcz"
    )  # 6 planes, 500 nm apart
    with LiveProcessor(tiny3d, policy="record") as p:
        core.mda.run(wide, output=[str(tmp_path / "raw2.ome.zarr"), p])
        assert p.wait_until_idle(60)
    assert p.stats.processed == 0 and "z step is 500 nm" in p.reported_errors[0]
