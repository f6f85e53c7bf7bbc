import threading

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


def test_shipped_model_output_has_no_block_or_window_seams() -> None:
    """The restored frame's edges must not line up on the network's 32/64 px lattice
    (transposed-conv blocks, attention windows) more than the true TIRF's do."""
    from ctirf_live.data.loaders import PairSource
    from ctirf_live.evaluation.metrics import block_artifact_score

    torch.set_num_threads(2)
    pair = PairSource.synthetic(1, "60X", seed=9, roi=1024, exposure_ms=50, progress=False)[0]
    out = Restorer("et2dnet_s0_60x_sim", device="cpu").restore(pair.epi)
    for period in (32, 64):
        reference = max(block_artifact_score(pair.truth, period), 1.0)
        assert block_artifact_score(out, period) <= reference + 0.1, period
    # and no rim: the outermost rows and columns step no more than the interior does
    for axis in (0, 1):
        steps = np.abs(np.diff(out.astype(np.float64), axis=1 - axis)).mean(axis=axis)
        assert max(steps[0], steps[-1]) <= steps[8:-8].max(), axis


def test_ctirf_and_reconstructed_epi_come_from_one_pass() -> None:
    from ctirf_live.models.etnet import ET2dNet

    torch.manual_seed(0)
    restorer = Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)
    rng = np.random.default_rng(1)
    frame = (100 + 1000 * rng.random((96, 80))).astype(np.float32)  # tiled: 2 x 2 tiles
    both = restorer.restore(frame, output="ctirf+recon")
    assert both.shape == (2, 96, 80)
    np.testing.assert_allclose(both[0], restorer.restore(frame), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(both[1], restorer.restore(frame, "recon"), rtol=1e-5, atol=1e-4)
    assert both[1].mean() > 0  # x^ = g * psf + b is in the input's intensity scale


def test_cpu_inference_thread_flushes_denormals(restorer: Restorer) -> None:
    """Denormals slowed noisy frames 1.4-1.6x; the thread that restores flushes them."""
    seen: dict[str, float] = {}

    def work() -> None:
        torch.set_flush_denormal(False)  # a new thread inherits the flag of its parent
        tiny = torch.tensor([1e-39], dtype=torch.float32)
        seen["before"] = float(tiny * 1.0)
        restorer.restore(_frame((64, 64)))
        seen["after"] = float(tiny * 1.0)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen["before"] > 0  # the platform keeps denormals by default
    assert seen["after"] == 0.0


def test_restorer_clips_inputs_where_the_model_was_trained_to() -> None:
    torch.manual_seed(0)
    net = ET2dNet(Optics(), "tiny").eval()
    seen: list[float] = []
    net.backbone.register_forward_hook(lambda _m, args, _out: seen.append(float(args[0].max())))
    rng = np.random.default_rng(1)
    img = rng.poisson(200, size=(128, 128)).astype(np.uint16)
    img[60:62, 40:80] += 3000  # 80 px: far above the 98th percentile
    eq1 = Restorer(net, device="cpu", tile=128, overlap=32)
    assert eq1.input_ceiling == 1.0 and eq1.describe()["input_ceiling"] == 1.0
    clipped = eq1.restore(img)
    assert seen[-1] == pytest.approx(1.0)
    net.input_ceiling = None
    free = Restorer(net, device="cpu", tile=128, overlap=32)
    assert free.describe()["input_ceiling"] is None
    unclipped = free.restore(img)
    assert seen[-1] > 10.0
    assert not np.array_equal(clipped, unclipped)
