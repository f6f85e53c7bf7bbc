"""Shared fixtures: the demo rig, opened and always released."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# Restorers use torch unless a test asks for ONNX Runtime (exporting a graph for every
# random tiny model would only slow the suite); exported graphs stay out of ~/.cache
os.environ.setdefault("CTIRF_BACKEND", "torch")


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("CTIRF_CACHE_DIR", str(tmp_path_factory.mktemp("ctirf-cache")))

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = REPO / "acquisition_configs" / "ctirf_demo.cfg"
DEMO_OPTICS = REPO / "acquisition_configs" / "ctirf_demo.optics.yaml"


@pytest.fixture
def demo_cfg() -> Path:
    return DEMO_CFG


@pytest.fixture
def demo_core() -> Iterator:
    """The simulated rig with a small, fast camera (128x128 ROI, no real-time waits)."""
    from ctirf_live.acquisition.core import open_core

    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setExposure(20)
        core.setROI(960, 960, 128, 128)
        yield core


def write_cfg_variant(tmp_path: Path, drop: tuple[str, ...] = (), name: str = "rig") -> Path:
    """A copy of the demo config without the lines containing any of `drop`."""
    lines = [
        line for line in DEMO_CFG.read_text().splitlines() if not any(d in line for d in drop)
    ]
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    (tmp_path / f"{name}.optics.yaml").write_text(DEMO_OPTICS.read_text())
    return cfg
