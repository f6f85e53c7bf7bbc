import math

import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim as reference_ms_ssim
from scipy import ndimage

from ctirf_live.data.normalize import normalize
from ctirf_live.evaluation.metrics import (
    axial_cutoff,
    decorrelation_cutoff,
    ms_ssim,
    psnr,
    reslice,
)


def _structured(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 2) * 1000 + 100


def _band_limited(
    rng: np.random.Generator, shape: tuple[int, int], ky0: float, kx0: float
) -> np.ndarray:
    """White noise keeping only frequencies inside the ellipse (ky/ky0)^2 + (kx/kx0)^2 < 1."""
    spectrum = np.fft.fft2(rng.standard_normal(shape))
    ky = 2 * np.fft.fftfreq(shape[0])[:, None]
    kx = 2 * np.fft.fftfreq(shape[1])[None, :]
    spectrum[(ky / ky0) ** 2 + (kx / kx0) ** 2 >= 1] = 0
    return np.fft.ifft2(spectrum).real


def _spots(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    img = np.zeros(shape)
    img[tuple(rng.integers(0, s, n) for s in shape)] = 1000.0
    return img


# ------------------------------------------------------------------ MS-SSIM and PSNR


def test_ms_ssim_of_image_with_itself_is_one() -> None:
    rng = np.random.default_rng(0)
    img = _structured(rng, (64, 80)).astype(np.uint16)
    assert ms_ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    stack = np.stack([img, img // 2])
    assert ms_ssim(stack, stack) == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_falls_monotonically_with_noise() -> None:
    rng = np.random.default_rng(1)
    img = _structured(rng, (64, 64))
    scores = [ms_ssim(img, img + rng.normal(0, s, img.shape)) for s in (5, 20, 50, 100, 200)]
    assert np.all(np.diff(scores) < 0)
    assert scores[0] > 0.99 and scores[-1] < 0.6


def test_ms_ssim_matches_pytorch_msssim_when_all_scales_fit() -> None:
    rng = np.random.default_rng(2)
    img = _structured(rng, (128, 112))
    noisy = img + rng.normal(0, 30, img.shape)
    a, b = (torch.from_numpy(normalize(x)[0])[None, None] for x in (img, noisy))
    expected = float(reference_ms_ssim(a, b, data_range=1.0, win_size=7))
    assert ms_ssim(img, noisy) == pytest.approx(expected, abs=1e-6)


def test_ms_ssim_rejects_mismatched_and_tiny_images() -> None:
    with pytest.raises(ValueError, match="shape"):
        ms_ssim(np.ones((64, 64)), np.ones((64, 65)))
    with pytest.raises(ValueError, match="too small"):
        ms_ssim(np.ones((24, 100)), np.ones((24, 100)))


def test_psnr_is_infinite_for_identical_images_and_falls_with_noise() -> None:
    rng = np.random.default_rng(3)
    img = _structured(rng, (48, 48)).astype(np.float32)
    assert math.isinf(psnr(img, img))
    values = [psnr(img, img + rng.normal(0, s, img.shape)) for s in (5, 20, 80)]
    assert values[0] > values[1] > values[2]
    with pytest.raises(ValueError, match="shape"):
        psnr(img, img[:-1])


# -------------------------------------------------------------- decorrelation analysis


@pytest.mark.parametrize("k0", [0.3, 0.5])
def test_decorrelation_finds_band_limit_of_white_noise(k0: float) -> None:
    img = _band_limited(np.random.default_rng(4), (128, 128), k0, k0)
    result = decorrelation_cutoff(img)
    assert result.kc == pytest.approx(k0, rel=0.1)
    assert result.a0 > 0.5
    assert result.resolution(0.1) == pytest.approx(0.2 / result.kc)


def test_decorrelation_on_non_square_image() -> None:
    img = _band_limited(np.random.default_rng(5), (64, 160), 0.4, 0.4)
    assert decorrelation_cutoff(img).kc == pytest.approx(0.4, rel=0.1)


def test_sectors_measure_the_cutoff_along_each_direction() -> None:
    img = _band_limited(np.random.default_rng(6), (201, 256), 0.3, 0.7)
    along_rows = decorrelation_cutoff(img, sector=4, n_sectors=8).kc
    along_cols = decorrelation_cutoff(img, sector=0, n_sectors=8).kc
    assert along_rows == pytest.approx(0.3, rel=0.1)
    assert along_cols == pytest.approx(0.7, rel=0.1)
    with pytest.raises(ValueError, match="sector"):
        decorrelation_cutoff(img, sector=8, n_sectors=8)


def test_blur_lowers_the_cutoff() -> None:
    rng = np.random.default_rng(7)
    spots = _spots(rng, (128, 128), 300)
    kcs = [
        decorrelation_cutoff(rng.poisson(ndimage.gaussian_filter(spots, s) + 100.0)).kc
        for s in (1.0, 2.5)
    ]
    assert kcs[0] > 1.5 * kcs[1] > 0


def test_white_noise_has_no_cutoff() -> None:
    result = decorrelation_cutoff(np.random.default_rng(8).standard_normal((64, 64)))
    assert result.kc == 0.0
    assert math.isinf(result.resolution(0.1))


# ------------------------------------------------------------------- axial resolution


def test_reslice_shapes_and_orientation() -> None:
    stack = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    xz, yz = reslice(stack, "xz"), reslice(stack, "yz")
    assert xz.shape == (5, 4, 6) and yz.shape == (6, 4, 5)
    assert xz[2, 3, 1] == stack[3, 2, 1]
    assert yz[1, 3, 2] == stack[3, 2, 1]
    with pytest.raises(ValueError, match="axis"):
        reslice(stack, "xy")  # type: ignore[arg-type]


def test_more_axial_blur_gives_lower_axial_cutoff() -> None:
    rng = np.random.default_rng(9)
    volume = _spots(rng, (64, 96, 128), 3000)
    kcs = []
    for sigma_z in (1.0, 4.0):
        blurred = ndimage.gaussian_filter(volume, (sigma_z, 1.0, 1.0)) + 20.0
        kcs.append(axial_cutoff(rng.poisson(blurred).astype(np.float32), "xz", max_sections=8))
    assert kcs[0] > 1.8 * kcs[1] > 0




def test_block_artifact_score_finds_a_faint_lattice_and_ignores_content() -> None:
    from ctirf_live.evaluation.metrics import block_artifact_score

    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.random((512, 512)), 3.0)
    assert block_artifact_score(smooth, 32) < 1.1
    span = float(smooth.max() - smooth.min())
    blocks = np.kron(rng.normal(0.0, 1.0, (16, 16)), np.ones((32, 32))) * 0.02 * span
    assert block_artifact_score(smooth + blocks, 32) > 1.3
    with pytest.raises(ValueError, match="at least 144 px"):
        block_artifact_score(smooth[:100], 32)
