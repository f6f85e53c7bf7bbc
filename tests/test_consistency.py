"""Physics-consistency monitor: scores from one pass, calibration, flags, where they land."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import useq

from ctirf_live.config import Optics
from ctirf_live.inference.consistency import (
    IMAGE_SCORES,
    METADATA_KEY,
    SCORES,
    SPECTRUM_BANDS,
    Consistency,
    ConsistencyMonitor,
    advice,
    calibrate,
    context_reasons,
    focus_tolerance_um,
    judge,
    limits,
    plane_scores,
    record_calibration,
    sidecar_path,
)
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet, load_model, save_model
from ctirf_live.optics.forward import fft_convolve
from ctirf_live.optics.psf import psf_2d

WIDTH = len(IMAGE_SCORES) + SPECTRUM_BANDS  # a row of plane_scores
CALIBRATION = {
    "frames": 10,
    "residual": {"p1": 0.05, "p50": 0.1, "p99": 0.2},
    "in_focus": {"p1": 0.6, "p50": 0.68, "p99": 0.75},
}


def _scene(seed: int, side: int = 128, photons: float = 400.0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy EPI, noise-free EPI) of random puncta through the 60X in-focus PSF, in
    photons on a background: a frame a perfect model would explain down to the noise."""
    rng = np.random.default_rng(seed)
    optics = Optics()
    obj = np.zeros((side, side), np.float32)
    obj[rng.integers(0, side, 60), rng.integers(0, side, 60)] = rng.uniform(2, 6, 60)
    clean = fft_convolve(torch.from_numpy(obj), psf_2d(optics, 65)).numpy()
    clean = photons * (0.2 + clean / clean.max())
    return rng.poisson(clean).astype(np.float32), clean.astype(np.float32)


def _scores(epi: np.ndarray, recon: np.ndarray, g: np.ndarray) -> Consistency:
    scale = np.percentile(epi, 98)
    x = np.clip(epi / scale, 0, 1)
    t = [torch.from_numpy(np.asarray(a / scale, np.float32))[None] for a in (recon, recon, g)]
    row = plane_scores(torch.from_numpy(x)[None], 0.7 * t[0], t[1], t[2], Optics())
    return Consistency.from_row(row[0].numpy())


def test_scores_tell_a_model_that_explains_the_frame_from_one_that_does_not() -> None:
    epi, clean = _scene(0)
    good = _scores(epi, clean, clean)
    flat = _scores(epi, np.full_like(epi, epi.mean()), clean)
    assert good.ms_ssim < 0.2 < flat.ms_ssim
    assert good.residual < 0.8 < flat.residual < 1.3  # a constant x^ explains nothing
    # what a perfect model leaves is the noise the frame's own intensity predicts
    assert 0.7 < good.noise_ratio < 1.3 and flat.noise_ratio > 1.8
    assert 0.7 < good.band_misfit < 1.3 and flat.band_misfit > 1.8
    assert good.in_focus == pytest.approx(0.7, rel=1e-5)
    # g with detail beyond the cut-off: energy the PSF cannot transmit
    sharp = np.random.default_rng(1).random(epi.shape).astype(np.float32) * epi.mean()
    assert _scores(epi, clean, sharp).g_unexplained > 0.3 > good.g_unexplained


def test_limits_judge_each_score_on_its_side_and_say_why() -> None:
    assert judge(Consistency(residual=0.1, in_focus=0.68), limits(CALIBRATION)).flagged is False
    bounds = limits(CALIBRATION)  # p99 + (p99 - p50): residual up to 0.3
    assert bounds["residual"] == (-math.inf, pytest.approx(0.3))
    assert judge(Consistency(residual=0.25, in_focus=0.68), bounds).flagged is False
    high = judge(Consistency(residual=0.5, in_focus=0.68), bounds)
    assert high.flagged and "residual 0.5 > 0.3" in high.reason
    low = judge(Consistency(residual=0.1, in_focus=0.3), bounds)
    assert low.flagged and "in_focus 0.3 < 0.52" in low.reason
    stricter = limits(CALIBRATION, widen=0.0)
    assert judge(Consistency(residual=0.25, in_focus=0.68), stricter).flagged
    assert judge(Consistency(in_focus=0.68), bounds).flagged is False  # NaN: not judged
    with pytest.raises(ValueError, match="no p95 of residual"):
        limits(CALIBRATION, quantile=95)
    assert advice(1, 50, "m") == ""
    assert advice(30, 50, "m") == (
        "30 of 50 frames are outside what model m was trained on: collect pairs with "
        "ctirf calibrate and fine-tune"
    )


def test_the_spectrum_tells_another_kind_of_specimen(tiny_path: Path) -> None:
    """Calibrated on puncta frames: another puncta frame is near their spectrum; broad
    haze (nothing sharp) and pure noise (nothing above the floor) are far from it."""
    restorer = Restorer(tiny_path, device="cpu")
    calib = calibrate(restorer, [_scene(i, 128)[0] for i in range(8)], "puncta")
    reference = calib["spectrum_reference"]
    assert len(reference["mean"]) == len(reference["std"]) == SPECTRUM_BANDS
    monitor = ConsistencyMonitor(restorer, calib)
    limit = monitor.bounds["spectrum"][1]
    same = monitor.restore(_scene(20, 128)[0]).planes[0]
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:128, :128]
    haze = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 15.0**2))
               for cy, cx in rng.uniform(0, 128, (6, 2)))
    haze = rng.poisson(400 * (0.2 + haze / haze.max())).astype(np.float32)
    noise = rng.poisson(300, (128, 128)).astype(np.float32)
    far = [monitor.restore(f).planes[0] for f in (haze, noise)]
    assert same.spectrum < limit and not same.flagged
    assert all(p.spectrum > limit + 1.0 and "spectrum" in p.reason for p in far)
    assert far[1].spectrum > 2 * limit  # noise: no structure above the floor at all


def test_focus_away_from_the_reference_and_another_pixel_size_flag_without_calibration(
) -> None:
    """No image score can see these; the acquisition's facts can, calibrated or not."""
    from types import SimpleNamespace

    optics = Optics()  # 60X, NA 1.5, 670 nm: depth of field 0.45 um
    assert focus_tolerance_um(optics) == pytest.approx(0.670 * 1.518 / 1.5**2)
    model = SimpleNamespace(dims=2, optics=optics, metadata={}, model=SimpleNamespace(name="m"))
    monitor = ConsistencyMonitor(model, calibration={})  # type: ignore[arg-type]
    row = np.zeros((1, WIDTH))
    assert monitor.verdicts(row, [2.0])[0].flagged is None  # no reference: not checked
    monitor.focus_reference_um = 10.0
    near, far, unknown = (monitor.verdicts(row, [z])[0] for z in (10.3, 8.5, None))
    assert near.flagged is None and near.focus_offset_um == pytest.approx(0.3)
    assert far.flagged and "focus -1.50 um from the reference" in far.reason
    assert unknown.flagged is None and math.isnan(unknown.focus_offset_um)
    monitor.pixel_size_um = 0.065  # the 100X rig
    other_rig = monitor.verdicts(row, [10.0])[0]
    assert other_rig.flagged and other_rig.reason == "pixel 65.0 nm, model trained at 97.5 nm"
    assert context_reasons(optics, 0.0, 0.099) == []  # within 5%
    # a 3D model's stack spans depth: its planes are placed by the lowest one
    model.dims = 3
    monitor.pixel_size_um = None
    stack = monitor.verdicts(np.zeros((3, WIDTH)), [10.0, 10.2, 10.4])
    assert [p.flagged for p in stack] == [None] * 3
    assert all(p.focus_offset_um == 0.0 for p in stack)
    high = monitor.verdicts(np.zeros((3, WIDTH)), [11.0, 11.2, 11.4])
    assert all(p.flagged and "focus +1.00 um" in p.reason for p in high)


def test_acquire_flags_the_planes_of_a_stack_beyond_the_depth_of_field(
    tiny_path: Path, demo_core, tmp_path: Path
) -> None:
    """An ET2dNet restoring a z-stack: the planes away from the run's focus are flagged,
    the sidecar records each plane's offset, the summary the facts checked."""
    from ctirf_live.inference.acquire import acquire

    restorer = Restorer(tiny_path, device="cpu", tile=128)
    monitor = ConsistencyMonitor(restorer, calibration={})  # only the acquisition's facts
    demo_core.setPosition(1.0)  # the run's focus, the planes' reference
    seq = useq.MDASequence(z_plan={"range": 2.0, "step": 0.5}, stage_positions=[(0, 0, 1.0)],
                           channels=[{"config": "EPI", "exposure": 2}])
    result = acquire(demo_core, seq, restorer, tmp_path / "run", consistency=monitor)
    rows = list(csv.DictReader(sidecar_path(result.ctirf_path).open()))
    offsets = [float(r["focus_offset_um"]) for r in rows]
    assert offsets == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert [r["flagged"] for r in rows] == ["1", "1", "", "1", "1"]
    assert "depth of field 0.45 um" in rows[0]["reason"]
    summary = json.loads(result.summary_path.read_text())["consistency"]
    assert summary["flagged"] == 4 and summary["context"]["focus_reference_um"] == 1.0
    assert summary["context"]["pixel_size_um"] == pytest.approx(0.0975)
    assert result.advice.startswith("4 of 5 frames are outside what model m was trained on")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "m.safetensors"
    return save_model(ET2dNet(Optics(), "tiny"), path)


def test_a_calibration_is_stored_in_the_checkpoint_and_used(tiny_path: Path) -> None:
    frames = [_scene(i, 96)[0] for i in range(6)]
    calib = calibrate(Restorer(tiny_path, device="cpu"), frames, "six puncta frames")
    assert calib["frames"] == 6 and calib["source"] == "six puncta frames"
    assert set(SCORES) <= set(calib) and calib["ms_ssim"]["p1"] <= calib["ms_ssim"]["p99"]
    record_calibration(tiny_path, calib)
    _, meta = load_model(tiny_path)
    assert meta[METADATA_KEY] == calib
    monitor = ConsistencyMonitor(Restorer(tiny_path, device="cpu"))
    assert monitor.calibrated
    scored = monitor.restore(np.stack(frames[:2]))  # a series: one verdict per plane
    assert scored.ctirf.shape == scored.residual.shape == (2, 96, 96)
    assert [p.flagged for p in scored.planes] == [False, False]  # its own calibration frames
    np.testing.assert_allclose(scored.ctirf[0], monitor.restorer.restore(frames[0]), atol=1e-4)
    with pytest.raises(ValueError, match=">= 5 frames"):
        calibrate(Restorer(tiny_path, device="cpu"), frames[:2])


def test_acquire_and_process_record_the_scores_per_plane(tiny_path: Path, demo_core,
                                                         tmp_path: Path) -> None:
    from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff
    from ctirf_live.inference.acquire import acquire
    from ctirf_live.inference.process import process_file
    from ctirf_live.inference.writers import read_result

    restorer = Restorer(tiny_path, device="cpu", tile=128)
    strict = {**restorer.metadata[METADATA_KEY]}
    strict["residual"] = {"p1": 0.0, "p50": 0.0, "p99": 0.0}  # every frame beyond it
    monitor = ConsistencyMonitor(restorer, strict)
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 3},
                           z_plan={"range": 0.2, "step": 0.2},
                           channels=[{"config": "EPI", "exposure": 2}])
    result = acquire(demo_core, seq, restorer, tmp_path / "run", fmt="ome-zarr",
                     consistency=monitor)
    assert result.stats.consistency_frames == 6 and result.stats.consistency_flagged == 6
    assert result.stats.consistency_last["flagged"] is True
    assert result.advice.startswith("6 of 6 frames are outside what model m was trained on")
    summary = json.loads(result.summary_path.read_text())["consistency"]
    assert summary["flagged"] == 6 and summary["planes"]["z"] == [0, 1] * 3
    rows = list(csv.DictReader(sidecar_path(result.ctirf_path).open()))
    assert [(r["t"], r["z"], r["flagged"]) for r in rows[:2]] == [("0", "0", "1"), ("0", "1", "1")]
    _, attrs = read_result(result.ctirf_path)
    assert attrs["consistency"]["frames"] == 6 and len(attrs["consistency"]["planes"]["t"]) == 6

    frames = np.stack([_scene(i, 96)[0] for i in range(3)])
    src = write_ome_tiff(tmp_path / "epi.ome.tiff", frames, "TYX")
    out, warnings = process_file(src, tmp_path / "out.ome.tiff", restorer)
    rows = list(csv.DictReader(sidecar_path(out).open()))
    assert [r["plane"] for r in rows] == ["0", "1", "2"] and rows[0]["flagged"] == "0"
    _, info = read_ome_tiff(out)
    assert info.metadata["ctirf_processing"]["consistency"]["frames"] == 3
    assert not any("outside what model" in w for w in warnings)


def test_the_shipped_model_flags_pure_noise_and_not_its_own_kind_of_frame() -> None:
    from ctirf_live.data.loaders import PairSource

    torch.set_num_threads(2)
    restorer = Restorer("et2dnet_s0_60x_sim", device="cpu")
    monitor = ConsistencyMonitor(restorer)
    assert monitor.calibrated
    families = ("factin", "membrane", "tissue")
    held_out = PairSource.synthetic(3, "60X", seed=22, roi=160, progress=False, families=families)
    flags = [monitor.restore(p.epi).flagged for p in held_out.pairs]
    assert sum(flags) <= 1
    noise = np.random.default_rng(0).poisson(300, (160, 160)).astype(np.float32)
    verdict = monitor.restore(noise).planes[0]
    assert verdict.flagged and "residual" in verdict.reason


def test_ctirf_train_calibrates_the_monitor_into_its_checkpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctirf_live.cli import app

    out = tmp_path / "run"
    args = "train --synthetic 6 --variant tiny --epochs 1 --crop 64 --families factin"
    result = CliRunner().invoke(app, [*args.split(), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "consistency monitor calibrated on" in result.output
    _, meta = load_model(out / "best.safetensors")
    assert meta[METADATA_KEY]["frames"] >= 5 and "validation" in meta[METADATA_KEY]["source"]
