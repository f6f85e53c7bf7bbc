import numpy as np
import pytest

from ctirf_live.evaluation.identifiability import fit_lookalike, height_lookalikes
from ctirf_live.evaluation.sectioning import build_scene

X = np.arange(-12, 13, dtype=np.float64)


def _gauss(sigma_px: float, amp: float = 1.0, centre: float = 0.0) -> np.ndarray:
    return amp * np.exp(-0.5 * ((X - centre) / sigma_px) ** 2)


def test_a_blurred_dimmer_copy_is_its_own_lookalike_and_leaves_no_residual() -> None:
    # Gaussian of sigma 2 px blurred by 1.5 px has sigma 2.5 px: the fit finds that blur
    target = _gauss(2.5, 0.4 * 2.0 / 2.5)
    ratio, blur_um, residual = fit_lookalike(_gauss(2.0), target, pixel_um=0.1)
    assert blur_um == pytest.approx(0.15, abs=0.01)
    assert ratio == pytest.approx(0.4 * 2.0 / 2.5, rel=0.02)
    assert np.abs(residual).max() < 0.01 * target.max()


def test_a_shape_no_blur_can_make_leaves_a_residual() -> None:
    split = _gauss(1.5, 0.5, -4.0) + _gauss(1.5, 0.5, 4.0)  # two lines 8 px apart
    _, _, residual = fit_lookalike(_gauss(1.5), split, pixel_um=0.1)
    assert np.sqrt(np.mean(residual**2)) > 0.05 * split.max()


def test_unchanged_profile_needs_no_blur() -> None:
    ratio, blur_um, residual = fit_lookalike(_gauss(2.0), _gauss(2.0, 0.7), pixel_um=0.1)
    assert blur_um < 0.005 and ratio == pytest.approx(0.7, rel=1e-3)
    assert np.abs(residual).max() < 1e-3


def test_raised_filaments_need_more_blur_and_separate_less_when_dim() -> None:
    rows = {(r.level, r.height_um): r for r in height_lookalikes(build_scene(seed=11))}
    for level in ("bright", "dim"):
        blurs = [rows[(level, z)].blur_um for z in (0.2, 0.5, 1.0)]
        assert blurs == sorted(blurs) and blurs[0] > 0.03  # defocus widens with height
        assert rows[(level, 0.2)].amplitude < 0.8  # less supercritical light
    assert rows[("dim", 0.2)].separation_sd < rows[("bright", 0.2)].separation_sd
