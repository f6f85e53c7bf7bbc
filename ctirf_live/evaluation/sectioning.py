"""Optical sectioning test: how much of a filament survives as it rises off the coverslip.

Identical straight filaments are laid into a real simulated cell (dense F-actin family)
at heights `HEIGHTS_UM` above the coverslip, once bright (a stress-fibre bundle) and
once dim (a single filament). Each method's output is computed with and without the
filaments on the same noisy frame statistics; the difference isolates what each
filament adds, and its cross-section peak, averaged along the filament, relative to
the filament on the coverslip, is its *survival*. TIRF keeps ~exp(-z/d) plus its
scattered share (1, ~0.2, ~0.03, ... at z = 0, 0.2, 0.5 um); raw EPI keeps much more; a
network that sections follows TIRF (paper Fig. 1c,d: the arch continuous in EPI,
broken in TIRF).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEIGHTS_UM = (0.0, 0.2, 0.5, 1.0, 2.0)
BRIGHTNESS = {"bright": 6.0, "dim": 1.5}  # amount per um: a bundle, a single filament
FIELD_PX = 512
_LINE_SPACING_PX = 44
_LINE_MARGIN_PX = 96
_PROFILE_HALF_PX = 3


@dataclass
class SectioningScene:
    """Inputs of the test: noisy EPI with/without filaments, the noise-free references."""

    epi: np.ndarray  # camera frame with the filaments (float32 ADU)
    epi_without: np.ndarray  # the same field and noise seed, no filaments
    references: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (with, without)
    rows: dict[tuple[str, float], int]  # (brightness, height) -> image row of the filament
    columns: tuple[int, int]
    pixel_size_um: float
    optics: Any = None


@dataclass
class SectioningResult:
    """Survival per method, brightness and height, with the heights tested."""

    heights_um: tuple[float, ...]
    survival: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def deviation_from(self, method: str, reference: str = "tirf") -> float:
        """Largest |survival(method) - survival(reference)| over heights and brightness."""
        worst = 0.0
        for level, values in self.survival[method].items():
            ref = self.survival[reference][level]
            worst = max(worst, max(abs(a - b) for a, b in zip(values, ref, strict=True)))
        return worst

    def to_dict(self) -> dict[str, Any]:
        methods = {
            m: {k: [round(v, 4) for v in vs] for k, vs in d.items()}
            for m, d in self.survival.items()
        }
        deviation = {m: round(self.deviation_from(m), 4) for m in self.survival if m != "tirf"}
        return {
            "heights_um": list(self.heights_um),
            "survival": methods,
            "max_deviation_from_tirf": deviation,
        }

    def markdown(self) -> str:
        """A table: one row per method and brightness, one column per height."""
        head = " | ".join(f"z={z:g} um" for z in self.heights_um)
        lines = [
            f"| method | filament | {head} | max dev. from TIRF |",
            "|---" * (len(self.heights_um) + 3) + "|",
        ]
        for method, levels in self.survival.items():
            dev = "" if method == "tirf" else f"{self.deviation_from(method):.2f}"
            for level, values in levels.items():
                cells = " | ".join(f"{v:.3f}" for v in values)
                lines.append(f"| {method} | {level} | {cells} | {dev} |")
        return "\n".join(lines)


@dataclass
class SectioningSpecimen:
    """The test field before imaging: the microscope and its volume with/without filaments."""

    scope: Any  # a SimulatedMicroscope on the field, drift-free, `FIELD_PX` ROI
    lines: np.ndarray  # (planes, side, side) specimen with the test filaments
    base: np.ndarray  # the same specimen without them
    rows: dict[tuple[str, float], int]
    columns: tuple[int, int]


def scene_specimen(
    objective: str = "60X",
    seed: int = 11,
    exposure_ms: float = 50.0,
    heights_um: Sequence[float] = HEIGHTS_UM,
) -> SectioningSpecimen:
    """Lay the test filaments into the dense F-actin cell of slide `seed` (not yet imaged)."""
    from ctirf_live.sim.sample import SpecimenRenderer, cell_at
    from ctirf_live.sim.scope import PSF_MARGIN_UM, SAMPLE_PLANES_UM, SimulatedMicroscope

    missing = [z for z in heights_um if not np.any(np.isclose(SAMPLE_PLANES_UM, z))]
    if missing:
        raise ValueError(f"heights {missing} are not simulator planes; use {HEIGHTS_UM}")
    scope = SimulatedMicroscope(seed=seed, drift_px=0.0, family="factin")
    scope.objective = objective
    scope.centre_roi(FIELD_PX)
    scope.exposure_ms = float(exposure_ms)
    p = scope.optics.pixel_size_um
    side = FIELD_PX + 2 * int(np.ceil(PSF_MARGIN_UM / p)) + 2
    cell = cell_at(seed, 0, 0, "factin")
    centre = (cell.cx, cell.cy)
    base = SpecimenRenderer(seed, centre, (side, side), p, SAMPLE_PLANES_UM, "factin").render(
        lateral_profile=False
    )
    lines = base.copy()
    off = (side - FIELD_PX) // 2
    c0, c1 = _LINE_MARGIN_PX, FIELD_PX - _LINE_MARGIN_PX
    rows: dict[tuple[str, float], int] = {}
    row = _LINE_SPACING_PX // 2 + 8
    for level, amount in BRIGHTNESS.items():
        for z in heights_um:
            k = int(np.argmin(np.abs(SAMPLE_PLANES_UM - z)))
            lines[k, off + row, off + c0 : off + c1] += np.float32(amount * p)
            rows[(level, float(z))] = row
            row += _LINE_SPACING_PX
    if row - _LINE_SPACING_PX + 8 >= FIELD_PX:
        raise ValueError("the test filaments do not fit in the field")
    return SectioningSpecimen(scope, lines, base, rows, (c0, c1))


def build_scene(
    objective: str = "60X",
    seed: int = 11,
    exposure_ms: float = 50.0,
    heights_um: Sequence[float] = HEIGHTS_UM,
) -> SectioningScene:
    """Lay the test filaments into a dense F-actin cell and image it (EPI and TIRF)."""
    from ctirf_live.sim.scope import SAMPLE_PLANES_UM

    spec = scene_specimen(objective, seed, exposure_ms, heights_um)
    scope = spec.scope
    refs: dict[str, list[np.ndarray]] = {"tirf": [], "epi_noise_free": []}
    frames = []
    for vol in (spec.lines, spec.base):
        scope.set_specimen_override(vol, SAMPLE_PLANES_UM)
        scope.frames_rendered = 0
        scope.set_illumination("EPI")
        frames.append(scope.snap().astype(np.float32))
        refs["epi_noise_free"].append(scope.noise_free("EPI", camera_units=True))
        refs["tirf"].append(scope.ground_truth_tirf(camera_units=True).astype(np.float32))
    return SectioningScene(
        epi=frames[0],
        epi_without=frames[1],
        references={k: (v[0], v[1]) for k, v in refs.items()},
        rows=spec.rows,
        columns=spec.columns,
        pixel_size_um=scope.optics.pixel_size_um,
        optics=scope.optics,
    )


def filament_profiles(
    with_lines: np.ndarray,
    without: np.ndarray,
    scene: SectioningScene,
    half_px: int = _PROFILE_HALF_PX,
) -> dict[tuple[str, float], np.ndarray]:
    """Each filament's added cross-section (rows within `half_px`), averaged along it."""
    diff = np.asarray(with_lines, np.float64) - np.asarray(without, np.float64)
    c0, c1 = scene.columns
    return {
        key: diff[row - half_px : row + half_px + 1, c0 + 8 : c1 - 8].mean(axis=1)
        for key, row in scene.rows.items()
    }


def filament_peaks(
    with_lines: np.ndarray, without: np.ndarray, scene: SectioningScene
) -> dict[tuple[str, float], float]:
    """Each filament's added cross-section peak, averaged along its length."""
    profiles = filament_profiles(with_lines, without, scene)
    return {key: float(profile.max()) for key, profile in profiles.items()}


def survival(
    peaks: Mapping[tuple[str, float], float], heights_um: Sequence[float]
) -> dict[str, list[float]]:
    """Peaks relative to the same brightness's filament on the coverslip."""
    out = {}
    for level in BRIGHTNESS:
        ground = peaks[(level, float(heights_um[0]))]
        out[level] = [
            float(peaks[(level, float(z))] / ground) if ground > 0 else float("nan")
            for z in heights_um
        ]
    return out


def run_sectioning(
    methods: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    scene: SectioningScene | None = None,
    heights_um: Sequence[float] = HEIGHTS_UM,
) -> SectioningResult:
    """Survival table for TIRF, raw EPI and each method (a function of the noisy EPI)."""
    scene = scene or build_scene(heights_um=heights_um)
    result = SectioningResult(tuple(float(z) for z in heights_um))
    for name, (a, b) in scene.references.items():
        result.survival[name] = survival(filament_peaks(a, b, scene), heights_um)
    result.survival["epi"] = survival(
        filament_peaks(scene.epi, scene.epi_without, scene), heights_um
    )
    for name, fn in methods.items():
        out_with, out_without = fn(scene.epi), fn(scene.epi_without)
        result.survival[name] = survival(filament_peaks(out_with, out_without, scene), heights_um)
    return result


def sectioning_methods(restorer: Any, baselines: Sequence[str] = ()) -> dict[str, Callable]:
    """cTIRF through `restorer` and the named classical baselines, as sectioning methods."""
    from ctirf_live.evaluation.baselines import BASELINES
    from ctirf_live.evaluation.report import baseline_parameters

    params = baseline_parameters(restorer.optics, list(baselines))
    methods: dict[str, Callable] = {
        name: (lambda img, _n=name, _k=kw: BASELINES[_n](img, **_k)) for name, kw in params.items()
    }
    methods["ctirf"] = restorer.restore
    return methods


def evaluate_sectioning(
    restorer: Any, baselines: Sequence[str] = (), seed: int = 11
) -> SectioningResult:
    """The survival table of cTIRF (and baselines) on the model's simulated objective."""
    from ctirf_live.sim.scope import DEFAULT_OBJECTIVES

    objective = restorer.optics.objective
    if objective not in DEFAULT_OBJECTIVES:
        objective = "60X"
    scene = build_scene(objective=objective, seed=seed)
    return run_sectioning(sectioning_methods(restorer, baselines), scene)
