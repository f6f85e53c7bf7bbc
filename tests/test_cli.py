from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_CFG, write_cfg_variant
from typer.testing import CliRunner

from ctirf_live import __version__
from ctirf_live.cli import app
from ctirf_live.data.tiff import read_ome_tiff

runner = CliRunner()


def test_help_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("snap", "process"):
        assert command in result.output
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_snap_writes_ome_tiff_with_metadata(tmp_path: Path) -> None:
    out = tmp_path / "epi.ome.tif"
    result = runner.invoke(
        app,
        ["snap", "--config", str(DEMO_CFG), "--mode", "EPI", "--objective", "100X",
         "--z", "0.4", "--exposure", "30", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    data, info = read_ome_tiff(out)
    assert data.shape == (512, 512) and data.dtype == np.uint16
    assert info.pixel_size_um == pytest.approx(0.065)
    assert info.channel_names == ["EPI"]
    meta = info.metadata
    assert meta["mode"] == "EPI" and meta["optics"]["objective"] == "100X"
    assert meta["stage_z_um"] == pytest.approx(0.4)
    assert meta["exposure_ms"] == pytest.approx(30)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mode", "CONFOCAL"], "unknown illumination preset 'CONFOCAL'"),
        (["--objective", "40X"], "objective '40X' has no optics"),
        (["--exposure", "-5"], "exposure must be positive"),
    ],
)
def test_snap_bad_input_one_line_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = runner.invoke(
        app, ["snap", "--config", str(DEMO_CFG), "-o", str(tmp_path / "x.tif"), *args]
    )
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_impossible_na_in_optics_file(tmp_path: Path) -> None:
    cfg = write_cfg_variant(tmp_path)
    (tmp_path / "rig.optics.yaml").write_text("objectives:\n  60X: {na: 1.7}\n  100X: {na: 1.5}\n")
    result = runner.invoke(app, ["snap", "--config", str(cfg), "-o", str(tmp_path / "x.tif")])
    assert result.exit_code == 2
    assert "smaller than the immersion index" in result.output


def test_missing_config(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["snap", "--config", str(tmp_path / "nope.cfg"), "-o", str(tmp_path / "x.tif")]
    )
    assert result.exit_code == 2 and "config file not found" in result.output


def test_public_api_is_importable_lazily() -> None:
    import ctirf_live

    for name in ctirf_live.__all__:
        assert getattr(ctirf_live, name) is not None
    with pytest.raises(AttributeError):
        ctirf_live.NoSuchThing  # noqa: B018
