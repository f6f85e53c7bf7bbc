"""Know when not to trust cTIRF: the physics-consistency monitor.

ET2dNet explains its input: x^ = g * psf + b must reproduce the measured EPI x. Every
frame (every plane of a stack) gets these scores, computed on the model's device from
the one forward pass that makes the cTIRF (no second network pass), on the network's
normalised scale:

- `ms_ssim`: 1 - MS-SSIM(x^, x), the structural term of the self-supervised loss, over
  the frame's central `MSSSIM_WINDOW` px square (the whole frame when smaller): on the
  whole of a 512 px frame it cost 60 of the scores' 72 ms, 8% of the forward on a CPU;
- `residual`: mean((x^ - x)^2) / var(x), the share of the frame's variance left
  unexplained (~1 for pure noise);
- `noise_ratio`: mean((x^ - x)^2 / sigma^2), the residual energy relative to the
  Poisson-Gaussian noise the frame's own intensity predicts, sigma^2 = a x^ + b with a
  and b fitted on the frame's out-of-band component (an image through the objective has
  no light beyond the cut-off 2 NA / lambda: what is there is camera noise);
- `band_misfit`: residual power inside the PSF passband per frequency, relative to the
  noise power per frequency out of band (structure the model failed to explain);
- `g_unexplained`: share of the pseudo-GT g's (non-DC) energy beyond the cut-off, which
  the PSF cannot transmit (detail the data cannot support: foreign content, defocus);
- `in_focus`: mean(cTIRF) / mean(x^), the share of light given to the in-focus branch;
- `spectrum`: how unlike the calibration frames the measured EPI's spectrum is in shape:
  its log power in `SPECTRUM_BANDS` rings of the passband relative to the noise floor
  beyond the cut-off (what kind of specimen, at what signal, independent of brightness),
  as the RMS of the z-scores against the calibration frames' mean and spread per ring.
  Filaments, membranes and tissue fall off with frequency in their own way; sparse
  beads are flat under the OTF, pure noise has nothing above the floor.

The noise scores and `spectrum` need pixels finer than Nyquist (a band beyond the
cut-off); with coarser pixels they are NaN and not judged.

Two facts of the acquisition are checked as well, calibrated or not, because no image
score can see them: a frame focused away from the coverslip through a thick specimen is
a sharp image of another layer, which x^ explains as well as an in-focus one. A plane is
flagged when its stage focus lies more than the model's depth of field (lambda n / NA^2)
from the run's reference focus (`focus_offset_um`; for a 3D model, the stack's lowest
plane), or when the rig's pixel size differs from the model's by more than 5% (another
objective or camera; the checkpoint of a fine-tuned model records its rig's).

A checkpoint carries each score's percentiles on validation frames (`calibrate`, stored
under the metadata key "consistency"). Live, a plane beyond the calibrated p99 (the
`quantile`; two-sided for `g_unexplained` and `in_focus`), widened by `widen` times the
distance of that percentile from the median, is flagged (`limits`, `judge`).
`ConsistencyLog` collects the per-plane verdicts of a run for LiveStats, summary.json
and the `<store>.consistency.csv` sidecar of a cTIRF store.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctirf_live.atomic import atomic_write_bytes
from ctirf_live.config import Optics
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.runners import forward_parts
from ctirf_live.training.losses import structural_similarity

METADATA_KEY = "consistency"
CALIBRATION_VERSION = 3
# computed by `plane_scores` on the device; `spectrum` from its ring powers and the
# calibration's reference (`spectrum_distance`)
IMAGE_SCORES = ("ms_ssim", "residual", "noise_ratio", "band_misfit", "g_unexplained", "in_focus")
SCORES = (*IMAGE_SCORES, "spectrum")
SPECTRUM_BANDS = 8
MSSSIM_WINDOW = 256  # px: the side of the central square `ms_ssim` is taken over
SPECTRUM_RANGE = (0.05, 0.9)  # the rings' span, as fractions of the cut-off
MIN_SPREAD = 0.05  # smallest spread of a ring's log power (keeps z-scores finite)
TWO_SIDED = frozenset({"g_unexplained", "in_focus"})
QUANTILES = (0.5, 1.0, 2.5, 5.0, 25.0, 50.0, 75.0, 95.0, 97.5, 99.0, 99.5)
DEFAULT_QUANTILE = 99.0
DEFAULT_WIDEN = 1.0
ADVICE_FRACTION = 0.1
MIN_CALIBRATION_FRAMES = 5
# passband and out-of-band regions, as fractions of the cut-off 2 NA / lambda
IN_BAND = 0.9
OUT_OF_BAND = 1.1
MIN_OUT_OF_BAND = 0.05  # below this share of the spectrum the noise floor is not measurable
PARTS = ("ctirf", "recon", "g")
INDEX_KEYS = ("series", "plane", "p", "g", "t", "c", "z")  # columns of the sidecar
CONTEXT = ("focus_offset_um",)  # per-plane facts of the acquisition, in the sidecar too
PIXEL_TOLERANCE = 0.05


@dataclass
class Consistency:
    """One plane's scores and, when the model is calibrated, its verdict."""

    ms_ssim: float = math.nan
    residual: float = math.nan
    noise_ratio: float = math.nan
    band_misfit: float = math.nan
    g_unexplained: float = math.nan
    in_focus: float = math.nan
    spectrum: float = math.nan
    focus_offset_um: float = math.nan
    flagged: bool | None = None
    reason: str = ""

    @classmethod
    def from_row(
        cls, row: Sequence[float], reference: Mapping[str, Any] | None = None
    ) -> Consistency:
        """From a row of `plane_scores` (the image scores, then the ring powers); the
        `spectrum` score needs the calibration's `reference`."""
        n = len(IMAGE_SCORES)
        values = {name: float(v) for name, v in zip(IMAGE_SCORES, row[:n], strict=True)}
        return cls(**values, spectrum=spectrum_distance(row[n:], reference))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- scores (torch, on the model's device) --------------------------------------------


@functools.lru_cache(maxsize=16)
def _bands(
    shape: tuple[int, int], optics: Optics, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Masks of the rfft2 half-spectrum: (in band, out of band, beyond the cut-off) and the
    share of the full spectrum out of band."""
    ny, nx = shape
    cutoff = 2 * optics.na / optics.wavelength_um * optics.pixel_size_um  # cycles per pixel
    fy = torch.fft.fftfreq(ny, device=device)[:, None]
    fx = torch.fft.rfftfreq(nx, device=device)[None, :]
    radius = torch.sqrt(fy**2 + fx**2)
    lowest = 2.0 / min(ny, nx)  # leave out the illumination's slow ramp
    in_band = (radius > lowest) & (radius < IN_BAND * cutoff)
    out_band = radius > OUT_OF_BAND * cutoff
    beyond = radius > cutoff
    # columns other than 0 and the Nyquist one stand for two frequencies of the full spectrum
    twice = torch.full((1, fx.shape[1]), 2.0, device=device)
    twice[0, 0] = 1.0
    if nx % 2 == 0:
        twice[0, -1] = 1.0
    share = float((out_band * twice).sum()) / (ny * nx)
    return in_band, out_band, beyond, share


@functools.lru_cache(maxsize=16)
def _rings(shape: tuple[int, int], optics: Optics, device: torch.device) -> torch.Tensor:
    """(rows * cols, SPECTRUM_BANDS): each ring's mean over the rfft2 half-spectrum as a
    matrix (equal-width rings spanning `SPECTRUM_RANGE` of the cut-off; a column of
    zeros where a ring holds no frequency, on frames too small)."""
    ny, nx = shape
    cutoff = 2 * optics.na / optics.wavelength_um * optics.pixel_size_um
    fy = torch.fft.fftfreq(ny, device=device)[:, None]
    fx = torch.fft.rfftfreq(nx, device=device)[None, :]
    radius = (torch.sqrt(fy**2 + fx**2) / cutoff).reshape(-1, 1)
    edges = torch.linspace(*SPECTRUM_RANGE, SPECTRUM_BANDS + 1, device=device)
    masks = ((radius >= edges[:-1]) & (radius < edges[1:])).float()
    return masks / masks.sum(0).clamp_min(1.0)


def spectrum_distance(bands: Sequence[float], reference: Mapping[str, Any] | None) -> float:
    """RMS z-score of a plane's ring powers against the calibration's (NaN when there
    is no reference or a ring is not measurable)."""
    if not reference or len(bands) != SPECTRUM_BANDS:
        return math.nan
    mean = np.asarray(reference["mean"], np.float64)
    spread = np.maximum(np.asarray(reference["std"], np.float64), MIN_SPREAD)
    z = (np.asarray(bands, np.float64) - mean) / spread
    return float(np.sqrt(np.mean(z**2))) if np.isfinite(z).all() else math.nan


def plane_scores(
    x: torch.Tensor,
    ctirf: torch.Tensor,
    recon: torch.Tensor,
    g: torch.Tensor,
    optics: Optics,
    raw: torch.Tensor | None = None,
) -> torch.Tensor:
    """The image scores and ring powers (P, len(IMAGE_SCORES) + SPECTRUM_BANDS) of P
    planes: normalised EPI x, the network's cTIRF, reconstruction x^ and pseudo-GT g,
    each (P, Y, X), on any device. The ring powers come from `raw`, the EPI before the
    normalisation clipped its brightest pixels (default x): clipped, sparse bright
    specimens (beads) lose the spectrum that tells them apart."""
    x, ctirf, recon, g = (t.float() for t in (x, ctirf, recon, g))
    planes, ny, nx = x.shape
    n = ny * nx
    res = recon - x
    flat = (planes, -1)
    residual = res.square().reshape(flat).mean(1) / x.reshape(flat).var(1).clamp_min(1e-12)
    rows, cols = _central(ny, nx)
    ms = 1.0 - structural_similarity(recon[:, None, rows, cols], x[:, None, rows, cols])
    in_focus = ctirf.reshape(flat).mean(1) / recon.reshape(flat).mean(1).clamp_min(1e-12)

    in_band, out_band, beyond, share = _bands((ny, nx), optics, x.device)
    spec_x = torch.fft.rfft2(x)
    spec_r = torch.fft.rfft2(res * (x < 1.0))  # normalisation clipped the brightest pixels
    power_g = torch.fft.rfft2(g).abs().square()
    nonzero = torch.ones_like(beyond)
    nonzero[0, 0] = False
    g_unexplained = (power_g * beyond).sum((1, 2)) / (power_g * nonzero).sum((1, 2)).clamp_min(
        1e-20
    )
    nan = torch.full((planes,), math.nan, device=x.device)
    rings = torch.full((planes, SPECTRUM_BANDS), math.nan, device=x.device)
    if share < MIN_OUT_OF_BAND:
        noise_ratio = band_misfit = nan
    else:
        power_x = spec_x.abs().square()
        floor = (power_x * out_band).sum((1, 2)) / out_band.sum() / n  # sigma^2 per pixel
        band_misfit = (spec_r.abs().square() * in_band).sum((1, 2)) / in_band.sum() / n
        band_misfit = band_misfit / floor.clamp_min(1e-20)
        noise_ratio = _noise_ratio(x, recon, res, spec_x, out_band, share)
        rings = _ring_powers(x if raw is None else raw.float(), out_band, optics)
    scores = torch.stack([ms, residual, noise_ratio, band_misfit, g_unexplained, in_focus], 1)
    return torch.cat([scores, rings], 1)


def _central(ny: int, nx: int) -> tuple[slice, slice]:
    """The central `MSSSIM_WINDOW`-px square of a (ny, nx) frame (all of a smaller side)."""

    def cut(n: int) -> slice:
        start = max((n - MSSSIM_WINDOW) // 2, 0)
        return slice(start, start + min(n, MSSSIM_WINDOW))

    return cut(ny), cut(nx)


def _ring_powers(x: torch.Tensor, out_band: torch.Tensor, optics: Optics) -> torch.Tensor:
    """log(mean power in each ring / mean power beyond the cut-off) of planes (P, Y, X);
    NaN for a ring a frame this small does not sample."""
    planes, ny, nx = x.shape
    power = torch.fft.rfft2(x - x.mean((1, 2), keepdim=True)).abs().square()
    floor = (power * out_band).sum((1, 2)) / out_band.sum()
    ring = power.reshape(planes, -1) @ _rings((ny, nx), optics, x.device)
    ring = torch.where(ring > 0, ring, torch.full_like(ring, math.nan))
    return torch.log(ring / floor.clamp_min(1e-30)[:, None])


def _noise_ratio(
    x: torch.Tensor,
    recon: torch.Tensor,
    res: torch.Tensor,
    spec_x: torch.Tensor,
    out_band: torch.Tensor,
    share: float,
) -> torch.Tensor:
    """mean(res^2 / sigma^2) over unclipped pixels, sigma^2 = a x^ + b fitted per plane on
    the squared out-of-band component (noise only) divided by its share of the spectrum."""
    planes, ny, nx = x.shape
    noise = torch.fft.irfft2(spec_x * out_band, s=(ny, nx))
    target = (noise.square() / share).reshape(planes, -1)
    signal = recon.reshape(planes, -1)
    ds = signal - signal.mean(1, keepdim=True)
    slope = (ds * (target - target.mean(1, keepdim=True))).mean(1) / ds.square().mean(1).clamp_min(
        1e-12
    )
    slope = slope.clamp_min(0.0)[:, None]
    offset = target.mean(1, keepdim=True) - slope * signal.mean(1, keepdim=True)
    sigma2 = (slope * signal + offset).clamp_min(0.1 * target.mean(1, keepdim=True) + 1e-12)
    keep = (x < 1.0).reshape(planes, -1).float()  # normalisation clipped the brightest pixels
    chi2 = res.reshape(planes, -1).square() / sigma2
    return (chi2 * keep).sum(1) / keep.sum(1).clamp_min(1.0)


@torch.inference_mode()
def restore_scored(
    restorer: Restorer, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cTIRF (input scale), `plane_scores` rows (P, ...) and residual map x^ - x (normalised)
    of a frame `(Y, X)`, a series `(N, Y, X)` (2D net, each slice on its own) or a stack
    `(Z, Y, X)` (3D net), all on `x`'s device, from one pass of the network."""
    if restorer.dims == 2 and x.ndim == 3:
        each = [restore_scored(restorer, s) for s in x]
        return (
            torch.stack([e[0] for e in each]),
            torch.cat([e[1] for e in each]),
            torch.stack([e[2] for e in each]),
        )
    norm, parts, scale = forward_parts(restorer, x, PARTS)  # any dtype (uint16 on GPU)
    planes = norm.reshape(-1, *norm.shape[-2:])
    ctirf, recon, g = (p.reshape(planes.shape) for p in parts)
    raw = x.reshape(planes.shape)
    scores = plane_scores(planes, ctirf, recon, g, restorer.optics, raw)
    return parts[0] * scale, scores, (recon - planes).reshape(norm.shape)


# -- calibration and verdicts -----------------------------------------------------------


def limits(
    calibration: Mapping[str, Any],
    quantile: float = DEFAULT_QUANTILE,
    widen: float = DEFAULT_WIDEN,
) -> dict[str, tuple[float, float]]:
    """Accepted range of each calibrated score: up to its `quantile` percentile (and, for
    two-sided scores, down from its 100 - `quantile` one), each end moved away from the
    median by `widen` times its distance to it, so a calibration on a few dozen frames
    does not flag every frame slightly beyond its extremes."""
    if not 50.0 < quantile < 100.0:
        raise ValueError(f"the flagging quantile must be between 50 and 100, got {quantile}")
    if widen < 0:
        raise ValueError(f"widen must be >= 0, got {widen}")
    out = {}
    for name in SCORES:
        q = calibration.get(name)
        if not isinstance(q, Mapping):
            continue
        hi_key, lo_key = f"p{quantile:g}", f"p{100.0 - quantile:g}"
        if hi_key not in q or "p50" not in q:
            stored = ", ".join(k for k in q if k.startswith("p"))
            raise ValueError(
                f"the calibration has no {hi_key} of {name} (it has {stored}); flag at one "
                "of those or recalibrate the model (ctirf finetune records one)"
            )
        mid = float(q["p50"])
        hi = float(q[hi_key]) + widen * (float(q[hi_key]) - mid)
        lo = -math.inf
        if name in TWO_SIDED and lo_key in q:
            lo = float(q[lo_key]) - widen * (mid - float(q[lo_key]))
        out[name] = (lo, hi)
    return out


def judge(result: Consistency, bounds: Mapping[str, tuple[float, float]]) -> Consistency:
    """Flag `result` against `limits(...)` (in place; returned for chaining). A score
    outside its range flags the plane; NaN scores (not measurable) are not judged."""
    reasons = []
    for name, (lo, hi) in bounds.items():
        value = getattr(result, name)
        if math.isnan(value):
            continue
        if value > hi:
            reasons.append(f"{name} {value:.3g} > {hi:.3g}")
        elif value < lo:
            reasons.append(f"{name} {value:.3g} < {lo:.3g}")
    result.flagged = bool(reasons)
    result.reason = "; ".join(reasons)
    return result


def focus_tolerance_um(optics: Optics) -> float:
    """The depth of field lambda n / NA^2 (um): how far from the focus the model was
    trained at a frame may be focused before it shows another layer of the specimen."""
    return optics.wavelength_um * optics.immersion_index / optics.na**2


def context_reasons(
    optics: Optics, focus_offset_um: float | None, pixel_size_um: float | None
) -> list[str]:
    """Why a plane is outside what a model of `optics` was trained on, from the
    acquisition alone: focus away from the reference, another pixel size."""
    reasons = []
    if focus_offset_um is not None and math.isfinite(focus_offset_um):
        tolerance = focus_tolerance_um(optics)
        if abs(focus_offset_um) > tolerance:
            reasons.append(
                f"focus {focus_offset_um:+.2f} um from the reference (depth of field "
                f"{tolerance:.2f} um)"
            )
    if pixel_size_um and abs(pixel_size_um / optics.pixel_size_um - 1) > PIXEL_TOLERANCE:
        reasons.append(
            f"pixel {pixel_size_um * 1000:.1f} nm, model trained at "
            f"{optics.pixel_size_um * 1000:.1f} nm"
        )
    return reasons


@dataclass
class Scored:
    """A restored frame or stack with one `Consistency` per plane."""

    ctirf: np.ndarray
    planes: list[Consistency]
    residual: np.ndarray  # x^ - x on the normalised scale, the shape of `ctirf`

    @property
    def flagged(self) -> int:
        """Planes flagged (0 when the model is not calibrated)."""
        return sum(bool(p.flagged) for p in self.planes)


class ConsistencyMonitor:
    """Restore frames with a Restorer and score each plane against the model's calibration.

    `quantile` and `widen` set how far beyond the calibrated distribution a plane is
    flagged (see `limits`); a calibration passed here replaces the checkpoint's.
    """

    def __init__(
        self,
        restorer: Restorer,
        calibration: Mapping[str, Any] | None = None,
        *,
        quantile: float = DEFAULT_QUANTILE,
        widen: float = DEFAULT_WIDEN,
    ) -> None:
        self.restorer = restorer
        chosen = restorer.metadata.get(METADATA_KEY) if calibration is None else calibration
        self.calibration = dict(chosen or {})
        self.quantile, self.widen = float(quantile), float(widen)
        self.bounds = limits(self.calibration, self.quantile, self.widen)
        self.spectrum_reference = self.calibration.get("spectrum_reference")
        # the acquisition's facts, set per run: the data's pixel size and the focus
        # (stage Z, um) the model's frames belong at; None: not checked
        self.pixel_size_um: float | None = None
        self.focus_reference_um: float | None = None

    @property
    def calibrated(self) -> bool:
        return bool(self.bounds)

    @property
    def model_name(self) -> str:
        path = self.restorer.metadata.get("path")
        return Path(path).stem if path else self.restorer.model.name

    def focus_offsets(self, focus_um: Sequence[float | None] | None, planes: int) -> list[float]:
        """Each plane's focus minus the reference (NaN where unknown); the planes of a
        3D model's stack are placed by its lowest plane, since the stack spans depth."""
        known = [math.nan if z is None else float(z) for z in (focus_um or [])]
        if self.focus_reference_um is None or len(known) != planes:
            return [math.nan] * planes
        if self.restorer.dims == 3 and planes > 1:
            known = [min(known)] * planes
        return [z - self.focus_reference_um for z in known]

    def verdicts(
        self, scores: np.ndarray, focus_um: Sequence[float | None] | None = None
    ) -> list[Consistency]:
        """One judged `Consistency` per row of a `plane_scores` array; `focus_um`: each
        plane's stage focus, checked against `focus_reference_um`."""
        reference = self.spectrum_reference
        rows = [Consistency.from_row(r, reference) for r in np.atleast_2d(scores)]
        offsets = self.focus_offsets(focus_um, len(rows))
        for row, offset in zip(rows, offsets, strict=True):
            row.focus_offset_um = offset
            if self.calibrated:
                judge(row, self.bounds)
            reasons = context_reasons(self.restorer.optics, offset, self.pixel_size_um)
            if reasons:  # flagged even when uncalibrated: these need no calibration
                row.flagged = True
                row.reason = "; ".join(r for r in (row.reason, *reasons) if r)
        return rows

    def restore(self, image: np.ndarray, focus_um: Sequence[float | None] | None = None) -> Scored:
        """Restore a frame, series or stack (numpy, input scale) and score every plane
        (`focus_um`: each plane's stage focus, if known)."""
        ctirf, scores, residual = self.score(image)
        return Scored(ctirf, self.verdicts(scores, focus_um), residual)

    def score(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cTIRF, `plane_scores` rows and residual map of a frame, series or stack."""
        arr = self.restorer._check(image)
        x = torch.from_numpy(np.ascontiguousarray(arr, np.float32)).to(self.restorer.device)
        return tuple(t.cpu().numpy() for t in restore_scored(self.restorer, x))  # type: ignore[return-value]


def calibrate(
    restorer: Restorer, frames: Iterable[np.ndarray], source: str = ""
) -> dict[str, Any]:
    """Percentiles (`QUANTILES`) of every score over the planes of `frames`, frames like
    the model's training data (validation frames), and the spectrum's reference (mean
    and spread of each ring); store it with `record_calibration`.

    The `spectrum` percentiles are of leave-one-out distances (each frame against the
    reference of the others), so they are what a new frame of the same kind scores.
    """
    monitor = ConsistencyMonitor(restorer, calibration={})
    raw = np.concatenate([np.atleast_2d(monitor.score(frame)[1]) for frame in frames])
    if len(raw) < MIN_CALIBRATION_FRAMES:
        raise ValueError(
            f"calibrating the consistency monitor needs >= {MIN_CALIBRATION_FRAMES} frames, "
            f"got {len(raw)}; pass more validation frames"
        )
    out: dict[str, Any] = {"version": CALIBRATION_VERSION, "frames": len(raw)}
    if source:
        out["source"] = source
    rows = [Consistency.from_row(r) for r in raw]
    bands = raw[:, len(IMAGE_SCORES) :]
    ok = np.isfinite(bands).all(1)
    if ok.sum() >= MIN_CALIBRATION_FRAMES:
        out["spectrum_reference"] = _reference(bands[ok])
        for i in np.flatnonzero(ok):
            others = ok & (np.arange(len(bands)) != i)
            rows[i].spectrum = spectrum_distance(bands[i], _reference(bands[others]))
    for name in SCORES:
        values = np.array([getattr(r, name) for r in rows], np.float64)
        values = values[np.isfinite(values)]
        if values.size >= MIN_CALIBRATION_FRAMES:
            out[name] = {f"p{q:g}": float(np.percentile(values, q)) for q in QUANTILES}
    return out


def _reference(bands: np.ndarray) -> dict[str, Any]:
    return {
        "range": list(SPECTRUM_RANGE),
        "mean": bands.mean(0).tolist(),
        "std": bands.std(0, ddof=1).tolist(),
    }


def record_calibration(checkpoint: str | Path, calibration: Mapping[str, Any]) -> Path:
    """Store a calibration in a checkpoint's metadata (atomically, weights unchanged)."""
    from ctirf_live.models.checkpoint import load_checkpoint, save_checkpoint

    state, metadata = load_checkpoint(checkpoint)
    metadata[METADATA_KEY] = dict(calibration)
    return save_checkpoint(checkpoint, state, metadata)


def advice(flagged: int, total: int, model: str, fraction: float = ADVICE_FRACTION) -> str:
    """The one line a run with many flagged frames ends with ('' when few are)."""
    if total == 0 or flagged / total < fraction:
        return ""
    return (
        f"{flagged} of {total} frames are outside what model {model} was trained on: "
        "collect pairs with ctirf calibrate and fine-tune"
    )


# -- a run's record -------------------------------------------------------------------


def sidecar_path(store: str | Path) -> Path:
    """Where a cTIRF store's per-plane scores go: `<stem>.consistency.csv` beside it."""
    store = Path(store)
    name = store.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return store.with_name(f"{name}.consistency.csv")


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class _Row:
    index: dict[str, int]
    scores: Consistency


@dataclass
class ConsistencyLog:
    """The per-plane verdicts of a run, in arrival order (thread-safe appends).

    Feeds `LiveStats` (`last`, `flagged`, `frames`), summary.json (`summary`) and the
    store's sidecar (`write_csv`); `start` marks where the rows of one store begin.
    """

    monitor: ConsistencyMonitor
    rows: list[_Row] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, index: Mapping[str, int], planes: Sequence[Consistency]) -> None:
        """Record the planes of one frame (one plane) or z-stack (index without z)."""
        base = {k: int(v) for k, v in index.items()}
        stack = len(planes) > 1 and "z" not in base
        with self._lock:
            for z, plane in enumerate(planes):
                self.rows.append(_Row({**base, "z": z} if stack else base, plane))

    @property
    def frames(self) -> int:
        return len(self.rows)

    @property
    def flagged(self) -> int:
        with self._lock:
            return sum(bool(r.scores.flagged) for r in self.rows)

    @property
    def last(self) -> dict[str, Any]:
        with self._lock:
            return self.rows[-1].scores.to_dict() if self.rows else {}

    def _since(self, start: int) -> list[_Row]:
        with self._lock:
            return list(self.rows[start:])

    def summary(self, start: int = 0) -> dict[str, Any]:
        """Counts, medians, limits and the advice line of the rows from `start` on."""
        rows = self._since(start)
        flagged = sum(bool(r.scores.flagged) for r in rows)
        medians = {}
        for name in SCORES:
            values = np.array([getattr(r.scores, name) for r in rows], np.float64)
            values = values[np.isfinite(values)]
            medians[name] = float(np.median(values)) if values.size else None
        m = self.monitor
        judged = m.calibrated or flagged > 0
        optics = m.restorer.optics
        return {
            "model": m.model_name,
            "calibrated": m.calibrated,
            "quantile": m.quantile,
            "widen": m.widen,
            "limits": {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in m.bounds.items()},
            "context": {
                "pixel_size_um": m.pixel_size_um,
                "model_pixel_size_um": optics.pixel_size_um,
                "focus_reference_um": m.focus_reference_um,
                "focus_tolerance_um": round(focus_tolerance_um(optics), 4),
            },
            "frames": len(rows),
            "flagged": flagged if judged else None,
            "flagged_fraction": round(flagged / len(rows), 4) if rows and judged else None,
            "median": medians,
            "advice": advice(flagged, len(rows), m.model_name) if judged else "",
        }

    def per_frame(self, start: int = 0) -> dict[str, list[Any]]:
        """The rows from `start` on as columns (compact JSON for summaries and attrs)."""
        rows = self._since(start)
        keys = [k for k in INDEX_KEYS if any(k in r.index for r in rows)]
        out: dict[str, list[Any]] = {k: [r.index.get(k, 0) for r in rows] for k in keys}
        for name in (*SCORES, *CONTEXT):
            out[name] = [_finite(round(getattr(r.scores, name), 6)) for r in rows]
        out["flagged"] = [r.scores.flagged for r in rows]
        return out

    def csv_text(self, start: int = 0) -> str:
        """The rows from `start` on as CSV: index columns, scores, flagged, reason."""
        rows = self._since(start)
        keys = [k for k in INDEX_KEYS if any(k in r.index for r in rows)] or ["frame"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*keys, *SCORES, *CONTEXT, "flagged", "reason"])
        for i, r in enumerate(rows):
            index = [r.index.get(k, i if k == "frame" else 0) for k in keys]
            flagged = "" if r.scores.flagged is None else int(r.scores.flagged)
            values = [f"{getattr(r.scores, name):.6g}" for name in (*SCORES, *CONTEXT)]
            writer.writerow([*index, *values, flagged, r.scores.reason])
        return buffer.getvalue()

    def write_csv(self, path: str | Path, start: int = 0) -> Path:
        """Write `csv_text` atomically to `path`."""
        path = Path(path)
        atomic_write_bytes(path, self.csv_text(start).encode())
        return path
