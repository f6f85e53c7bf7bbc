"""Percentile normalisation (paper Eq. 1) and its inverse.

`norm(I) = min(c, I / perc(I, 98))` with the ceiling `c = 1` of Eq. 1, or a higher one /
none (`None`) for models trained so (a checkpoint records its `input_ceiling`): Eq. 1
flattens the brightest ~2% of a frame, which are the in-focus structures whose shape
tells a filament on the glass from one a few hundred nm up. The scale is returned so
inference can put outputs back into the input's intensity scale.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def percentile_scale(image: np.ndarray, percentile: float = 98.0) -> float:
    """The divisor of Eq. 1: the `percentile`-th percentile of the finite pixels (> 0)."""
    arr = np.asarray(image, dtype=np.float32)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        raise ValueError("image has no finite pixels; check the camera or the file")
    scale = float(np.percentile(finite, percentile))
    if scale <= EPS:
        scale = float(finite.max())
    return max(scale, EPS)


def normalize(
    image: np.ndarray, percentile: float = 98.0, clip: bool = True, ceiling: float | None = 1.0
) -> tuple[np.ndarray, float]:
    """Normalise to [0, `ceiling`] by the percentile; returns `(normalised float32, scale)`.

    When `clip`, negative values (e.g. after offset subtraction) go to 0 and values above
    `ceiling` (Eq. 1: 1; None: no upper clip) to the ceiling.
    """
    scale = percentile_scale(image, percentile)
    out = np.asarray(image, dtype=np.float32) / scale
    if clip:
        np.clip(out, 0.0, np.inf if ceiling is None else ceiling, out=out)
    return out, scale


def denormalize(image: np.ndarray, scale: float) -> np.ndarray:
    """Undo `normalize`: back to the input's intensity scale, float32."""
    return np.asarray(image, dtype=np.float32) * np.float32(scale)
