"""How well one EPI frame can tell a filament's height at all: the sectioning test's bound.

A filament `z` above the coverslip reaches the EPI frame dimmer (less supercritical
light, defocus) and wider than one on the glass. A network that sections must read the
height from that shape, but a slightly wider bundle on the glass (a stress fibre of a
few filaments) is wider too. For each filament of the sectioning scene this module
finds its best on-glass look-alike: the same brightness's coverslip filament, blurred
laterally by a Gaussian of width `blur_um` and scaled by `amplitude`, fitted to the
noise-free cross-section. What the look-alike cannot match (the residual) is all the
frame says about the height; its matched-filter signal-to-noise along the filament's
length, in the scene's own camera noise, is `separation_sd`. It is an upper bound (it
assumes everything else in the field known): where it is a few s.d. or less, no
single-frame method can section that height, and cTIRF's output there follows its
training prior rather than the specimen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize

from ctirf_live.evaluation.sectioning import SectioningScene, filament_profiles

PROFILE_HALF_PX = 12  # +-1.2 um at 60X: the widest look-alike fits inside
MAX_BLUR_UM = 1.0
_EDGE_PX = 8  # as the sectioning test: the filament ends are left out


@dataclass(frozen=True)
class Lookalike:
    """One filament's best on-glass look-alike and what separates them."""

    level: str
    height_um: float
    amplitude: float  # look-alike peak relative to the coverslip filament's
    blur_um: float  # Gaussian sigma of the extra width the look-alike needs
    residual_fraction: float  # rms residual / the filament's own cross-section peak
    separation_sd: float  # matched-filter SNR of the residual along the filament

    def to_dict(self) -> dict[str, float | str]:
        return {
            "level": self.level,
            "height_um": self.height_um,
            "amplitude": round(self.amplitude, 4),
            "blur_um": round(self.blur_um, 4),
            "residual_fraction": round(self.residual_fraction, 4),
            "separation_sd": round(self.separation_sd, 2),
        }


def _blurred(profile: np.ndarray, blur_um: float, pixel_um: float) -> np.ndarray:
    if blur_um <= 0:
        return profile
    return ndimage.gaussian_filter1d(profile, blur_um / pixel_um, mode="constant")


def fit_lookalike(
    ground: np.ndarray, target: np.ndarray, pixel_um: float
) -> tuple[float, float, np.ndarray]:
    """(peak ratio, blur_um, residual) of the scaled, blurred `ground` closest to `target`.

    The scale is solved in closed form for each blur, the blur by a bounded scalar search
    over 0..MAX_BLUR_UM; the peak ratio is the look-alike's peak over `ground`'s.
    """
    ground = np.asarray(ground, np.float64)
    target = np.asarray(target, np.float64)

    def fit(blur_um: float) -> tuple[np.ndarray, np.ndarray]:
        shape = _blurred(ground, blur_um, pixel_um)
        denom = float(shape @ shape)
        scaled = shape * (float(shape @ target) / denom if denom > 0 else 0.0)
        return scaled, target - scaled

    best = optimize.minimize_scalar(
        lambda w: float(np.sum(fit(w)[1] ** 2)),
        bounds=(0.0, MAX_BLUR_UM),
        method="bounded",
        options={"xatol": 1e-4},
    )
    blur = float(best.x) if best.fun < np.sum(fit(0.0)[1] ** 2) else 0.0
    scaled, residual = fit(blur)
    peak = float(ground.max())
    return (float(scaled.max()) / peak if peak > 0 else 0.0), blur, residual


def height_lookalikes(scene: SectioningScene) -> list[Lookalike]:
    """The on-glass look-alike of every filament of `scene` above the coverslip."""
    with_lines, without = scene.references["epi_noise_free"]
    sections = filament_profiles(with_lines, without, scene, PROFILE_HALF_PX)
    band = np.asarray(scene.epi, np.float64) - np.asarray(with_lines, np.float64)
    c0, c1 = scene.columns
    noise_sd = float(band[:, c0 + _EDGE_PX : c1 - _EDGE_PX].std())
    n_along = c1 - c0 - 2 * _EDGE_PX
    heights = sorted({z for _, z in scene.rows})
    out = []
    for level in sorted({lv for lv, _ in scene.rows}):
        ground = sections[(level, heights[0])]
        for z in heights[1:]:
            target = sections[(level, z)]
            amplitude, blur, residual = fit_lookalike(ground, target, scene.pixel_size_um)
            norm = float(np.sqrt(np.sum(residual**2)))
            out.append(
                Lookalike(
                    level=level,
                    height_um=float(z),
                    amplitude=amplitude,
                    blur_um=blur,
                    residual_fraction=norm / np.sqrt(residual.size) / max(target.max(), 1e-12),
                    separation_sd=norm / noise_sd * np.sqrt(n_along) if noise_sd > 0 else np.inf,
                )
            )
    return out


def lookalike_markdown(rows: list[Lookalike]) -> str:
    """A table: one row per filament above the coverslip."""
    lines = [
        "| filament | z (um) | look-alike on the glass: peak, extra blur sigma | "
        "rms residual / peak | separation (noise s.d.) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        at_bound = r.blur_um >= MAX_BLUR_UM - 1e-3
        blur = f"{'>= ' if at_bound else ''}{r.blur_um * 1000:.0f} nm"
        lines.append(
            f"| {r.level} | {r.height_um:g} | {r.amplitude:.2f}, {blur} | "
            f"{r.residual_fraction:.3f} | {r.separation_sd:.1f} |"
        )
    return "\n".join(lines)
