"""Point spread functions: Born & Wolf (as the Fiji PSF Generator computes it) and psfmodels.

Every model samples the PSF at pixel centres, with the centre pixel at `size // 2`, and
every plane is divided by the sum of the in-focus plane of the same size: the in-focus
PSF sums to 1 and a defocused plane carries, within the window, the same energy. Cached
PSFs (`psf_2d`, `psf_3d`) are read-only so callers cannot corrupt the cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import special

from ctirf_live.config import Optics

PSF_MODELS = ("born_wolf", "scalar", "vectorial", "gibson_lanni")

_RADIAL_OVERSAMPLING = 8  # radial profile samples per pixel before interpolation
_R_CHUNK = 2048  # radii per Bessel block: bounds memory for large frames
_CACHE_SIZE = 16  # 3D stacks at frame size are tens of MB each


def _check_model(model: str) -> None:
    if model not in PSF_MODELS:
        raise ValueError(f"unknown PSF model {model!r}; choose one of {', '.join(PSF_MODELS)}")


def _check_size(size: int) -> int:
    if int(size) != size or size < 1:
        raise ValueError(f"PSF size must be a positive integer, got {size!r}")
    return int(size)


def _z_list(z_um: float | Sequence[float]) -> tuple[np.ndarray, bool]:
    """Defocus values as a 1D array, and whether the caller passed a scalar."""
    scalar = np.ndim(z_um) == 0
    z = np.atleast_1d(np.asarray(z_um, dtype=np.float64))
    if z.ndim != 1 or z.size == 0:
        raise ValueError("z_um must be a number or a non-empty 1D sequence of numbers")
    if not np.all(np.isfinite(z)):
        raise ValueError("z_um must be finite")
    return z, scalar


def _pixel_radii(size: int) -> np.ndarray:
    """Distance of each pixel centre from the centre pixel (`size // 2`), in pixels."""
    d = np.arange(size, dtype=np.float64) - size // 2
    return np.hypot(d[:, None], d[None, :])


def _normalise(planes: np.ndarray, in_focus: np.ndarray, scalar: bool) -> np.ndarray:
    total = float(in_focus.sum())
    if not total > 0:
        raise ValueError("the in-focus PSF is empty; check the optics (NA, wavelength, pixel)")
    out = (planes / total).astype(np.float32)
    return out[0] if scalar else out


def _born_wolf_profiles(optics: Optics, radii_um: np.ndarray, z_um: np.ndarray) -> np.ndarray:
    """|amplitude|^2 on a radial grid for each defocus: (nz, nr), float64.

    amplitude(r, z) = int_0^1 J0(k NA r rho) exp(-i W(rho)) rho d rho with the paraxial
    defocus phase W = k z (NA rho)^2 / (2 n_immersion). Gauss-Legendre quadrature whose
    node count follows the largest total phase (Bessel argument + defocus), so it stays
    accurate far from focus and far from the axis.
    """
    k = 2 * math.pi / optics.wavelength_um
    kna = k * optics.na
    w_max = k * float(np.max(np.abs(z_um))) * optics.na**2 / (2 * optics.immersion_index)
    phase_max = kna * float(radii_um[-1]) + w_max
    n_nodes = math.ceil(0.5 * phase_max) + 32
    nodes, weights = np.polynomial.legendre.leggauss(n_nodes)
    rho = 0.5 * (nodes + 1.0)
    w = 0.5 * weights * rho
    defocus = k * optics.na**2 / (2 * optics.immersion_index) * np.outer(rho**2, z_um)
    pupil = w[:, None] * np.exp(-1j * defocus)  # (n_rho, nz)
    out = np.empty((z_um.size, radii_um.size))
    for start in range(0, radii_um.size, _R_CHUNK):
        r = radii_um[start : start + _R_CHUNK]
        amp = special.j0(kna * np.outer(r, rho)) @ pupil  # (nr, nz)
        out[:, start : start + r.size] = (amp.real**2 + amp.imag**2).T
    return out


def born_wolf_psf(optics: Optics, size: int, z_um: float | Sequence[float] = 0.0) -> np.ndarray:
    """Born & Wolf PSF exactly as the Fiji PSF Generator models it (paraxial defocus).

    Computed on a radial profile oversampled 8x per pixel out to the window's corner and
    linearly interpolated onto the pixel centres. Returns float32 `(size, size)` for a
    scalar `z_um`, `(nz, size, size)` for a sequence; normalised to the in-focus plane.
    """
    size = _check_size(size)
    z, scalar = _z_list(z_um)
    zs = np.concatenate([[0.0], z])
    rpix = _pixel_radii(size)
    n_r = math.ceil(float(rpix.max()) * _RADIAL_OVERSAMPLING) + 2
    radii_px = np.arange(n_r, dtype=np.float64) / _RADIAL_OVERSAMPLING
    profiles = _born_wolf_profiles(optics, radii_px * optics.pixel_size_um, zs)
    pos = rpix.ravel() * _RADIAL_OVERSAMPLING
    lo = np.floor(pos).astype(np.intp)
    frac = pos - lo
    planes = profiles[:, lo] * (1.0 - frac) + profiles[:, lo + 1] * frac
    planes = planes.reshape(zs.size, size, size)
    return _normalise(planes[1:], planes[0], scalar)


def vectorial_psf(
    optics: Optics,
    size: int,
    z_um: float | Sequence[float] = 0.0,
    model: str = "vectorial",
    depth_um: float = 0.0,
) -> np.ndarray:
    """PSF from `psfmodels`: "vectorial" (Aguet), "scalar" or "gibson_lanni" (Gibson-Lanni).

    "scalar" is the Gibson-Lanni integral with the sample index matched to the immersion
    (non-paraxial defocus only); "gibson_lanni" and "vectorial" use the optics' sample
    index, which matters for a source `depth_um` above the coverslip (and, for the
    vectorial model, at the interface itself). Point-sampled at pixel centres like
    `born_wolf_psf` (no pixel integration); same shapes and normalisation.
    """
    if model not in ("vectorial", "scalar", "gibson_lanni"):
        raise ValueError(
            f"unknown psfmodels model {model!r}; choose one of vectorial, scalar, gibson_lanni"
        )
    size = _check_size(size)
    if depth_um < 0:
        raise ValueError(f"depth_um is the source height above the coverslip, got {depth_um}")
    z, scalar = _z_list(z_um)
    zs = np.concatenate([[0.0], z])
    n_imm = optics.immersion_index
    # psfmodels interpolates a radial profile sampled once per (its) pixel, which is off
    # by ~6% of the peak near the core at ~lambda/7 NA pixels: compute on a finer grid
    # whose every `sub`-th pixel is one of ours, and keep those point samples.
    sub = max(1, math.ceil(optics.pixel_size_um * 16 * optics.na / optics.wavelength_um))
    planes = _psfmodels_planes(
        optics,
        size,
        sub,
        float(depth_um),
        tuple(zs.tolist()),
        ns=n_imm if model == "scalar" else optics.sample_index,
        model="scalar" if model == "gibson_lanni" else model,
    )
    return _normalise(planes[1:], planes[0], scalar)


def airy_radius_um(optics: Optics) -> float:
    """Radius of the first dark ring of the in-focus PSF: 0.61 lambda / NA."""
    return 0.61 * optics.wavelength_um / optics.na


def default_psf_size(optics: Optics) -> int:
    """Odd window size covering about 4 Airy radii on each side of the centre; at least 9."""
    half = math.ceil(4 * airy_radius_um(optics) / optics.pixel_size_um)
    return max(9, 2 * half + 1)


def _compute(optics: Optics, size: int, z: float | Sequence[float], model: str) -> np.ndarray:
    if model == "born_wolf":
        return born_wolf_psf(optics, size, z)
    return vectorial_psf(optics, size, z, model=model)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_psf(optics: Optics, size: int, z: float | tuple[float, ...], model: str) -> np.ndarray:
    psf = _compute(optics, size, z, model)
    psf.setflags(write=False)
    return psf


def psf_2d(optics: Optics, size: int | None = None, model: str = "born_wolf") -> np.ndarray:
    """In-focus PSF `(size, size)`, unit sum, cached and read-only."""
    _check_model(model)
    size = default_psf_size(optics) if size is None else _check_size(size)
    return _cached_psf(optics, size, 0.0, model)


def psf_3d(
    optics: Optics,
    z_offsets_um: Sequence[float],
    size: int | None = None,
    model: str = "born_wolf",
) -> np.ndarray:
    """PSF planes `(nz, size, size)` at the given defocus offsets, cached and read-only.

    Each plane is normalised to the sum of the in-focus plane, so the planes' relative
    brightness is physical.
    """
    _check_model(model)
    size = default_psf_size(optics) if size is None else _check_size(size)
    z, _ = _z_list(list(z_offsets_um))
    return _cached_psf(optics, size, tuple(float(v) for v in z), model)


def load_psf_tiff(path: str | Path, subtract_background: bool = True) -> np.ndarray:
    """A measured PSF from a 2D `(Y, X)` or 3D `(Z, Y, X)` TIFF, as float32.

    The camera background (median of the window's border pixels; skipped with
    `subtract_background=False`, for PSFs that are already clean) is subtracted and
    negatives clipped, then everything is divided by the sum of the brightest plane (the
    one holding the peak), matching the in-focus normalisation of the models.
    """
    import tifffile

    data = np.squeeze(np.asarray(tifffile.imread(path), dtype=np.float64))
    if data.ndim not in (2, 3):
        raise ValueError(
            f"PSF file {path} has shape {data.shape}; expected a 2D (Y, X) or 3D (Z, Y, X) image"
        )
    if min(data.shape) < 1 or not np.all(np.isfinite(data)):
        raise ValueError(f"PSF file {path} is empty or contains non-finite values")
    stack = data.reshape((-1, *data.shape[-2:]))
    border = np.concatenate(
        [stack[:, 0, :], stack[:, -1, :], stack[:, :, 0], stack[:, :, -1]], axis=None
    )
    background = float(np.median(border)) if subtract_background else 0.0
    clean = np.clip(stack - background, 0.0, None)
    if not clean.max() > 0:
        raise ValueError(f"PSF file {path} holds no signal above its border background")
    brightest = np.unravel_index(np.argmax(clean), clean.shape)[0]
    return (clean / clean[brightest].sum()).reshape(data.shape).astype(np.float32)


def depth_psf(
    optics: Optics,
    size: int,
    emitter_z_um: float,
    focus_um: float | Sequence[float],
    oversampling: int | None = None,
) -> np.ndarray:
    """Gibson-Lanni PSF (psfmodels' scalar model) of an emitter `emitter_z_um` above the
    coverslip, inside the sample medium, seen with the objective focused at `focus_um`.

    What a real oil objective does imaging into an aqueous sample: the focus moves
    with the stage by less than the stage (focal shift), spherical aberration grows with
    depth, and the light the emitter sends above NA = n_sample (supercritical angle
    fluorescence) only reaches the objective from emitters within ~lambda of the glass.
    `focus_um` is the nominal focal position (stage height, 0 = focused on the coverslip).
    Every plane is divided by the sum of the in-focus PSF of an emitter on the coverslip,
    so the planes keep their physical brightness relative to it (deep emitters give less
    light). Point-sampled at pixel centres; float32 `(size, size)` or `(nz, size, size)`.
    """
    size = _check_size(size)
    if emitter_z_um < 0:
        raise ValueError(f"emitter_z_um is the height above the coverslip, got {emitter_z_um}")
    z, scalar = _z_list(focus_um)
    sub = oversampling or max(
        1, math.ceil(optics.pixel_size_um * 8 * optics.na / optics.wavelength_um)
    )
    planes = _psfmodels_planes(optics, size, sub, float(emitter_z_um), tuple(z.tolist()))
    out = (planes / _surface_reference_sum(optics, size, sub)).astype(np.float32)
    return out[0] if scalar else out


def _psfmodels_planes(
    optics: Optics,
    size: int,
    sub: int,
    emitter_z_um: float,
    focus_um: tuple[float, ...],
    ns: float | None = None,
    model: str = "scalar",
) -> np.ndarray:
    """A psfmodels PSF (default: scalar Gibson-Lanni into the sample medium) on a grid
    `sub` times finer, point-sampled back at our pixel centres (psfmodels interpolates a
    radial profile sampled once per its pixel)."""
    import psfmodels

    n_odd = size + 1 - size % 2  # psfmodels centres odd windows; crop keeps size // 2
    n_imm = optics.immersion_index
    planes = psfmodels.make_psf(
        list(focus_um),
        sub * (n_odd - 1) + 1,
        dxy=optics.pixel_size_um / sub,
        pz=emitter_z_um,
        NA=optics.na,
        wvl=optics.wavelength_um,
        ns=optics.sample_index if ns is None else ns,
        ni=n_imm,
        ni0=n_imm,
        ng=n_imm,
        ng0=n_imm,
        oversample_factor=1,
        normalize=False,
        model=model,
    )
    return planes[:, ::sub, ::sub][:, :size, :size]


@functools.lru_cache(maxsize=32)
def _surface_reference_sum(optics: Optics, size: int, sub: int) -> float:
    """Sum of the in-focus Gibson-Lanni PSF of an emitter on the coverslip (the unit)."""
    total = float(_psfmodels_planes(optics, size, sub, 0.0, (0.0,)).sum())
    if not total > 0:
        raise ValueError("the in-focus PSF is empty; check the optics (NA, wavelength, pixel)")
    return total


@functools.lru_cache(maxsize=16)
def focal_shift_factor(optics: Optics, depth_um: float = 2.0) -> float:
    """Actual focal depth per micrometre of nominal (stage) focus, imaging into the sample.

    Found where the Gibson-Lanni PSF of an emitter `depth_um` deep peaks (an oil objective
    into water: about 0.8, the stage moves further than the focus does); 1 when the
    sample matches the immersion.
    """
    if math.isclose(optics.sample_index, optics.immersion_index):
        return 1.0
    size = 33
    lo, hi = 0.5 * depth_um, 2.0 * depth_um
    for _ in range(3):
        stage = np.linspace(lo, hi, 13)
        peaks = depth_psf(optics, size, depth_um, list(stage)).max(axis=(1, 2))
        k = int(np.argmax(peaks))
        step = stage[1] - stage[0]
        lo, hi = stage[k] - step, stage[k] + step
    return float(depth_um / stage[k])
