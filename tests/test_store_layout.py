"""Raw and cTIRF stores of one run share layout and names, and viewers' readers find them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import useq
from conftest import DEMO_CFG
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from ctirf_live.acquisition.core import open_core
from ctirf_live.config import Optics
from ctirf_live.inference.acquire import acquire
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.writers import read_result
from ctirf_live.models.etnet import ET2dNet

ROI = 64


@pytest.fixture(scope="module")
def tiny2d() -> Restorer:
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)


@pytest.fixture(scope="module")
def core() -> Iterator:
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setROI(992, 992, ROI, ROI)
        yield core


def _seq(positions: int) -> useq.MDASequence:
    stage = [{"name": "field_1", "x": 0, "y": 0}, {"x": 30, "y": 0}][:positions]
    return useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        stage_positions=stage,
        channels=[{"config": "EPI", "exposure": 2}, {"config": "TIRF", "exposure": 2}],
        axis_order="tpcz",
    )


def _series(store: Path) -> list[str]:
    return json.loads((store / "OME" / "zarr.json").read_text())["attributes"]["ome"]["series"]


def _images(path: Path) -> list:
    """What ome-zarr-py's Reader (napari-ome-zarr's) finds at `path`: nodes with pixels."""
    return [n for n in Reader(parse_url(str(path)))() if n.data]


def test_multi_position_tiff_stores_match(core, tiny2d, tmp_path: Path) -> None:
    result = acquire(core, _seq(2), tiny2d, tmp_path / "run")
    assert result.raw_path == tmp_path / "run" / "raw"
    assert result.ctirf_path == tmp_path / "run" / "ctirf"
    raw = sorted(p.name for p in result.raw_path.iterdir())
    ctirf = sorted(p.name for p in result.ctirf_path.iterdir())
    assert raw == ["raw_p000.ome.tiff", "raw_p001.ome.tiff"]
    assert ctirf == [name.replace("raw", "ctirf") for name in raw]
    for pos, name in enumerate(ctirf):
        with tifffile.TiffFile(result.ctirf_path / name) as tif:  # each file opens alone
            with tifffile.TiffFile(result.raw_path / raw[pos]) as raw_tif:
                assert tif.series[0].name == raw_tif.series[pos].name
            assert tif.series[0].axes == "TYX" and tif.series[0].shape == (2, ROI, ROI)
            assert tif.series[0].asarray().max() > 0
        assert read_result(result.ctirf_path, pos)[1]["processed"] == "11"


@pytest.mark.parametrize("positions", [1, 2])
def test_zarr_stores_match_and_open_with_ome_zarr(
    core, tiny2d, tmp_path: Path, positions: int
) -> None:
    result = acquire(core, _seq(positions), tiny2d, tmp_path / "run", fmt="ome-zarr")
    raw, ctirf = result.raw_path, result.ctirf_path
    if positions == 1:
        groups = [(raw, ctirf)]
    else:
        # ome-zarr-py's Reader does not follow a bioformats2raw root: it opens each series
        names = _series(raw)
        assert names == _series(ctirf) == ["field_1", "1"]
        groups = [(raw / n, ctirf / n) for n in names]
    for pos, (raw_group, ctirf_group) in enumerate(groups):
        (raw_node,), (node,) = _images(raw_group), _images(ctirf_group)
        assert raw_node.data[0].shape == (2, 2, ROI, ROI)
        assert node.data[0].shape == (2, 1, ROI, ROI)
        pixels = np.asarray(node.data[0])
        np.testing.assert_array_equal(pixels, read_result(ctirf, pos)[0])
        assert node.metadata["channel_names"] == ["cTIRF EPI"]
        low, high = node.metadata["contrast_limits"][0]
        assert pixels.min() <= low < high <= pixels.max()  # from the data, not 0-65535
