"""The example sequences shipped in acquisition_configs/ load, fit the demo rig and run."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import useq
from conftest import DEMO_CFG, REPO

from ctirf_live.acquisition.core import open_core
from ctirf_live.acquisition.limits import stage_limits
from ctirf_live.config import Optics
from ctirf_live.inference.acquire import acquire, fit_channels, load_sequence
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet

EXAMPLES = {
    "timelapse.yaml": {"t": 20, "c": 1},
    "zstack_timelapse.yaml": {"t": 10, "z": 6, "c": 1},
    "multiposition.yaml": {"t": 5, "p": 3, "c": 2},
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_loads_fits_the_rig_and_is_in_the_readme(name: str) -> None:
    seq = load_sequence(REPO / "acquisition_configs" / name)
    sizes = {k: v for k, v in seq.sizes.items() if v}
    assert sizes == EXAMPLES[name]
    if "z" in sizes:
        steps = sorted({round(e.z_pos, 3) for e in seq})
        assert len(steps) == 6 and all(
            b - a == pytest.approx(0.2) for a, b in itertools.pairwise(steps)
        )
    with open_core(DEMO_CFG) as core:
        fit_channels(seq, core)  # every preset exists on the demo rig
        stage_limits(core, DEMO_CFG).check_sequence(seq)
    assert f"acquisition_configs/{name}" in (REPO / "README.md").read_text()


def test_multiposition_example_runs_headless(tmp_path: Path) -> None:
    seq = load_sequence(REPO / "acquisition_configs" / "multiposition.yaml")
    seq = seq.model_copy(update={"time_plan": useq.TIntervalLoops(interval=0, loops=1)})
    torch.manual_seed(0)
    restorer = Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setROI(992, 992, 64, 64)
        result = acquire(core, fit_channels(seq, core), restorer, tmp_path / "run")
    assert result.failure is None and result.raw_frames_saved == 6
    assert result.stats.processed == 3  # EPI only; TIRF kept raw
