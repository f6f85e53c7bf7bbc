"""EPI -> TIRF registration by mutual information.

Sign convention under test: `shift_px` is the shift to apply to EPI
(`apply_shift(epi, shift_px)`) to lie on TIRF; if the TIRF content sits at +d pixels
relative to the EPI content, `shift_px == d`. On the simulated rig the content of a frame
moves by the drift drawn at the last illumination switch, so d = drift(TIRF) - drift(EPI).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctirf_live.acquisition.calibration import assess_pair
from ctirf_live.acquisition.registration import Registration, mutual_information, register
from ctirf_live.data.dataset import apply_shift


def _filaments(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    img = np.zeros((size, size), np.float32)
    for _ in range(n):
        y0, x0 = rng.uniform(0, size, 2)
        angle, length = rng.uniform(0, np.pi), rng.uniform(20, 120)
        t = np.linspace(0, length, int(2 * length))
        ys, xs = (y0 + t * np.sin(angle)).astype(int), (x0 + t * np.cos(angle)).astype(int)
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        img[ys[ok], xs[ok]] += 1
    return img


def _pair(rng: np.random.Generator, d: tuple[float, float], size: int = 256):
    """EPI (bottom layer + hazy upper layers + illumination slope) and TIRF shifted by d."""
    big = size + 32
    bottom = ndimage.gaussian_filter(_filaments(rng, 80, big), 1.3)
    upper = ndimage.gaussian_filter(_filaments(rng, 150, big), 5.0)
    slope = np.linspace(0.7, 1.0, big, dtype=np.float32)[None, :]
    epi = (0.6 * bottom + 1.5 * upper + 0.02) * slope
    tirf = ndimage.shift(bottom, d, order=3) + 0.005
    crop = (slice(16, 16 + size),) * 2
    epi = rng.poisson(epi[crop] * 2000 / epi.max()).astype(np.float32) + 100
    tirf = rng.poisson(np.clip(tirf[crop], 0, None) * 1500 / tirf.max()).astype(np.float32) + 100
    return epi, tirf


@pytest.mark.parametrize("d", [(0.0, 0.0), (0.37, -1.62), (-2.15, 0.8)])
def test_recovers_subpixel_shift_between_modalities(d: tuple[float, float]) -> None:
    rng = np.random.default_rng(1)
    epi, tirf = _pair(rng, d)
    reg = register(epi, tirf)
    assert isinstance(reg, Registration)
    assert np.hypot(reg.shift_px[0] - d[0], reg.shift_px[1] - d[1]) < 0.1
    assert not reg.flagged
    # applying the shift to EPI aligns it on TIRF better than leaving it
    aligned = apply_shift(epi, reg.shift_px)
    inner = (slice(8, -8),) * 2
    assert (
        mutual_information(aligned[inner], tirf[inner])
        >= mutual_information(epi[inner], tirf[inner]) - 1e-3
    )


def test_large_shift_is_measured_and_flagged() -> None:
    rng = np.random.default_rng(2)
    epi, tirf = _pair(rng, (3.5, 1.2))
    reg = register(epi, tirf, max_shift_px=3.0)
    assert reg.flagged
    assert reg.shift_px == pytest.approx((3.5, 1.2), abs=0.15)
    assert not register(epi, tirf, max_shift_px=5.0).flagged


def test_shift_beyond_search_is_flagged() -> None:
    rng = np.random.default_rng(3)
    epi, tirf = _pair(rng, (0.0, 14.0))
    assert register(epi, tirf, max_shift_px=20.0, search_px=6).flagged


def test_bad_input_and_blank_frames() -> None:
    with pytest.raises(ValueError, match="equal 2D frames"):
        register(np.zeros((64, 64)), np.zeros((64, 32)))
    with pytest.raises(ValueError, match="too small"):
        register(np.zeros((32, 32)), np.zeros((32, 32)))
    flat = np.full((96, 96), 100.0, np.float32)
    reg = register(flat, flat)
    assert np.all(np.isfinite(reg.shift_px)) and reg.mi == pytest.approx(0.0, abs=1e-9)


def test_mutual_information_prefers_related_images() -> None:
    rng = np.random.default_rng(4)
    epi, tirf = _pair(rng, (0.0, 0.0), size=128)
    noise = rng.normal(size=tirf.shape)
    assert mutual_information(epi, tirf) > 2 * mutual_information(noise, tirf)


def test_simulated_drift_recovered_within_0_2_px() -> None:
    """Real simulated EPI/TIRF pairs (haze, different illumination, noise)."""
    from ctirf_live.sim.scope import SimulatedMicroscope

    scope = SimulatedMicroscope(seed=0)
    scope.exposure_ms = 100
    scope.roi = (896, 896, 256, 256)
    psf_sigma = 0.21 * 0.67 / 1.5 / 0.0975
    errors = []
    for xy in [(0.0, 0.0), (-30.0, 0.0), (30.0, 30.0), (0.0, -30.0), (-30.0, 30.0)]:
        scope.xy_um = xy
        scope.set_illumination("EPI")
        d_epi, epi = scope.drift_px, scope.snap()
        scope.set_illumination("TIRF")
        d_tirf, tirf = scope.drift_px, scope.snap()
        if not assess_pair(epi, tirf, psf_sigma_px=psf_sigma).ok:
            continue  # registration is only promised on fields the gate accepts
        truth = (d_tirf[0] - d_epi[0], d_tirf[1] - d_epi[1])
        reg = register(epi, tirf)
        errors.append(np.hypot(reg.shift_px[0] - truth[0], reg.shift_px[1] - truth[1]))
    assert len(errors) >= 3
    assert max(errors) < 0.2
