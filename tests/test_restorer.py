import numpy as np
import pytest
import torch

from ctirf_live.config import Optics
from ctirf_live.inference.restorer import Restorer, pixel_size_warning
from ctirf_live.inference.tiling import Blender, plan_tiles
from ctirf_live.models.etnet import ET2dNet, ET3dNet


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=128, overlap=32)


def _frame(shape=(200, 232), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.poisson(200, size=shape).astype(np.uint16)
    img[50:60, 40:180] += 3000
    return img


def test_output_in_input_scale(restorer: Restorer) -> None:
    img = _frame()
    out = restorer.restore(img)
    assert out.shape == img.shape and out.dtype == np.float32
    assert (out >= 0).all()
    # scale follows the input: doubling the input doubles the output
    np.testing.assert_allclose(restorer.restore(img.astype(np.float32) * 2), out * 2, rtol=1e-4)


def test_tiled_matches_whole_frame_without_seams(restorer: Restorer) -> None:
    img = _frame((256, 256), seed=1)
    whole = Restorer(restorer.model, device="cpu", tile=512).restore(img)
    tiled = restorer.restore(img)  # 128 px tiles, 32 px overlap
    assert len(plan_tiles(img.shape, 128, 32)) > 1
    rel = np.abs(tiled - whole).max() / whole.max()
    assert rel < 0.02, rel
    # no seams: the tiling error changes smoothly, with no jump from one column to the next
    jump = np.abs(np.diff(tiled - whole, axis=1)).max() / whole.max()
    assert jump < 0.0025, jump


def test_series_is_processed_slice_wise(restorer: Restorer) -> None:
    series = np.stack([_frame((64, 64), seed=s) for s in range(3)])
    out = restorer.restore(series)
    assert out.shape == series.shape
    np.testing.assert_allclose(out[1], restorer.restore(series[1]), rtol=1e-5)


def test_bad_inputs_are_clear(restorer: Restorer) -> None:
    with pytest.raises(ValueError, match="too small"):
        restorer.restore(np.zeros((16, 16)))
    bad = np.ones((64, 64), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        restorer.restore(bad)
    with pytest.raises(ValueError, match="expects"):
        restorer.restore(np.zeros((2, 2, 64, 64)))


def test_3d_restorer_takes_stacks() -> None:
    torch.manual_seed(0)
    r = Restorer(ET3dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)
    stack = np.stack([_frame((96, 96), seed=s) for s in range(6)])
    out = r.restore(stack)
    assert out.shape == (6, 96, 96)
    r.warmup((64, 64))
    assert r.warmed_up


def test_pixel_size_warning() -> None:
    assert pixel_size_warning(Optics(), 0.0975) is None
    msg = pixel_size_warning(Optics(), 0.0585)
    assert msg is not None and "finetune" in msg


def test_blender_is_exact_for_constant_tiles() -> None:
    tiles = plan_tiles((100, 130), 64, 16)
    b = Blender((100, 130), 16)
    for t in tiles:
        b.add(t, np.full((t.y1 - t.y0, t.x1 - t.x0), 7.0, np.float32))
    np.testing.assert_allclose(b.result(), 7.0, rtol=1e-5)


def test_process_cli_round_trip(tmp_path, restorer: Restorer) -> None:
    from typer.testing import CliRunner

    from ctirf_live.cli import app
    from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff
    from ctirf_live.models.etnet import save_model

    model_path = save_model(restorer.model, tmp_path / "tiny")
    series = np.stack([_frame((64, 96), seed=s) for s in range(2)])
    src = write_ome_tiff(
        tmp_path / "in.ome.tif", series, "TYX", pixel_size_um=0.0975, metadata={"mode": "EPI"}
    )
    out = tmp_path / "out.ome.tif"
    result = CliRunner().invoke(app, ["process", str(src), "-m", str(model_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    data, info = read_ome_tiff(out)
    assert data.shape == series.shape and data.dtype == np.float32
    assert info.pixel_size_um == pytest.approx(0.0975)
    assert info.metadata["mode"] == "EPI"  # input metadata kept
    assert info.metadata["ctirf_processing"]["architecture"]["name"] == "ET2dNet"

    # wrong pixel size: processed, with a warning that says how to fix it
    src2 = write_ome_tiff(tmp_path / "in2.ome.tif", series[0], "YX", pixel_size_um=0.0585)
    result = CliRunner().invoke(
        app, ["process", str(src2), "-m", str(model_path), "-o", str(tmp_path / "o2.tif")]
    )
    assert result.exit_code == 0 and "finetune" in result.output

    # missing model: one line, exit 2
    result = CliRunner().invoke(
        app, ["process", str(src), "-m", str(tmp_path / "nope.safetensors"), "-o", str(out)]
    )
    assert result.exit_code == 2 and "not found" in result.output
