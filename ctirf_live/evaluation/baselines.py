"""Classical deconvolution and background-removal methods cTIRF is compared with.

The paper (Extended Data Fig. 2) scores cTIRF against Richardson-Lucy deconvolution,
wavelet-based background and noise subtraction (WBNS) and background filtering (BF);
a rolling-ball subtraction is added as the everyday Fiji tool. Each function takes a
frame (Y, X) or a stack (Z, Y, X, processed slice by slice) of any dtype and returns
float32 in the input's intensity scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pywt
from scipy import ndimage
from skimage import restoration


def _per_slice(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    """Apply a 2D method to a frame or to every slice of a stack; float32 out."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        return fn(arr).astype(np.float32)
    if arr.ndim == 3:
        return np.stack([fn(s) for s in arr]).astype(np.float32)
    raise ValueError(f"expected a frame (Y, X) or a stack (Z, Y, X), got shape {arr.shape}")


def richardson_lucy(image: np.ndarray, psf: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Richardson-Lucy deconvolution with a 2D `psf` (normalised to sum 1 here).

    The image is min-max scaled to [0, 1] (so RL does not have to explain the camera
    offset) and scaled back afterwards. More iterations sharpen more and amplify noise.
    """
    kernel = np.asarray(psf, dtype=np.float64)
    if kernel.ndim != 2 or kernel.sum() <= 0 or np.any(kernel < 0):
        raise ValueError("psf must be a non-negative 2D array with a positive sum")
    kernel = kernel / kernel.sum()
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")

    def one(frame: np.ndarray) -> np.ndarray:
        lo, hi = float(frame.min()), float(frame.max())
        if hi <= lo:
            return frame.copy()
        scaled = (frame - lo) / (hi - lo)
        out = restoration.richardson_lucy(
            scaled, kernel, num_iter=iterations, clip=False, filter_epsilon=1e-7
        )
        return out * (hi - lo) + lo

    return _per_slice(one, image)


def richardson_lucy_3d(stack: np.ndarray, psf: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Richardson-Lucy deconvolution of a (Z, Y, X) stack with a 3D `psf` (sum 1 here),
    the classical volumetric alternative to ET3dNet; min-max scaled like the 2D one."""
    arr = np.asarray(stack, dtype=np.float64)
    kernel = np.asarray(psf, dtype=np.float64)
    if arr.ndim != 3 or kernel.ndim != 3:
        raise ValueError("richardson_lucy_3d needs a (Z, Y, X) stack and a 3D psf")
    if kernel.sum() <= 0 or np.any(kernel < 0) or iterations < 1:
        raise ValueError("psf must be non-negative with a positive sum; iterations >= 1")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return arr.astype(np.float32)
    out = restoration.richardson_lucy(
        (arr - lo) / (hi - lo),
        kernel / kernel.sum(),
        num_iter=iterations,
        clip=False,
        filter_epsilon=1e-7,
    )
    return (out * (hi - lo) + lo).astype(np.float32)


def wbns(image: np.ndarray, resolution_px: float = 4.0, noise_lvl: int = 1) -> np.ndarray:
    """Wavelet-based background and noise subtraction (Hüpfel et al. 2021).

    `resolution_px` is the PSF FWHM in pixels; L = ceil(log2(resolution_px)) levels.
    Background: the Haar (db1) approximation at level L (all detail levels removed),
    smoothed by a Gaussian of sigma 2**L px, is subtracted. Noise: the image rebuilt
    from its `noise_lvl` finest detail levels only, positive part capped at mean + 2 sd,
    is subtracted too (`noise_lvl=0` skips it). The result is clipped at 0.
    """
    if resolution_px < 1:
        raise ValueError(f"resolution_px must be >= 1, got {resolution_px}")
    if noise_lvl < 0:
        raise ValueError(f"noise_lvl must be >= 0, got {noise_lvl}")
    levels = max(1, math.ceil(math.log2(resolution_px)))

    def one(frame: np.ndarray) -> np.ndarray:
        shape = frame.shape
        level = min(levels, pywt.dwt_max_level(min(shape), "db1"))
        coeffs = pywt.wavedec2(frame, "db1", level=level)
        approx = [coeffs[0]] + [tuple(np.zeros_like(c) for c in d) for d in coeffs[1:]]
        background = pywt.waverec2(approx, "db1")[: shape[0], : shape[1]]
        background = ndimage.gaussian_filter(background, sigma=2.0**level)
        out = frame - background
        if noise_lvl > 0:
            out -= _wavelet_noise(frame, noise_lvl)
        return np.clip(out, 0.0, None)

    return _per_slice(one, image)


def _wavelet_noise(frame: np.ndarray, noise_lvl: int) -> np.ndarray:
    """Positive part of the finest `noise_lvl` detail levels, capped at mean + 2 sd."""
    shape = frame.shape
    level = min(noise_lvl, pywt.dwt_max_level(min(shape), "db1"))
    coeffs = pywt.wavedec2(frame, "db1", level=level)
    coeffs[0] = np.zeros_like(coeffs[0])
    noise = np.clip(pywt.waverec2(coeffs, "db1")[: shape[0], : shape[1]], 0.0, None)
    return np.minimum(noise, noise.mean() + 2.0 * noise.std())


def rolling_ball(image: np.ndarray, radius_px: float = 25.0) -> np.ndarray:
    """Subtract skimage's rolling-ball background (ball radius in px and intensity units).

    As in Fiji, the ball's height is in the image's intensity units, so on bright
    images it acts like a flat disk of `radius_px`. Cost grows with radius squared.
    """
    if radius_px <= 0:
        raise ValueError(f"radius_px must be positive, got {radius_px}")

    def one(frame: np.ndarray) -> np.ndarray:
        return frame - restoration.rolling_ball(frame, radius=radius_px)

    return _per_slice(one, image)


def background_filter(image: np.ndarray, sigma_px: float = 20.0) -> np.ndarray:
    """Subtract a wide Gaussian blur of the image as its background, clip at 0.

    A simple stand-in for the background filtering (BF) of Mo et al. 2023, which
    removes the low-frequency out-of-focus haze with a physically derived filter:
    here the haze is whatever varies on scales above `sigma_px`.
    """
    if sigma_px <= 0:
        raise ValueError(f"sigma_px must be positive, got {sigma_px}")

    def one(frame: np.ndarray) -> np.ndarray:
        background = ndimage.gaussian_filter(frame, sigma=sigma_px, mode="reflect")
        return np.clip(frame - background, 0.0, None)

    return _per_slice(one, image)


# Name -> method, each with its defaults. "rl" needs the PSF: call it with psf=...
BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "rl": richardson_lucy,
    "wbns": wbns,
    "rolling_ball": rolling_ball,
    "bf": background_filter,
}
NEEDS_PSF: frozenset[str] = frozenset({"rl"})
