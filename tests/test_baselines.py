import numpy as np
import pytest
from scipy import ndimage

from ctirf_live.evaluation.baselines import (
    BASELINES,
    NEEDS_PSF,
    background_filter,
    richardson_lucy,
    rolling_ball,
    wbns,
)

SHAPE = (80, 80)


def _psf(sigma: float = 1.5) -> np.ndarray:
    yy, xx = np.mgrid[-7:8, -7:8]
    return np.exp(-(yy**2 + xx**2) / (2 * sigma**2))


def _spots_on_background(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blurred sparse spots (peak ~1000) on a uniform 100 with Poisson noise, as uint16."""
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(8, SHAPE[0] - 8, 12), rng.integers(8, SHAPE[1] - 8, 12)
    img = np.zeros(SHAPE)
    img[ys, xs] = 1.0
    img = ndimage.gaussian_filter(img, 1.5)
    img = img / img.max() * 1000 + 100
    far = np.ones(SHAPE, bool)
    for y, x in zip(ys, xs, strict=True):
        far[y - 6 : y + 7, x - 6 : x + 7] = False
    return rng.poisson(img).astype(np.uint16), (ys, xs), far


def _run(name: str, image: np.ndarray) -> np.ndarray:
    kwargs = {"psf": _psf()} if name in NEEDS_PSF else {}
    if name == "rolling_ball":
        kwargs["radius_px"] = 10
    return BASELINES[name](image, **kwargs)


@pytest.mark.parametrize(
    ("name", "factor"), [("rl", 0.5), ("wbns", 0.2), ("rolling_ball", 0.4), ("bf", 0.2)]
)
def test_each_baseline_reduces_uniform_background(name: str, factor: float) -> None:
    image, spots, far = _spots_on_background(0)
    out = _run(name, image)
    assert out.dtype == np.float32 and out.shape == image.shape

    def bg_to_peak(x: np.ndarray) -> float:
        return float(np.median(x[far]) / x[spots].max())

    assert bg_to_peak(out) < factor * bg_to_peak(image.astype(np.float64))


def test_richardson_lucy_sharpens_a_blurred_spot() -> None:
    img = np.zeros((48, 48))
    img[24, 24] = 1.0
    blurred = ndimage.gaussian_filter(img, 1.5) * 5000 + 50
    out = richardson_lucy(blurred, _psf(1.5), iterations=20)
    assert out[24, 24] > 2 * blurred[24, 24]
    assert out.sum() == pytest.approx(blurred.sum(), rel=0.05)


def test_stacks_are_processed_slice_by_slice() -> None:
    image, _, _ = _spots_on_background(1)
    stack = np.stack([image, image // 2])
    out = background_filter(stack, sigma_px=10)
    assert out.shape == stack.shape
    np.testing.assert_allclose(out[0], background_filter(image, sigma_px=10), rtol=1e-6)


def test_invalid_parameters_are_refused() -> None:
    image = np.ones((16, 16))
    with pytest.raises(ValueError, match="psf"):
        richardson_lucy(image, np.ones(5))
    with pytest.raises(ValueError, match="resolution_px"):
        wbns(image, resolution_px=0.5)
    with pytest.raises(ValueError, match="radius_px"):
        rolling_ball(image, radius_px=0)
    with pytest.raises(ValueError, match="shape"):
        background_filter(np.ones(16))


def test_richardson_lucy_3d_sharpens_a_blurred_bead_in_all_axes() -> None:
    from scipy import ndimage

    from ctirf_live.evaluation.baselines import richardson_lucy_3d

    vol = np.zeros((9, 33, 33))
    vol[4, 16, 16] = 1000.0
    psf = np.zeros((5, 9, 9))
    psf[2, 4, 4] = 1.0
    psf = ndimage.gaussian_filter(psf, (1.0, 1.5, 1.5))
    blurred = ndimage.convolve(vol, psf, mode="constant") + 10.0
    out = richardson_lucy_3d(blurred, psf, iterations=30)
    assert out.shape == blurred.shape and out.dtype == np.float32
    assert out[4, 16, 16] > 2 * blurred[4, 16, 16]
    assert out[2, 16, 16] / out[4, 16, 16] < blurred[2, 16, 16] / blurred[4, 16, 16]
    with pytest.raises(ValueError, match="stack"):
        richardson_lucy_3d(blurred[0], psf)
