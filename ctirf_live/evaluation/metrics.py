"""Image-quality metrics: MS-SSIM, PSNR and decorrelation-based resolution.

MS-SSIM and PSNR compare a restored image with a reference the way the paper scores
every method: each image is percentile-normalised on its own (Eq. 1, `min(1, I/p98)`)
and compared with data range 1.

The resolution estimate is the decorrelation analysis of Descloux, Grussmayer &
Radenovic (Nat. Methods 2019): it needs no reference and no threshold. The paper
(Methods 4.7) measures the axial cut-off on XZ/YZ re-slices of a z-stack with the
sectorial variant, taking the sector that points along Z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

from ctirf_live.data.normalize import normalize

# MS-SSIM settings. pytorch-msssim's `ms_ssim` asserts that every side exceeds
# (win_size - 1) * 16 whatever the number of scales, i.e. > 160 px for the default
# 11-px window and > 96 px for a 7-px one. We drive its per-scale SSIM ourselves with a
# 7-px Gaussian window (sigma 1.5) and use as many of the 5 standard scales as keep the
# coarsest scale at least one window wide: 5 scales from 97 px on (identical to
# `pytorch_msssim.ms_ssim(win_size=7)`), 4 from 49 px, 3 from 25 px; smaller is refused.
# With fewer scales the first standard weights are kept, rescaled to the full set's sum.
MSSSIM_WIN_SIZE = 7
MSSSIM_WIN_SIGMA = 1.5
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_MIN_SCALES = 3
MSSSIM_MIN_SIDE = 25

# Decorrelation analysis: peaks lower than this are noise (the paper's 0.05), and a
# local maximum must stand this far above what follows it to count as one.
MIN_PEAK_AMPLITUDE = 0.05
MIN_PEAK_DROP = 1e-3
SMALLEST_HIGHPASS_SIGMA_PX = 0.15


# --------------------------------------------------------------------- MS-SSIM, PSNR


def _as_slices(a: np.ndarray, b: np.ndarray, percentile: float) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes; return both as float32 stacks (N, Y, X), each slice normalised."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected a frame (Y, X) or a stack (Z, Y, X), got shape {a.shape}")
    a3 = a.reshape((-1, *a.shape[-2:]))
    b3 = b.reshape((-1, *b.shape[-2:]))
    return _normalised(a3, percentile), _normalised(b3, percentile)


def _normalised(stack: np.ndarray, percentile: float) -> np.ndarray:
    return np.stack([normalize(s, percentile)[0] for s in stack])


def _msssim_scales(shape: tuple[int, ...]) -> int:
    """How many scales fit: the coarsest must be at least one window wide."""
    side = min(shape[-2:])
    scales = 0
    while scales < len(MSSSIM_WEIGHTS) and side >= MSSSIM_WIN_SIZE:
        scales += 1
        side = (side + 1) // 2
    return scales


def ms_ssim(a: np.ndarray, b: np.ndarray, percentile: float = 98.0) -> float:
    """MS-SSIM of two frames or stacks after per-image percentile normalisation.

    Stacks (Z, Y, X) are scored slice by slice and averaged. Needs at least
    `MSSSIM_MIN_SIDE` px per side (see the module constants for window and scales).
    """
    a3, b3 = _as_slices(a, b, percentile)
    scales = _msssim_scales(a3.shape)
    if scales < MSSSIM_MIN_SCALES:
        raise ValueError(
            f"image of shape {np.shape(a)} is too small for MS-SSIM: "
            f"each side needs at least {MSSSIM_MIN_SIDE} px"
        )
    x = torch.from_numpy(a3).unsqueeze(1)
    y = torch.from_numpy(b3).unsqueeze(1)
    weights = torch.tensor(MSSSIM_WEIGHTS[:scales], dtype=torch.float32)
    weights = weights * (sum(MSSSIM_WEIGHTS) / weights.sum())
    win = _fspecial_gauss_1d(MSSSIM_WIN_SIZE, MSSSIM_WIN_SIGMA).unsqueeze(0)
    levels = []
    with torch.no_grad():
        for i in range(scales):
            ssim_val, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
            if i < scales - 1:
                levels.append(torch.relu(cs))
                pad = [s % 2 for s in x.shape[2:]]
                x = torch.nn.functional.avg_pool2d(x, kernel_size=2, padding=pad)
                y = torch.nn.functional.avg_pool2d(y, kernel_size=2, padding=pad)
        levels.append(torch.relu(ssim_val))
        per_slice = torch.prod(torch.stack(levels) ** weights.view(-1, 1, 1), dim=0)
    return float(per_slice.mean())


def psnr(a: np.ndarray, b: np.ndarray, percentile: float = 98.0) -> float:
    """PSNR in dB (data range 1) after per-image percentile normalisation.

    Stacks are scored slice by slice and averaged; identical images give `inf`.
    """
    a3, b3 = _as_slices(a, b, percentile)
    mse = np.mean((a3.astype(np.float64) - b3.astype(np.float64)) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        values = -10.0 * np.log10(mse)
    return float(np.mean(values))


# ------------------------------------------------------------ decorrelation analysis


@dataclass(frozen=True)
class DecorrelationResult:
    """Outcome of `decorrelation_cutoff`.

    `kc` is the cut-off in normalised frequency (1 = Nyquist along each axis; 0 when no
    curve had a valid peak), `a0` the amplitude of the peak of `d0` (the curve without
    high-pass filtering; an image-contrast / SNR figure). `curves[i]`, sampled at
    `curve_radii[i]`, is d(r) after a Gaussian high-pass of `sigmas[i]` px (first pass,
    then refinement pass); `peaks` lists the valid (r_i, A_i) maxima kc was taken from.
    """

    kc: float
    a0: float
    radii: np.ndarray
    d0: np.ndarray
    sigmas: np.ndarray
    curve_radii: np.ndarray
    curves: np.ndarray
    peaks: np.ndarray

    def resolution(self, pixel_size_um: float) -> float:
        """Resolution in um: `2 * pixel / kc` (`inf` when no cut-off was found)."""
        return 2.0 * pixel_size_um / self.kc if self.kc > 0 else math.inf


@dataclass(frozen=True)
class _Spectrum:
    """Pixels of the analysed spectrum region, sorted by normalised radius."""

    radius: np.ndarray
    magnitude: np.ndarray
    cum_count: np.ndarray

    def curve(self, radii: np.ndarray, sigma_px: float | None = None) -> np.ndarray:
        """d(r) at `radii`, optionally after a Gaussian high-pass of `sigma_px`.

        With I_n = F/|F|, Re(F_hp conj(I_n)) = |F_hp| and |I_n M|^2 counts the non-zero
        pixels inside the mask, so d(r) = sum_{R<r}|F_hp| / sqrt(sum|F_hp|^2 * N(r)),
        a cumulative sum over the radius-sorted pixels.
        """
        weight = self.magnitude
        if sigma_px is not None:
            # real-space Gaussian sigma s has transfer exp(-2 pi^2 s^2 f^2), f = R / 2
            weight = weight * -np.expm1(-0.5 * (math.pi * sigma_px * self.radius) ** 2)
        energy = float(np.sum(weight**2))
        if energy <= 0:
            return np.zeros_like(radii)
        idx = np.searchsorted(self.radius, radii, side="left")
        cum = np.concatenate([[0.0], np.cumsum(weight)])
        count = self.cum_count[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = cum[idx] / np.sqrt(energy * count)
        return np.where(count > 0, d, 0.0)


def _apodize(image: np.ndarray, width_px: int) -> np.ndarray:
    """Zero-mean image whose edges fall smoothly to 0 (cosine ramps), against FFT edges."""
    out = image - image.mean()
    for axis, n in enumerate(out.shape):
        m = min(width_px, n // 4)
        if m < 1:
            continue
        ramp = 0.5 * (1.0 - np.cos(np.pi * (np.arange(m) + 0.5) / m))
        window = np.ones(n)
        window[:m] = ramp
        window[-m:] = ramp[::-1]
        shape = [1, 1]
        shape[axis] = n
        out = out * window.reshape(shape)
    return out


def _spectrum(image: np.ndarray, sector: int | None, n_sectors: int, apodize_px: int) -> _Spectrum:
    """Magnitude spectrum restricted to R < 1 (minus DC) and optionally one sector."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"decorrelation analysis needs a 2D image, got shape {img.shape}")
    if min(img.shape) < 8:
        raise ValueError(f"image of shape {img.shape} is too small (at least 8 px per side)")
    if not np.all(np.isfinite(img)):
        raise ValueError("image has non-finite pixels")
    magnitude = np.abs(np.fft.fft2(_apodize(img, apodize_px)))
    ky = 2.0 * np.fft.fftfreq(img.shape[0])[:, None]
    kx = 2.0 * np.fft.fftfreq(img.shape[1])[None, :]
    radius = np.hypot(ky, kx)
    keep = (radius < 1.0) & (radius > 0.0)
    if sector is not None:
        if not 0 <= sector < n_sectors:
            raise ValueError(f"sector must be in [0, {n_sectors}), got {sector}")
        theta = np.mod(np.arctan2(ky, kx), np.pi)
        centre = sector * np.pi / n_sectors
        offset = np.abs(np.mod(theta - centre + np.pi / 2, np.pi) - np.pi / 2)
        keep &= offset <= np.pi / (2 * n_sectors) + 1e-12
    order = np.argsort(radius[keep], kind="stable")
    r_sorted = radius[keep][order]
    mag_sorted = magnitude[keep][order]
    cum_count = np.concatenate([[0], np.cumsum(mag_sorted > 0)])
    return _Spectrum(r_sorted, mag_sorted, cum_count)


def _find_peak(d: np.ndarray) -> tuple[int, float]:
    """Index and height of the highest local maximum of d, or (0, 0.0) if none.

    A maximum counts when the curve drops by more than `MIN_PEAK_DROP` after it; a
    curve still rising at its end has no peak there, so the search moves left. Like the
    reference, d is floored to 3 decimals first, so a plateau resolves to its start.
    """
    d = np.floor(d * 1000.0) / 1000.0
    end = len(d)
    while end > 0:
        i = int(np.argmax(d[:end]))
        if d[i] - d[i:].min() > MIN_PEAK_DROP:
            return i, float(d[i])
        end = i
    return 0, 0.0


def _refine(
    spec: _Spectrum,
    sigmas: np.ndarray,
    radii: np.ndarray,
    peak_r: np.ndarray,
    peak_a: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Second pass: sigmas between the filter with the best sqrt(r*A) and the one with
    the highest valid r (one step wider), radii on [r - 0.05, r + 0.3] around the best.
    Returns no curves when the first pass found no valid peak."""
    valid = peak_a >= MIN_PEAK_AMPLITUDE
    if not valid.any():
        return np.empty(0), radii, []
    n_g, n_r = len(sigmas), len(radii)
    i_gm = int(np.argmax(np.where(valid, np.sqrt(peak_r * peak_a), 0.0)))
    i_max = int(np.argmax(np.where(valid, peak_r, -1.0)))
    lo, hi = min(i_gm, i_max), min(max(i_gm, i_max) + 1, n_g - 1)
    sigmas2 = np.geomspace(sigmas[lo], sigmas[hi], n_g)
    r_best = peak_r[i_gm]
    radii2 = np.linspace(max(0.0, r_best - 0.05), min(1.0, r_best + 0.3), n_r)
    return sigmas2, radii2, [spec.curve(radii2, s) for s in sigmas2]


def decorrelation_cutoff(
    image: np.ndarray,
    n_r: int = 50,
    n_g: int = 10,
    sector: int | None = None,
    n_sectors: int = 8,
    apodize_px: int = 20,
) -> DecorrelationResult:
    """Cut-off frequency of a 2D image by decorrelation analysis (Descloux et al. 2019).

    d(r) correlates the spectrum with its whitened version low-passed to radius r; its
    peak marks where signal gives way to noise. The same is done after `n_g` Gaussian
    high-pass filters (sigma geometric from 2/r0 px, r0 the first peak, down to 0.15
    px, which keeps only the highest frequencies), then once more with `n_g` sigmas
    bracketing the best filters and radii resampled around the best peak (the
    reference's refinement). kc is the largest r_i among peaks with amplitude >= 0.05;
    0 when there is none (pure noise, or a spectrum that stays flat up to Nyquist).

    Frequencies are normalised per axis (1 = Nyquist), so non-square images work. With
    `sector` s in [0, n_sectors), only frequencies whose direction lies within
    +-90/n_sectors degrees of s*180/n_sectors (and the point-symmetric half) are used;
    the angle is measured from the X (column) frequency axis towards the Y (row) axis,
    so sector 0 is along X and sector n_sectors // 2 along Y.
    """
    if n_r < 3 or n_g < 1:
        raise ValueError("need n_r >= 3 and n_g >= 1")
    spec = _spectrum(image, sector, n_sectors, apodize_px)
    radii = np.linspace(0.0, 1.0, n_r)
    d0 = spec.curve(radii)
    i0, a0 = _find_peak(d0)
    peaks = [(radii[i0], a0)]

    r0 = radii[i0] if a0 > 0 else 0.0
    sigma_max = 2.0 / r0 if r0 > 0 else max(np.shape(image)) / 2.0
    sigmas = np.geomspace(sigma_max, SMALLEST_HIGHPASS_SIGMA_PX, n_g)
    first = [spec.curve(radii, s) for s in sigmas]
    first_peaks = [_find_peak(c) for c in first]
    first_r = np.array([radii[i] for i, _ in first_peaks])
    first_a = np.array([a for _, a in first_peaks])
    peaks += list(zip(first_r, first_a, strict=True))

    sigmas2, radii2, second = _refine(spec, sigmas, radii, first_r, first_a)
    peaks += [(radii2[i], a) for i, a in (_find_peak(c) for c in second)]

    peak_arr = np.array(peaks, dtype=np.float64)
    peak_arr = peak_arr[peak_arr[:, 1] >= MIN_PEAK_AMPLITUDE]
    kc = float(peak_arr[:, 0].max()) if len(peak_arr) else 0.0
    n2 = len(second)
    return DecorrelationResult(
        kc=kc,
        a0=float(a0),
        radii=radii,
        d0=d0,
        sigmas=np.concatenate([sigmas, sigmas2]),
        curve_radii=np.vstack([np.tile(radii, (n_g, 1)), np.tile(radii2, (n2, 1))]),
        curves=np.vstack(first + second),
        peaks=peak_arr,
    )


# ------------------------------------------------------------------ axial resolution


def reslice(stack: np.ndarray, axis: Literal["xz", "yz"] = "xz") -> np.ndarray:
    """Cross-sections of a (Z, Y, X) stack: XZ sections (Y, Z, X) or YZ sections (X, Z, Y)."""
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"expected a stack (Z, Y, X), got shape {arr.shape}")
    if axis == "xz":
        return np.ascontiguousarray(arr.transpose(1, 0, 2))
    if axis == "yz":
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    raise ValueError(f"axis must be 'xz' or 'yz', got {axis!r}")


def axial_cutoff(
    stack: np.ndarray,
    axis: Literal["xz", "yz"] = "xz",
    n_sectors: int = 8,
    sector: int | None = None,
    max_sections: int = 32,
    n_r: int = 50,
    n_g: int = 10,
) -> float:
    """Mean axial cut-off kc over re-slices of a (Z, Y, X) stack (paper, Methods 4.7).

    Each section has Z along its rows, so the axial sector is the one centred on the
    row frequency axis: `n_sectors // 2` (0-based), which for 8 sectors is the paper's
    "fifth sector". Up to `max_sections` evenly spaced sections are analysed; constant
    ones (nothing to measure) are skipped. kc is normalised to the Z Nyquist frequency,
    so the axial resolution is 2 * z_step / kc. Z is deliberately not resampled to the
    lateral sampling: interpolating Z leaves a band with no noise below the new Nyquist
    frequency, which the analysis mistakes for signal (kc near 1 on any noisy stack).
    """
    if sector is None:
        if n_sectors % 2:
            raise ValueError("n_sectors must be even to have a sector centred on Z")
        sector = n_sectors // 2
    arr = np.asarray(stack, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a stack (Z, Y, X), got shape {arr.shape}")
    sections = reslice(arr, axis)
    count = min(max_sections, len(sections))
    picks = np.unique(np.linspace(0, len(sections) - 1, count).round().astype(int))
    kcs = [
        decorrelation_cutoff(sections[i], n_r=n_r, n_g=n_g, sector=sector, n_sectors=n_sectors).kc
        for i in picks
        if np.ptp(sections[i]) > 0
    ]
    if not kcs:
        raise ValueError("every section is constant; nothing to measure")
    return float(np.mean(kcs))


def block_artifact_score(image: np.ndarray, period: int = 32, border: int = 8) -> float:
    """How much a frame's edges line up on a `period`-pixel lattice (tile, window or
    transposed-conv blocks): 1 for none, larger with seams.

    The mean absolute difference between neighbouring columns (and rows) is folded
    modulo `period`; the score is the largest folded value over the median of the
    others, for the worse of the two axes. Content-independent for natural images,
    which have no preferred phase; a 1%-of-range step every `period` pixels shows up.
    `border` pixels at the frame's edges are left out: the network's padding changes the
    outermost pixels, which is an edge effect, not a lattice.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 4 * period + 2 * border:
        raise ValueError(
            f"need a 2D frame at least {4 * period + 2 * border} px a side, got {img.shape}"
        )
    if border:
        img = img[border:-border, border:-border]
    scores = []
    for axis in (0, 1):
        d = np.abs(np.diff(img, axis=1 - axis)).mean(axis=axis)  # per column (or row) step
        n = d.size // period * period
        folded = d[:n].reshape(-1, period).mean(0)
        rest = np.sort(folded)[:-1]
        scores.append(float(folded.max() / max(np.median(rest), 1e-12)))
    return max(scores)
