"""Know when not to trust cTIRF: the physics-consistency monitor.

ET2dNet explains its input: x^ = g * psf + b must reproduce the measured EPI x. Two
numbers per frame, from the one forward pass that makes the cTIRF (the Restorer's
"ctirf+recon" output), on the network's normalised scale:

- `residual`: mean((x^ - x)^2) / var(x), the share of the frame's variance the model
  does not explain (0: perfectly explained; ~1: not at all, e.g. pure noise);
- `in_focus`: mean(cTIRF) / mean(x^), the share of the light the model attributes to the
  in-focus branch rather than to background (an out-of-focus plane or a foreign
  specimen moves it away from what the training data had).

A checkpoint can carry the distribution of both on frames like its training data
(`calibrate`, stored under the metadata key "consistency"); a frame beyond the 99th
percentile of the residual, or outside the 1st-99th percentile range of the in-focus
share, is flagged (each range widened by its own half-width: see `limits`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.data.normalize import percentile_scale
from ctirf_live.inference.restorer import Restorer

METADATA_KEY = "consistency"
QUANTILES = (1.0, 50.0, 99.0)


@dataclass
class Consistency:
    """One frame's consistency scores and, when the model is calibrated, its verdict."""

    residual: float
    in_focus: float
    flagged: bool | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scores(epi: np.ndarray, ctirf: np.ndarray, recon: np.ndarray, percentile: float) -> Consistency:
    """The two numbers for one frame (arrays in the input's intensity scale)."""
    scale = np.float32(percentile_scale(np.asarray(epi, np.float32), percentile))
    x = np.clip(np.asarray(epi, np.float32) / scale, 0.0, 1.0)
    xh = np.asarray(recon, np.float32) / scale
    var = float(x.var())
    residual = float(np.mean((xh - x) ** 2) / max(var, 1e-12))
    in_focus = float(np.mean(ctirf) / max(float(np.mean(recon)), 1e-12))
    return Consistency(residual, in_focus)


def residual_map(epi: np.ndarray, recon: np.ndarray, percentile: float = 98.0) -> np.ndarray:
    """x^ - x on the normalised scale: where the model does not explain the frame."""
    scale = np.float32(percentile_scale(np.asarray(epi, np.float32), percentile))
    return (np.asarray(recon, np.float32) - np.asarray(epi, np.float32)) / scale


class ConsistencyMonitor:
    """Restore frames with a Restorer and score each against the model's calibration."""

    def __init__(self, restorer: Restorer, calibration: Mapping[str, Any] | None = None) -> None:
        if restorer.dims != 2:
            raise ValueError("the consistency monitor scores 2D frames: use an ET2dNet model")
        self.restorer = restorer
        self.calibration = dict(calibration or restorer.metadata.get(METADATA_KEY) or {})

    @property
    def calibrated(self) -> bool:
        return bool(self.calibration.get("residual"))

    def restore(self, epi: np.ndarray) -> tuple[np.ndarray, Consistency, np.ndarray]:
        """(cTIRF, scores with verdict, reconstructed EPI) of one frame, one forward pass."""
        both = self.restorer.restore(epi, output="ctirf+recon")
        ctirf, recon = both[0], both[1]
        result = scores(epi, ctirf, recon, self.restorer.percentile)
        if self.calibrated:
            judge(result, self.calibration)
        return ctirf, result, recon


def limits(calibration: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Accepted range of each score: the calibrated 1st-99th percentile range widened by
    its own half-widths (p99 + (p99 - p50), p1 - (p50 - p1)), so a calibration from a few
    dozen frames does not flag every frame slightly beyond its extremes."""
    out = {}
    for name in ("residual", "in_focus"):
        q = calibration[name]
        out[name] = (q["p1"] - (q["p50"] - q["p1"]), q["p99"] + (q["p99"] - q["p50"]))
    return out


def judge(result: Consistency, calibration: Mapping[str, Any]) -> Consistency:
    """Flag `result` against a calibration (in place; returned for chaining).

    A residual above the accepted range, or an in-focus share outside it, is flagged.
    """
    bounds = limits(calibration)
    reasons = []
    if result.residual > bounds["residual"][1]:
        reasons.append(f"residual {result.residual:.3f} > {bounds['residual'][1]:.3f}")
    lo, hi = bounds["in_focus"]
    if not lo <= result.in_focus <= hi:
        reasons.append(f"in-focus share {result.in_focus:.3f} outside {lo:.3f}-{hi:.3f}")
    result.flagged = bool(reasons)
    result.reason = "; ".join(reasons)
    return result


def calibrate(restorer: Restorer, frames: Iterable[np.ndarray]) -> dict[str, Any]:
    """Distribution of both scores over `frames` (frames like the model's training data)."""
    monitor = ConsistencyMonitor(restorer, calibration={})
    rows = [monitor.restore(frame)[1] for frame in frames]
    if len(rows) < 5:
        raise ValueError(f"calibrating the consistency monitor needs >= 5 frames, got {len(rows)}")
    out: dict[str, Any] = {"frames": len(rows)}
    for name in ("residual", "in_focus"):
        values = np.array([getattr(r, name) for r in rows])
        out[name] = {f"p{q:g}": float(np.percentile(values, q)) for q in QUANTILES}
    return out


def record_calibration(checkpoint: str | Path, calibration: Mapping[str, Any]) -> Path:
    """Store a calibration in a checkpoint's metadata (atomically, weights unchanged)."""
    from ctirf_live.models.checkpoint import load_checkpoint, save_checkpoint

    state, metadata = load_checkpoint(checkpoint)
    metadata[METADATA_KEY] = dict(calibration)
    return save_checkpoint(checkpoint, state, metadata)


def advice(flagged: int, total: int, model: str) -> str:
    """The one line a run with many flagged frames ends with ('' when few are)."""
    if total == 0 or flagged / total < 0.1:
        return ""
    return (
        f"{flagged} of {total} frames are outside what model {model} was trained on: "
        "collect pairs with ctirf calibrate and fine-tune"
    )
