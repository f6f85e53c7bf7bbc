"""PSF models: normalisation, symmetry, width, defocus, agreement with psfmodels, cache, TIFF."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from scipy import integrate, special

from ctirf_live.config import Optics
from ctirf_live.optics.psf import (
    PSF_MODELS,
    born_wolf_psf,
    default_psf_size,
    load_psf_tiff,
    psf_2d,
    psf_3d,
    vectorial_psf,
)

OPTICS = Optics(na=1.49)


def _fwhm_um(plane: np.ndarray, pixel_um: float) -> float:
    """Full width at half maximum along the central row, linearly interpolated."""
    c = plane.shape[0] // 2
    prof = plane[c, c:]
    half = prof[0] / 2
    i = int(np.argmax(prof < half))
    return 2 * (i - 1 + (prof[i - 1] - half) / (prof[i - 1] - prof[i])) * pixel_um


@pytest.mark.parametrize("size", [25, 24])
def test_in_focus_unit_sum_peak_at_centre_and_radially_symmetric(size: int) -> None:
    psf = born_wolf_psf(OPTICS, size)
    assert psf.shape == (size, size)
    assert psf.dtype == np.float32
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(psf), psf.shape) == (size // 2, size // 2)
    assert psf.min() >= 0
    if size % 2:
        np.testing.assert_allclose(psf, psf.T, atol=1e-7)
        np.testing.assert_allclose(psf, psf[::-1], atol=1e-7)
        np.testing.assert_allclose(psf, psf[:, ::-1], atol=1e-7)
    else:
        inner = psf[1:, 1:]  # the window around the centre pixel is symmetric
        np.testing.assert_allclose(inner, inner[::-1, ::-1], atol=1e-7)
        np.testing.assert_allclose(psf, psf.T, atol=1e-7)


@pytest.mark.parametrize(
    "optics",
    [OPTICS, Optics(na=0.75, immersion_index=1.0, pixel_size_um=0.05, emission_wavelength_nm=520)],
)
def test_fwhm_close_to_diffraction_limit(optics: Optics) -> None:
    psf = born_wolf_psf(optics, 41)
    expected = 0.51 * optics.wavelength_um / optics.na
    assert _fwhm_um(psf, optics.pixel_size_um) == pytest.approx(expected, rel=0.15)


def test_defocus_lowers_peak_keeps_energy_and_is_symmetric_in_z() -> None:
    z = [-1.0, -0.5, 0.0, 0.5, 1.0]
    stack = born_wolf_psf(OPTICS, 65, z)
    assert stack.shape == (5, 65, 65)
    peaks = stack.max(axis=(1, 2))
    assert peaks[2] > peaks[3] > peaks[4]
    np.testing.assert_allclose(stack[0], stack[4], atol=1e-7)
    np.testing.assert_allclose(stack[1], stack[3], atol=1e-7)
    np.testing.assert_allclose(stack.sum(axis=(1, 2)), 1.0, atol=0.01)
    np.testing.assert_array_equal(stack[2], born_wolf_psf(OPTICS, 65, 0.0))


def test_born_wolf_far_from_focus_matches_direct_integration() -> None:
    """The quadrature stays accurate at 4 um defocus: compare with scipy.integrate.quad."""
    z, size = 4.0, 201
    in_focus, plane = born_wolf_psf(OPTICS, size, [0.0, z])
    assert plane.sum() == pytest.approx(1.0, abs=0.01)  # paraxial defocus conserves energy
    k = 2 * math.pi / OPTICS.wavelength_um
    a = k * OPTICS.na**2 * z / (2 * OPTICS.immersion_index)

    def intensity(r_px: int) -> float:
        b = k * OPTICS.na * r_px * OPTICS.pixel_size_um
        re = integrate.quad(lambda p: special.j0(b * p) * math.cos(a * p * p) * p, 0, 1, limit=400)
        im = integrate.quad(lambda p: special.j0(b * p) * math.sin(a * p * p) * p, 0, 1, limit=400)
        return re[0] ** 2 + im[0] ** 2

    c = size // 2
    radii = (0, 5, 20, 60)
    ref = np.array([intensity(r) for r in radii]) / 0.25  # in-focus peak: (1/2)^2
    got = np.array([plane[c, c + r] for r in radii]) / in_focus[c, c]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("na", [1.49, 1.5])
def test_born_wolf_matches_psfmodels_scalar_in_focus_only(na: float) -> None:
    optics = Optics(na=na)
    z = [0.0, 0.5, 1.0, 2.0]
    bw = born_wolf_psf(optics, 33, z)
    sc = vectorial_psf(optics, 33, z, model="scalar")
    peak = bw[0].max()
    diff = np.abs(bw - sc).max(axis=(1, 2))
    # measured at NA 1.49 / 1.5: 0.001 of the peak in focus (the same integral) ...
    assert diff[0] / peak < 0.01
    # ... 0.26 of the in-focus peak at 0.5 um: paraxial vs exact defocus phase ...
    assert diff[1] / peak > 0.15
    # ... and ~0.65 of each plane's own peak at 1-2 um (both are spread out by then).
    own = np.maximum(bw.max(axis=(1, 2)), sc.max(axis=(1, 2)))
    assert np.all(diff[2:] / own[2:] > 0.4)


@pytest.mark.parametrize("model", ["scalar", "vectorial", "gibson_lanni"])
@pytest.mark.parametrize("size", [21, 20])
def test_psfmodels_shapes_centre_and_normalisation(model: str, size: int) -> None:
    plane = vectorial_psf(OPTICS, size, 0.0, model=model)
    assert plane.shape == (size, size) and plane.dtype == np.float32
    assert plane.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(plane), plane.shape) == (size // 2, size // 2)
    stack = vectorial_psf(OPTICS, size, [0.0, 1.0], model=model)
    assert stack.shape == (2, size, size)
    np.testing.assert_allclose(stack[0], plane, atol=1e-7)
    assert stack[1].max() < stack[0].max()


def test_gibson_lanni_uses_the_sample_index_below_the_coverslip() -> None:
    at_glass = [vectorial_psf(OPTICS, 21, 0.0, model=m) for m in ("scalar", "gibson_lanni")]
    np.testing.assert_allclose(at_glass[0], at_glass[1], atol=1e-7)
    deep = [vectorial_psf(OPTICS, 21, 0.0, m, depth_um=2.0) for m in ("scalar", "gibson_lanni")]
    assert np.abs(deep[0] - deep[1]).max() > 0.1 * deep[0].max()


def test_unknown_model_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="born_wolf, scalar, vectorial, gibson_lanni"):
        psf_2d(OPTICS, 9, model="airy")
    with pytest.raises(ValueError, match="vectorial"):
        vectorial_psf(OPTICS, 9, model="born_wolf")
    assert set(PSF_MODELS) == {"born_wolf", "scalar", "vectorial", "gibson_lanni"}


def test_default_size_is_odd_and_covers_four_airy_radii() -> None:
    size = default_psf_size(OPTICS)
    airy_px = 0.61 * OPTICS.wavelength_um / OPTICS.na / OPTICS.pixel_size_um
    assert size % 2 == 1
    assert size // 2 >= 4 * airy_px
    assert size // 2 < 4 * airy_px + 2
    assert default_psf_size(Optics(na=0.1, immersion_index=1.0, pixel_size_um=50)) == 9


def test_cache_returns_the_same_read_only_array() -> None:
    a = psf_2d(OPTICS)
    assert a is psf_2d(OPTICS) and a is psf_2d(Optics(na=1.49), default_psf_size(OPTICS))
    assert a.shape == (default_psf_size(OPTICS),) * 2
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    s = psf_3d(OPTICS, [-0.2, 0.0, 0.2], size=15)
    assert s is psf_3d(OPTICS, (-0.2, 0.0, 0.2), size=15)
    assert s.shape == (3, 15, 15) and not s.flags.writeable
    np.testing.assert_allclose(s[1], psf_2d(OPTICS, 15), atol=1e-7)
    assert psf_2d(OPTICS, 15, model="scalar") is not psf_2d(OPTICS, 15)


def test_load_psf_tiff_round_trip(tmp_path) -> None:
    stack = born_wolf_psf(OPTICS, 65, [-0.4, 0.0, 0.4])
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, stack * 7.0, photometric="minisblack")
    loaded = load_psf_tiff(path, subtract_background=False)
    assert loaded.shape == stack.shape and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, stack, rtol=1e-5, atol=1e-9)

    camera = stack[1] * 5e4 + 100.0  # a camera offset of 100 counts is removed
    tifffile.imwrite(tmp_path / "plane.tif", camera[None].astype(np.float32))
    plane = load_psf_tiff(tmp_path / "plane.tif")
    assert plane.shape == (65, 65)
    assert plane.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(plane, stack[1], atol=0.01 * stack[1].max())


def test_load_psf_tiff_rejects_bad_input(tmp_path) -> None:
    rng = np.random.default_rng(0)
    tifffile.imwrite(
        tmp_path / "4d.tif", rng.random((2, 3, 8, 8)).astype(np.float32), photometric="minisblack"
    )
    with pytest.raises(ValueError, match="2D"):
        load_psf_tiff(tmp_path / "4d.tif")
    tifffile.imwrite(tmp_path / "flat.tif", np.full((9, 9), 7.0, np.float32))
    with pytest.raises(ValueError, match="no signal"):
        load_psf_tiff(tmp_path / "flat.tif")
    tifffile.imwrite(tmp_path / "line.tif", rng.random((1, 1, 12)).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_psf_tiff(tmp_path / "line.tif")


def test_gibson_lanni_matches_born_wolf_in_focus_at_the_coverslip() -> None:
    from ctirf_live.optics.psf import depth_psf

    optics = Optics()
    gl = depth_psf(optics, 65, 0.0, 0.0)
    bw = born_wolf_psf(optics, 65, 0.0)
    assert gl.sum() == pytest.approx(1.0, rel=1e-6)
    assert gl.max() == pytest.approx(bw.max(), rel=0.05)


def test_gibson_lanni_into_water_differs_from_born_wolf_out_of_focus() -> None:
    from ctirf_live.optics.psf import depth_psf

    optics = Optics()  # NA 1.5 oil objective, aqueous sample
    stage = np.round(np.arange(0.0, 2.01, 0.05), 3)
    gl = depth_psf(optics, 65, 1.0, list(stage))  # an emitter 1 um up
    bw = born_wolf_psf(optics, 65, [1.0])[0]
    # focused on the coverslip, the emitter is dimmer and wider than the paraxial model says
    assert gl[0].max() < 0.8 * bw.max()
    # focal shift: the stage must move further than 1 um to bring it into focus
    best = stage[int(np.argmax(gl.max(axis=(1, 2))))]
    assert 1.1 <= best <= 1.4
    # supercritical-angle light only reaches the objective from near the glass
    assert gl[int(np.argmax(gl.max(axis=(1, 2))))].sum() < 0.9
    with pytest.raises(ValueError, match="above the coverslip"):
        depth_psf(optics, 33, -0.5, 0.0)
