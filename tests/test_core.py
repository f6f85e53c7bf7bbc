import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import useq
from conftest import DEMO_CFG, write_cfg_variant

from ctirf_live.acquisition.core import active_optics, check_rig, open_core
from ctirf_live.config import ConfigError


def test_demo_rig_is_complete(demo_core) -> None:
    rig = check_rig(demo_core, DEMO_CFG)
    assert set(rig.illumination_presets) == {"EPI", "TIRF"}
    assert set(rig.objectives) == {"60X", "100X"}
    optics = active_optics(demo_core, rig)
    assert optics.objective == "60X" and optics.pixel_size_um == pytest.approx(0.0975)
    demo_core.setConfig("Objective", "100X")
    assert active_optics(demo_core, rig).pixel_size_um == pytest.approx(0.065)
    demo_core.setProperty("Camera", "Binning", "2")
    assert demo_core.getPixelSizeUm() == pytest.approx(0.13)


def test_mda_with_channels_zstack_and_positions(demo_core) -> None:
    seq = useq.MDASequence(
        channels=[
            {"group": "Illumination", "config": "EPI"},
            {"group": "Illumination", "config": "TIRF"},
        ],
        z_plan={"range": 1.0, "step": 0.2},
        stage_positions=[(0.0, 0.0, 0.0), (6.0, 4.0, 0.0)],  # both on the home cell
        axis_order="pczt",
    )
    frames: list[tuple[np.ndarray, useq.MDAEvent, dict]] = []
    demo_core.mda.events.frameReady.connect(lambda f, e, m: frames.append((f.copy(), e, m)))
    demo_core.mda.run(seq)
    assert len(frames) == 2 * 2 * 6  # positions x channels x planes
    frame = frames[0][0]
    assert frame.shape == (128, 128) and frame.dtype == np.uint16
    # every frame is lit (not a dark offset-only frame from a closed shutter)
    assert min(f.max() for f, _, _ in frames) > 140  # a dark frame peaks near 115 ADU
    assert {e.channel.config for _, e, _ in frames} == {"EPI", "TIRF"}
    assert {e.index["z"] for _, e, _ in frames} == set(range(6))
    # the second position images another field: frames differ
    first = [f for f, e, _ in frames if e.index["p"] == 0 and e.index["z"] == 0]
    second = [f for f, e, _ in frames if e.index["p"] == 1 and e.index["z"] == 0]
    assert not np.array_equal(first[0], second[0])
    # EPI (deep haze) is brighter in total than TIRF at the coverslip field
    epi = np.mean([f.mean() for f, e, _ in frames if e.channel.config == "EPI"])
    tirf = np.mean([f.mean() for f, e, _ in frames if e.channel.config == "TIRF"])
    assert epi != tirf


@pytest.mark.parametrize(
    ("drop", "fragment"),
    [
        (("ConfigGroup,Illumination", "ChannelGroup"), "no config group 'Illumination'"),
        (("Illumination,TIRF",), "lacks preset(s) TIRF"),
        (("PixelSize",), "defines no pixel size"),
    ],
)
def test_incomplete_rigs_name_what_is_missing(tmp_path: Path, drop, fragment) -> None:
    cfg = write_cfg_variant(tmp_path, drop)
    with open_core(cfg) as core, pytest.raises(ConfigError, match=re.escape(fragment)):
        check_rig(core, cfg)


def test_missing_optics_and_malformed_config(tmp_path: Path) -> None:
    cfg = write_cfg_variant(tmp_path)
    (tmp_path / "rig.optics.yaml").unlink()
    with open_core(cfg) as core, pytest.raises(ConfigError, match=r"optics\.yaml"):
        check_rig(core, cfg)
    bad = tmp_path / "bad.cfg"
    bad.write_text("#py pyDevice,Camera,ctirf_live.sim.devices,NoSuchCamera\n")
    with pytest.raises(ConfigError, match="could not load"):
        with open_core(bad):
            pass
    with pytest.raises(ConfigError, match="not found"):
        with open_core(tmp_path / "missing.cfg"):
            pass


def test_snap_command_exits_cleanly_every_time(tmp_path: Path) -> None:
    """pymmcore-plus cores can abort at interpreter exit unless released (DESIGN.md)."""
    for i in range(3):
        out = tmp_path / f"snap{i}.ome.tif"
        proc = subprocess.run(
            [sys.executable, "-m", "ctirf_live.cli", "snap", "--config", str(DEMO_CFG),
             "--mode", "TIRF", "-o", str(out)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert out.is_file()


def test_headless_cores_deliver_mda_events_on_the_acquisition_thread(qapp) -> None:
    """With a QApplication alive and PYMM_SIGNALS_BACKEND=qt (set by importing
    pymmcore-widgets), a blocking run still sees its frames: open_core makes psygnal
    cores unless a window asks for Qt signals."""
    import os

    import useq

    from ctirf_live.acquisition.core import open_core

    before = os.environ.get("PYMM_SIGNALS_BACKEND")
    os.environ["PYMM_SIGNALS_BACKEND"] = "qt"
    try:
        frames: list[int] = []
        with open_core(DEMO_CFG) as core:
            core.mda.events.frameReady.connect(lambda *a: frames.append(1))
            core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 3}))
        assert len(frames) == 3  # delivered without an event loop
        assert os.environ["PYMM_SIGNALS_BACKEND"] == "qt"  # the user's setting is kept
    finally:
        if before is None:
            os.environ.pop("PYMM_SIGNALS_BACKEND", None)
        else:
            os.environ["PYMM_SIGNALS_BACKEND"] = before
