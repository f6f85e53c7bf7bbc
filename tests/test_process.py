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
from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff
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


class Doubler:
    """The Restorer surface process_file uses: output = 2 x input, so planes can be traced."""

    dims, optics = 2, Optics()

    def restore(self, image: np.ndarray) -> np.ndarray:
        return 2 * np.asarray(image, np.float32)

    def describe(self) -> dict:
        return {"model": "doubler"}


def _raw_store(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 2-position EPI+TIRF time-lapse written as pymmcore-plus writes it (ome-writers)."""
    import ome_writers as ow
    import useq

    seq = useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        stage_positions=[{"name": "field_1", "x": 0, "y": 0}, {"x": 30, "y": 0}],
        channels=["EPI", "TIRF"],
        axis_order="tpcz",
    )
    settings = ow.useq_to_acquisition_settings(seq, 48, 32, pixel_size_um=0.0975)
    root = tmp_path / "run" / "raw.ome.tiff"
    frames = np.random.default_rng(0).poisson(200, (8, 32, 48)).astype(np.uint16)
    with ow.create_stream(
        ow.AcquisitionSettings(root_path=str(root), dtype="uint16", format="tifffile", **settings)
    ) as stream:
        for frame in frames:
            stream.append(frame)
    # event order t, p, c -> per position (T, C, Y, X)
    by_position = frames.reshape(2, 2, 2, 32, 48).transpose(1, 0, 2, 3, 4)
    return root.with_name("raw"), by_position


@pytest.mark.parametrize("given", ["folder", "file"])
def test_every_series_is_restored_epi_only(tmp_path: Path, given: str) -> None:
    raw, frames = _raw_store(tmp_path)
    source = raw if given == "folder" else raw / "raw_p000.ome.tiff"
    store, _ = process_file(source, tmp_path / "ctirf.ome.tiff", Doubler())  # type: ignore[arg-type]
    assert store == tmp_path / "ctirf"
    names = sorted(p.name for p in store.iterdir())
    assert names == ["ctirf_p000.ome.tiff", "ctirf_p001.ome.tiff"]
    for pos, name in enumerate(names):
        with tifffile.TiffFile(store / name) as tif:
            series = tif.series[0]
            assert len(tif.series) == 1 and series.name == ["field_1", "1"][pos]
            assert series.axes == "TYX"  # the TIRF channel left out, C of size 1 squeezed
            np.testing.assert_array_equal(series.asarray(), 2.0 * frames[pos, :, 0])
        _, info = read_ome_tiff(store / name)
        assert info.channel_names == ["cTIRF EPI"]  # as acquire names it
        assert info.pixel_size_um == pytest.approx(0.0975)


def test_channels_option_any_case_all_and_unknown(tmp_path: Path) -> None:
    raw, frames = _raw_store(tmp_path)
    source = raw / "raw_p001.ome.tiff"
    store, _ = process_file(source, tmp_path / "a.ome.tiff", Doubler(), channels=["tirf"])  # type: ignore[arg-type]
    restored = tifffile.imread(store / "a_p001.ome.tiff")
    np.testing.assert_array_equal(restored, 2.0 * frames[1, :, 1])
    store, _ = process_file(source, tmp_path / "b.ome.tiff", Doubler(), channels=["all"])  # type: ignore[arg-type]
    _, info = read_ome_tiff(store / "b_p000.ome.tiff")
    assert info.channel_names == ["cTIRF EPI", "cTIRF TIRF"]
    with pytest.raises(ValueError, match=r"channels EPI, TIRF, none of them GFP; pass --channels"):
        process_file(source, tmp_path / "c.ome.tiff", Doubler(), channels=["GFP"])  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


def test_output_folder_may_not_be_the_raw_folder(tmp_path: Path) -> None:
    raw, _ = _raw_store(tmp_path)
    with pytest.raises(ValueError, match="replace the input"):
        process_file(raw, raw.with_name("raw.ome.tiff"), Doubler())  # type: ignore[arg-type]


def test_process_command_channels_option(tmp_path: Path) -> None:
    raw, _ = _raw_store(tmp_path)
    torch.manual_seed(0)
    model = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny.safetensors")
    out = tmp_path / "out.ome.tiff"
    args = ["process", str(raw), "-m", str(model), "-o", str(out), "--channels", "epi"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--tile", "64"])
    assert result.exit_code == 0, result.output
    assert "saved" in result.output and (tmp_path / "out" / "out_p001.ome.tiff").is_file()
    bad = CliRunner().invoke(app, [*args[:-1], "GFP", "--overwrite"])
    assert bad.exit_code == 2 and "--channels" in bad.output
