"""Offline `process`: never replaces the input or an output by accident, never writes NaN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.config import Optics
from ctirf_live.data.tiff import write_ome_tiff
from ctirf_live.inference.process import check_axes, process_file
from ctirf_live.models.etnet import ET2dNet, save_model


class NaNModel:
    """The Restorer surface process_file uses, returning NaN like a broken checkpoint."""

    dims, optics = 2, Optics()

    def restore(self, image: np.ndarray) -> np.ndarray:
        return np.full(image.shape, np.nan, np.float32)

    def describe(self) -> dict:
        return {"model": "nan"}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).poisson(200, (2, 64, 64)).astype(np.uint16)
    return write_ome_tiff(tmp_path / "epi.ome.tiff", data, "TYX", pixel_size_um=0.0975)


def test_nan_output_is_refused_and_nothing_written(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.ome.tiff"
    with pytest.raises(ValueError, match=r"NaN or infinite.*nothing was written"):
        process_file(src, out, NaNModel())  # type: ignore[arg-type]
    assert not out.exists()


def test_input_and_existing_outputs_are_protected(src: Path, tmp_path: Path) -> None:
    before = src.read_bytes()
    with pytest.raises(ValueError, match="replace the input"):
        process_file(src, src, NaNModel())  # type: ignore[arg-type]
    out = tmp_path / "out.ome.tiff"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        process_file(src, out, NaNModel())  # type: ignore[arg-type]
    assert src.read_bytes() == before and out.read_bytes() == b"keep"


def test_unknown_axes_fail_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "q.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 32, 32), np.uint16), metadata={"axes": "QQYX"})
    with pytest.raises(ValueError, match="cannot tell what the axes"):
        process_file(path, tmp_path / "o.tif", NaNModel())  # type: ignore[arg-type]
    check_axes("TZCYX")


def test_process_command_overwrite_flag(src: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny.safetensors")
    out = tmp_path / "out.ome.tiff"
    args = ["process", str(src), "-m", str(model), "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    same = CliRunner().invoke(app, ["process", str(src), "-m", str(model), "-o", str(src)])
    assert same.exit_code == 2 and "replace the input" in same.output
    result = tifffile.imread(out)
    assert np.isfinite(result).all() and result.shape == (2, 64, 64)


def test_a_3d_model_processes_a_41_plane_stack_in_windows(tmp_path: Path) -> None:
    from ctirf_live.models.etnet import ET3dNet

    torch.manual_seed(0)
    model = save_model(ET3dNet(Optics(), "tiny"), tmp_path / "tiny3d.safetensors")
    data = np.random.default_rng(1).poisson(300, (41, 64, 64)).astype(np.uint16)
    stack = write_ome_tiff(
        tmp_path / "stack.ome.tiff", data, "ZYX", pixel_size_um=0.0975, z_step_um=0.2
    )
    out = tmp_path / "ctirf.ome.tiff"
    result = CliRunner().invoke(app, ["process", str(stack), "-m", str(model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    restored = tifffile.imread(out)
    assert restored.shape == (41, 64, 64) and np.isfinite(restored).all()
    coarse = write_ome_tiff(
        tmp_path / "coarse.ome.tiff", data[:8], "ZYX", pixel_size_um=0.0975, z_step_um=0.5
    )
    bad = CliRunner().invoke(
        app, ["process", str(coarse), "-m", str(model), "-o", str(tmp_path / "x.ome.tiff")]
    )
    assert bad.exit_code == 2 and "z step is 500 nm" in bad.output
