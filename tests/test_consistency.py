"""Physics-consistency monitor: scores from one pass, calibration, flags, advice."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ctirf_live.config import Optics
from ctirf_live.inference.consistency import (
    METADATA_KEY,
    Consistency,
    ConsistencyMonitor,
    advice,
    calibrate,
    judge,
    record_calibration,
    scores,
)
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet, load_model, save_model

CALIBRATION = {
    "frames": 10,
    "residual": {"p1": 0.05, "p50": 0.1, "p99": 0.2},
    "in_focus": {"p1": 0.6, "p50": 0.68, "p99": 0.75},
}


def test_scores_measure_how_much_of_the_frame_the_model_explains() -> None:
    rng = np.random.default_rng(0)
    epi = (100 + 1000 * rng.random((64, 64))).astype(np.float32)
    perfect = scores(epi, 0.5 * epi, epi, 98.0)
    assert perfect.residual == pytest.approx(0.0, abs=1e-3)  # x clipped at its p98
    assert perfect.in_focus == pytest.approx(0.5, rel=1e-6)
    flat = scores(epi, 0.5 * epi, np.full_like(epi, epi.mean()), 98.0)
    assert 0.8 < flat.residual < 1.3  # a constant x^ explains none of the variance


def test_judge_flags_each_way_out_and_says_why() -> None:
    assert judge(Consistency(0.1, 0.68), CALIBRATION).flagged is False
    assert judge(Consistency(0.25, 0.68), CALIBRATION).flagged is False  # within the margin
    high = judge(Consistency(0.5, 0.68), CALIBRATION)
    assert high.flagged and "residual 0.500 > 0.300" in high.reason
    low = judge(Consistency(0.1, 0.3), CALIBRATION)
    assert low.flagged and "in-focus share" in low.reason
    assert advice(1, 50, "m") == ""
    assert advice(30, 50, "m") == (
        "30 of 50 frames are outside what model m was trained on: collect pairs with "
        "ctirf calibrate and fine-tune"
    )


def test_a_calibration_is_stored_in_the_checkpoint_and_used(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "m.safetensors")
    rng = np.random.default_rng(1)
    frames = [(100 + 900 * rng.random((64, 64))).astype(np.float32) for _ in range(6)]
    calib = calibrate(Restorer(path, device="cpu"), frames)
    assert calib["frames"] == 6 and calib["residual"]["p1"] <= calib["residual"]["p99"]
    record_calibration(path, calib)
    _, meta = load_model(path)
    assert meta[METADATA_KEY] == calib
    monitor = ConsistencyMonitor(Restorer(path, device="cpu"))
    assert monitor.calibrated
    ctirf, result, recon = monitor.restore(frames[0])
    assert ctirf.shape == recon.shape == (64, 64) and result.flagged is not None
    with pytest.raises(ValueError, match=">= 5 frames"):
        calibrate(Restorer(path, device="cpu"), frames[:2])


def test_the_shipped_model_flags_pure_noise_and_not_its_own_kind_of_frame() -> None:
    from ctirf_live.data.loaders import PairSource

    torch.set_num_threads(2)
    restorer = Restorer("et2dnet_s0_60x_sim", device="cpu")
    calib_frames = PairSource.synthetic(8, "60X", seed=21, roi=192, progress=False)
    monitor = ConsistencyMonitor(restorer, calibrate(restorer, [p.epi for p in calib_frames]))
    held_out = PairSource.synthetic(4, "60X", seed=22, roi=192, progress=False)
    flags = [monitor.restore(p.epi)[1].flagged for p in held_out]
    assert sum(flags) <= 1
    noise = np.random.default_rng(0).poisson(300, (192, 192)).astype(np.float32)
    verdict = monitor.restore(noise)[1]
    assert verdict.flagged and "residual" in verdict.reason


def test_ctirf_train_calibrates_the_monitor_into_its_checkpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctirf_live.cli import app

    out = tmp_path / "run"
    args = "train --synthetic 6 --variant tiny --epochs 1 --crop 64 --families factin"
    result = CliRunner().invoke(app, [*args.split(), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "consistency monitor calibrated on 6 frames" in result.output
    _, meta = load_model(out / "best.safetensors")
    assert meta[METADATA_KEY]["frames"] == 6
