"""Paired calibration acquisition on the simulated rig (`ctirf calibrate`).

Frames are small (128x128, 256x256 where registration accuracy is measured) and the
camera does not wait out its exposure, so a 20-pair run takes a few seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import useq
import yaml
from conftest import DEMO_CFG, write_cfg_variant
from typer.testing import CliRunner

from ctirf_live.acquisition.calibration import (
    CalibrationError,
    Quality,
    assess_pair,
    build_sequence,
    calibrate,
    load_positions,
    plan_positions,
    summarize,
)
from ctirf_live.acquisition.core import check_rig, open_core
from ctirf_live.acquisition.registration import Registration
from ctirf_live.cli import app
from ctirf_live.config import ConfigError
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.data.tiff import read_ome_tiff

runner = CliRunner()
FOV_128_UM = 128 * 0.0975


@pytest.fixture
def rig() -> Iterator:
    """Demo rig, 128x128 ROI, no real-time waits; yields (core, RigInfo)."""
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setExposure(100)
        core.setROI(960, 960, 128, 128)
        yield core, check_rig(core, DEMO_CFG)


def _blank_and_cell_sites(fov_um: float) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """A stage position over an empty slide area, and positions over cell centres."""
    from ctirf_live.sim.sample import SPECIMEN_RADIUS_UM, cell_at, field_has_cells

    blank, cells = (SPECIMEN_RADIUS_UM + 2000.0, 0.0), []  # bare glass beyond the cells
    for i in range(-6, 7):
        for j in range(-6, 7):
            cell = cell_at(0, i, j)
            if cell is not None and len(cells) < 6 and (i, j) != (0, 0):
                cells.append((round(cell.nx, 2), round(cell.ny, 2)))
    assert not field_has_cells(0, blank, fov_um + 10.0)
    return blank, cells


def _positions_file(path: Path, xys: list[tuple[float, float]]) -> Path:
    seq = useq.MDASequence(stage_positions=[(x, y, 0.0) for x, y in xys])
    path.write_text(seq.yaml())
    return path


# -- planning ---------------------------------------------------------------------------------


def test_grid_is_a_spiral_of_non_overlapping_fields() -> None:
    grid = plan_positions("grid", 30, origin=(100.0, -50.0), fov_um=(50.0, 40.0))
    xy = np.array([(p.x, p.y) for p in grid])
    assert len(grid) == 30 and tuple(xy[0]) == (100.0, -50.0)
    dist = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    assert dist[~np.eye(30, dtype=bool)].min() >= 50.0  # one FOV + margin apart
    # the same nodes in the same order whatever n: a resumed run re-plans the same grid
    assert [p.name for p in plan_positions("grid", 9, origin=(100.0, -50.0))] == [
        p.name for p in plan_positions("grid", 30, origin=(100.0, -50.0))[:9]
    ]
    # used positions are skipped
    skipped = plan_positions("grid", 5, origin=(100.0, -50.0), exclude=[(100.0, -50.0)])
    assert (100.0, -50.0) not in [(p.x, p.y) for p in skipped]


def test_random_positions_are_seeded_and_apart() -> None:
    a = plan_positions("random", 20, seed=3, fov_um=(20.0, 20.0))
    b = plan_positions("random", 20, seed=3, fov_um=(20.0, 20.0))
    c = plan_positions("random", 20, seed=4, fov_um=(20.0, 20.0))
    assert [(p.x, p.y) for p in a] == [(p.x, p.y) for p in b] != [(p.x, p.y) for p in c]
    xy = np.array([(p.x, p.y) for p in a])
    dist = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    assert dist[~np.eye(20, dtype=bool)].min() >= 24.0


def test_positions_files_from_the_mda_widget(tmp_path: Path) -> None:
    seq = useq.MDASequence(
        stage_positions=[useq.Position(x=1, y=2, z=3, name="cellA"), (4.0, 5.0, 6.0)],
        channels=["DAPI"],
    )
    (tmp_path / "seq.yaml").write_text(seq.yaml())
    (tmp_path / "seq.json").write_text(seq.model_dump_json())
    (tmp_path / "list.json").write_text(json.dumps([{"x": 7, "y": 8}, {"x": 9, "y": 10, "z": 1}]))
    for name in ("seq.yaml", "seq.json"):
        got = load_positions(tmp_path / name)
        assert [(p.x, p.y, p.z) for p in got] == [(1, 2, 3), (4, 5, 6)]
        assert got[0].name == "cellA"
    assert [(p.x, p.y) for p in load_positions(tmp_path / "list.json")] == [(7, 8), (9, 10)]
    (tmp_path / "bad.yaml").write_text("channels: [DAPI]\n")
    with pytest.raises(ConfigError, match="holds no positions"):
        load_positions(tmp_path / "bad.yaml")


def test_out_of_range_position_is_refused() -> None:
    with pytest.raises(ConfigError, match="outside the stage range"):
        plan_positions("grid", 4, origin=(9990.0, 0.0), bounds=(-1e4, 1e4, -1e4, 1e4))


def test_sequence_takes_epi_then_tirf_at_each_position_same_focus() -> None:
    positions = [useq.Position(x=0, y=0, z=1.0), useq.Position(x=50, y=0, z=1.0)]
    seq = build_sequence(positions, exposure_ms=30, z_offset_um=0.25)
    events = list(seq)
    assert [(e.index["p"], e.channel.config) for e in events] == [
        (0, "EPI"),
        (0, "TIRF"),
        (1, "EPI"),
        (1, "TIRF"),
    ]
    assert {e.channel.group for e in events} == {"Illumination"}
    assert all(e.z_pos == pytest.approx(1.25) and e.exposure == 30 for e in events)
    # one shutter opening per field: open from EPI through TIRF, closed for the stage move
    assert [e.keep_shutter_open for e in events] == [True, False, True, False]


# -- quality gate ----------------------------------------------------------------------------


def test_gate_rejects_blank_defocused_and_shifted_fields() -> None:
    from ctirf_live.sim.scope import SimulatedMicroscope

    blank_xy, cells = _blank_and_cell_sites(256 * 0.0975)
    scope = SimulatedMicroscope(seed=0)
    scope.exposure_ms = 100
    scope.roi = (896, 896, 256, 256)
    sigma = 0.21 * 0.67 / 1.5 / 0.0975

    def pair(xy: tuple[float, float], z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        scope.xy_um, scope.z_um = xy, z
        scope.set_illumination("EPI")
        epi = scope.snap()
        scope.set_illumination("TIRF")
        return epi, scope.snap()

    good = assess_pair(*pair(cells[0]), psf_sigma_px=sigma)
    assert isinstance(good, Quality) and good.ok and good.score > 100
    blank = assess_pair(*pair(blank_xy), psf_sigma_px=sigma)
    assert not blank.ok and blank.reason == "blank"
    defocused = assess_pair(*pair(cells[0], z=2.5), psf_sigma_px=sigma)
    assert not defocused.ok and defocused.reason == "out_of_focus"
    shifted = Registration((3.4, 0.5), 0.5, True)
    assert assess_pair(*pair(cells[0]), shifted, psf_sigma_px=sigma).reason == "shift"
    assert assess_pair(*pair(cells[0]), shifted, force=True, psf_sigma_px=sigma).ok


# -- runs ---------------------------------------------------------------------------------------


def test_calibrate_collects_20_pairs_with_manifest(rig, tmp_path: Path) -> None:
    core, info = rig
    auto_shutter = core.getAutoShutter()
    statuses = []
    ds = calibrate(core, info, tmp_path / "ds", pairs=20, exposure_ms=100, progress=statuses.append)
    assert len(ds) == 20
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["objective"] == "60X" and manifest["pixel_size_um"] == pytest.approx(0.0975)
    assert {"numpy", "pymmcore_plus", "ctirf_live"} <= set(manifest["software"])
    pairs = manifest["pairs"]
    assert len(pairs) == 20
    positions = {(p["position"]["x"], p["position"]["y"]) for p in pairs}
    assert len(positions) == 20  # distinct fields
    for p in pairs:
        data, tif = read_ome_tiff(tmp_path / "ds" / p["file"])
        assert data.shape == (2, 128, 128) and data.dtype == np.uint16
        assert tif.channel_names == ["EPI", "TIRF"]
        assert len(p["shift_px"]) == 2 and max(map(abs, p["shift_px"])) < 3.0
        assert p["quality"] > 0 and p["position"]["z"] == 0.0
        datetime.fromisoformat(p["timestamp"])
    calib = manifest["calibration"]
    assert calib["runs"][-1]["status"] == "completed"
    assert calib["runs"][-1]["accepted"] == 20
    rejected = {(r["position"]["x"], r["position"]["y"]) for r in calib["rejected"]}
    assert not rejected & positions
    assert statuses[-1].done == 20 and statuses[-1].rejected == len(calib["rejected"])
    # reads back, registered, and feeds the training loader
    again = PairedDataset.open(tmp_path / "ds")
    epi, tirf = again.load_pair(19)
    assert epi.shape == tirf.shape == (128, 128) and epi.dtype == np.float32
    from ctirf_live.data.loaders import CropDataset, PairSource

    item = CropDataset(PairSource.from_dataset(again), crop=64)[0]
    assert item["epi"].shape == item["tirf"].shape == (1, 64, 64)
    summary = summarize(again)
    assert summary["pairs"] == 20 and summary["mean_shift_px"] > 0
    # the core is left as the run found it: auto-shutter on, no MDA running
    assert core.getAutoShutter() == auto_shutter and not core.mda.is_running()


def test_simulated_drift_is_recorded_as_shift(tmp_path: Path) -> None:
    """shift_px == drift(TIRF frame) - drift(EPI frame): content moves by the drift."""
    from ctirf_live.sim.scope import get_microscope

    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setROI(896, 896, 256, 256)
        drift: dict[tuple[str, str], tuple[float, float]] = {}
        core.mda.events.frameReady.connect(
            lambda img, ev, meta: drift.__setitem__(
                (ev.pos_name, ev.channel.config), get_microscope().drift_px
            )
        )
        ds = calibrate(core, check_rig(core, DEMO_CFG), tmp_path / "ds", pairs=5, exposure_ms=100)
    errors = []
    for rec in ds.pairs:
        name = rec.extra["position_name"]
        d_epi, d_tirf = drift[(name, "EPI")], drift[(name, "TIRF")]
        truth = (d_tirf[0] - d_epi[0], d_tirf[1] - d_epi[1])
        errors.append(np.hypot(rec.shift_px[0] - truth[0], rec.shift_px[1] - truth[1]))
    assert len(errors) == 5 and max(errors) < 0.2


def test_blank_field_is_rejected_and_replaced(rig, tmp_path: Path) -> None:
    core, info = rig
    blank, cells = _blank_and_cell_sites(FOV_128_UM)
    file = _positions_file(tmp_path / "pos.yaml", [blank, *cells[:4]])
    ds = calibrate(core, info, tmp_path / "ds", pairs=2, positions=str(file), exposure_ms=100)
    assert len(ds) == 2
    used = [(p.position["x"], p.position["y"]) for p in ds.pairs]
    assert blank not in used
    rejected = ds.manifest["calibration"]["rejected"]
    assert rejected[0]["reason"] == "blank"
    assert (rejected[0]["position"]["x"], rejected[0]["position"]["y"]) == blank


def test_slide_without_good_fields_stops_with_a_clear_error(rig, tmp_path: Path) -> None:
    core, info = rig
    blank, _ = _blank_and_cell_sites(FOV_128_UM)
    file = _positions_file(tmp_path / "pos.yaml", [blank])
    with pytest.raises(CalibrationError, match=r"only 0 of 2 good pairs .*blank 1"):
        calibrate(core, info, tmp_path / "ds", pairs=2, positions=str(file), exposure_ms=100)


def test_interrupted_run_resumes_to_exactly_20_pairs(rig, tmp_path: Path) -> None:
    core, info = rig
    out = tmp_path / "ds"

    def interrupt_after_7(status) -> None:
        if status.done == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(core, info, out, pairs=20, exposure_ms=100, progress=interrupt_after_7)
    assert not core.mda.is_running()
    first = PairedDataset.open(out)
    assert len(first) == 7
    assert first.manifest["calibration"]["runs"][-1]["status"] == "interrupted"
    # the stage is elsewhere now; the resumed run re-plans from the first run's origin
    core.setXYPosition(500.0, 500.0)
    ds = calibrate(core, info, out, pairs=20, exposure_ms=100)
    assert len(ds) == 20
    assert [p.file for p in ds.pairs[:7]] == [p.file for p in first.pairs]
    positions = [(p.position["x"], p.position["y"]) for p in ds.pairs]
    assert len(set(positions)) == 20
    assert all(abs(x) < 200 and abs(y) < 200 for x, y in positions)
    runs = ds.manifest["calibration"]["runs"]
    assert [r["status"] for r in runs] == ["interrupted", "completed"]
    assert runs[1]["accepted"] == 13
    # nothing left to do: a third run moves nothing
    core.setXYPosition(500.0, 500.0)
    assert len(calibrate(core, info, out, pairs=20)) == 20
    assert core.getXYPosition() == pytest.approx((500.0, 500.0))


def test_write_error_mid_run_keeps_pairs(rig, tmp_path: Path, monkeypatch) -> None:
    core, info = rig
    original = PairedDataset.add_pair

    def add_pair(self, *args, **kwargs):
        if len(self) == 3:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PairedDataset, "add_pair", add_pair)
    with pytest.raises(CalibrationError, match=r"No space left on device.*3 pairs kept"):
        calibrate(core, info, tmp_path / "ds", pairs=6, exposure_ms=100)
    assert not core.mda.is_running()
    assert len(PairedDataset.open(tmp_path / "ds")) == 3


def test_checks_before_anything_moves(rig, tmp_path: Path, monkeypatch) -> None:
    core, info = rig
    start = core.getXYPosition()
    # dry run: the plan, nothing written, nothing moved
    plan = calibrate(core, info, tmp_path / "dry", pairs=4, dry_run=True)
    assert plan.needed == 4 and len(plan.positions) == 4 * 3 + 10
    assert plan.max_frames == 2 * len(plan.positions)
    assert "EPI then TIRF" in plan.describe()
    assert not (tmp_path / "dry").exists()
    # unwritable output (a path under a file: refused even for root)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CalibrationError, match="cannot write"):
        calibrate(core, info, tmp_path / "file" / "ds", pairs=2)
    with pytest.raises(CalibrationError, match="is a file"):
        calibrate(core, info, tmp_path / "file", pairs=2)
    # a disk too small for the planned pairs
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(CalibrationError, match="not enough disk space"):
        calibrate(core, info, tmp_path / "ds", pairs=2)
    monkeypatch.undo()
    # an objective without optics, a position off the slide
    with pytest.raises(ConfigError, match="has no optics"):
        calibrate(core, info, tmp_path / "ds", objective="40X")
    far = _positions_file(tmp_path / "far.yaml", [(0.0, 0.0), (45_000.0, 0.0)])
    with pytest.raises(ConfigError, match="outside the stage range"):
        calibrate(core, info, tmp_path / "ds", pairs=2, positions=str(far))
    assert core.getXYPosition() == pytest.approx(start)


# -- CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "fragment"),
    [
        (("ConfigGroup,Illumination", "ChannelGroup"), "no config group 'Illumination'"),
        (("Illumination,TIRF",), "lacks preset(s) TIRF"),
    ],
)
def test_cli_bad_config_one_line_exit_2(tmp_path: Path, drop: tuple[str, ...], fragment: str):
    cfg = write_cfg_variant(tmp_path, drop=drop)
    result = runner.invoke(app, ["calibrate", "--config", str(cfg), "--out", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert fragment in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "d").exists()


def test_cli_dry_run_prints_plan_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "d"
    result = runner.invoke(
        app, ["calibrate", "-c", str(DEMO_CFG), "--out", str(out), "--pairs", "3", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "candidate positions: 19" in result.output and "grid_+0_+0" in result.output
    assert not out.exists()


def test_cli_unwritable_out(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = runner.invoke(
        app, ["calibrate", "-c", str(DEMO_CFG), "--out", str(tmp_path / "file" / "d")]
    )
    assert result.exit_code == 2 and "cannot write" in result.output


def test_cli_collects_and_summarises(tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["calibrate", "-c", str(DEMO_CFG), "--out", str(out), "--pairs", "2", "--seed", "1"]
    result = runner.invoke(app, [*args, "--positions", "random"])
    assert result.exit_code == 0, result.output
    assert "2 / 2" in result.output and "mean |shift|" in result.output
    assert str(out) in result.output
    assert len(PairedDataset.open(out)) == 2
    # rerun: already complete, nothing collected
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "2 / 2" in result.output
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["calibration"]["positions"] == "random"


def test_calibrate_with_stacks_records_an_epi_stack_per_field(rig, tmp_path: Path) -> None:
    from ctirf_live.data.stacks import stacks_from_dataset

    core, info = rig
    ds = calibrate(
        core, info, tmp_path / "ds", pairs=2, exposure_ms=100, stack_planes=4, stack_step_um=0.25
    )
    stacks = ds.stack_files()
    assert len(stacks) == 2
    for rec, path in stacks:
        data, tif = read_ome_tiff(path)
        assert data.shape == (4, 128, 128) and data.dtype == np.uint16
        assert tif.z_step_um == pytest.approx(0.25) and tif.channel_names == ["EPI"]
        assert rec.extra["stack"]["start_um"] == rec.position["z"]
        # plane 0 is the pair's EPI focus; planes further up resemble it less and less
        epi, _ = PairedDataset.open(tmp_path / "ds").load_pair(ds.pairs.index(rec), False)
        corr = [np.corrcoef(data[0].ravel(), plane.ravel())[0, 1] for plane in data]
        assert np.corrcoef(data[0].ravel(), epi.ravel())[0, 1] > 0.9
        assert corr[1] > corr[2] > corr[3] and corr[3] < 0.95
    loaded = stacks_from_dataset(tmp_path / "ds", planes=4)
    assert len(loaded) == 2 and loaded.z_step_um == pytest.approx(0.25)
    assert loaded.optics.na == ds.optics.na and loaded.optics.objective == "60X"
    plan = calibrate(core, info, tmp_path / "p", pairs=2, stack_planes=6, dry_run=True)
    assert plan.max_frames == 8 * len(plan.positions) and "stacks: 6 EPI planes" in plan.describe()
    with pytest.raises(ConfigError, match="at least 2"):
        calibrate(core, info, tmp_path / "q", pairs=2, stack_planes=1, dry_run=True)
