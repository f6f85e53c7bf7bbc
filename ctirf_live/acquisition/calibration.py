"""Paired EPI/TIRF calibration acquisition: the ~20 pairs a new rig needs for fine-tuning.

`calibrate` plans candidate stage positions, builds a useq `MDASequence` (positions x
channels `Illumination: EPI, TIRF`, EPI and TIRF back to back at each position, same
focus) and runs it through the pymmcore-plus MDA runner as ONE acquisition whose events
are handed over a position at a time (an open-ended event iterator, the runner's
event-driven mode). Each pair is registered (`registration.register`), passed through
the quality gate (`assess_pair`) and written atomically as it arrives; the next position
is only queued while more pairs are still needed (one position ahead, so acquisition
overlaps registration), so the run stops exactly at the requested count and a rejected
field is simply replaced by the next candidate. Tries are bounded (3 x pairs + 10).

Resume: the dataset folder (`PairedDataset.create` reopens it) records in its manifest
the plan's origin, every used position and every rejected one; a rerun plans the same
positions again, skips those, and only collects what is missing. Ctrl-C or an error
cancels the MDA cleanly; completed pairs and the manifest stay valid.

Frames are collected through a handler on a relay thread (`acquisition.mda`), never a
direct `frameReady` slot, so the acquisition thread is not slowed and no Qt event loop
is needed. The shutter is kept open from EPI to TIRF at each position (useq
`keep_shutter_open_across=("c",)`): one opening per field, closed for stage moves.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import useq
import yaml
from pymmcore_plus import CMMCorePlus
from scipy import ndimage

from ctirf_live.acquisition.core import RigInfo, active_optics, current_objective, set_objective
from ctirf_live.acquisition.mda import run_mda
from ctirf_live.acquisition.registration import (
    DEFAULT_MAX_SHIFT_PX,
    Registration,
    noise_variance,
    register,
)
from ctirf_live.config import (
    EPI_PRESET,
    ILLUMINATION_GROUP,
    TIRF_PRESET,
    ConfigError,
    Optics,
)
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.folderlock import FolderLock, FolderLockedError

GRID = "grid"
RANDOM = "random"
FOV_MARGIN = 0.2  # spacing = FOV * (1 + margin): neighbouring fields never overlap
MIN_STRUCTURE = 5.0  # TIRF signal variance at the PSF scale, in noise variances
MIN_COVERAGE = 0.08  # fraction of the field with TIRF signal
MIN_FOCUS = 0.5  # TIRF fine/coarse band variance ratio (in focus ~1.2-1.5)
FRAME_GRACE_S = 2.0  # wait for a position's frames this long after the runner moved on
MAX_MISSING_IN_A_ROW = 3  # positions without frames before the camera is declared broken
BYTES_OVERHEAD = 64 * 1024  # OME-XML and TIFF tags per pair file
STACK_KEY = "stack:"  # frames of the optional EPI z-stack are keyed "stack:0", "stack:1", ...
SIM_SLIDE_HALF_WIDTH_UM = 30_000.0  # simulated stage: +-30 mm (cells within 25 mm of the centre)

Bounds = tuple[float, float, float, float]  # xmin, xmax, ymin, ymax (um)
ProgressCallback = Callable[["CalibrationStatus"], None]


class CalibrationError(ValueError):
    """A calibration run that cannot start or finish; pairs already written are kept."""


# -- positions --------------------------------------------------------------------------


def stage_bounds(core: CMMCorePlus) -> Bounds | None:
    """Travel range of the XY stage when it is known (the simulated slide), else None.

    Micro-Manager has no standard query for stage limits, so real rigs return None and
    positions are not range-checked (the stage adapter refuses impossible moves).
    """
    xy = core.getXYStageDevice()
    if not xy:
        return None
    try:
        library = core.getDeviceLibrary(xy)
    except Exception:  # some adapters do not report a library
        return None
    if library != "ctirf_live.sim.devices":
        return None
    half = SIM_SLIDE_HALF_WIDTH_UM
    return (-half, half, -half, half)


def load_positions(path: str | Path) -> list[useq.Position]:
    """Positions from a useq/pymmcore-widgets file (YAML or JSON).

    Accepts a saved `MDASequence` (its `stage_positions`) or a bare list of positions
    (`{x, y, z, name}` mappings), the two forms the pymmcore-widgets MDA and stage
    position widgets save. Sub-sequences (grids per position) are ignored: each
    calibration field is one position.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"positions file not found: {path}; pass grid, random or a YAML/JSON file"
        )
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"positions file {path} is not valid YAML/JSON: {exc}") from None
    if isinstance(raw, dict) and "stage_positions" in raw:
        raw = raw["stage_positions"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"positions file {path} holds no positions; save an MDA sequence with stage "
            "positions or a list of {x, y, z} entries"
        )
    out = []
    for i, item in enumerate(raw):
        try:
            if isinstance(item, (list, tuple)):
                item = dict(zip(("x", "y", "z"), item, strict=False))
            pos = useq.Position.model_validate(item)
        except Exception as exc:
            raise ConfigError(f"{path}: position {i} is invalid: {_one_line(exc)}") from None
        if pos.x is None or pos.y is None:
            raise ConfigError(f"{path}: position {i} has no x/y; calibration needs both")
        out.append(useq.Position(x=pos.x, y=pos.y, z=pos.z, name=pos.name or f"file_{i:03d}"))
    return out


def plan_positions(
    kind: str | Path,
    n: int,
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    fov_um: tuple[float, float] = (50.0, 50.0),
    margin: float = FOV_MARGIN,
    region: Bounds | None = None,
    bounds: Bounds | None = None,
    seed: int = 0,
    exclude: Sequence[tuple[float, float]] = (),
) -> list[useq.Position]:
    """Up to `n` candidate positions: a grid, seeded random fields, or a file's list.

    `grid`: lattice nodes one field of view plus `margin` apart, in a square spiral
    outward from `origin` (the same nodes in the same order whatever `n`, which makes
    resuming deterministic); `random`: seeded dart throwing in `region` (default a square
    around `origin` big enough for 4 n fields) with no two fields overlapping. Positions
    within one field spacing of `exclude` (already used or rejected) are skipped, and
    every position is checked against the stage `bounds` before anything moves.
    """
    if n < 1:
        raise ConfigError("the number of positions must be at least 1")
    spacing = max(fov_um) * (1.0 + margin)
    if isinstance(kind, Path) or kind not in (GRID, RANDOM):
        positions = [
            p for p in load_positions(kind) if not _near((p.x, p.y), exclude, spacing / 2)
        ][:n]
    elif kind == GRID:
        positions = _grid(n, origin, spacing, region, exclude)
    else:
        positions = _random(n, origin, spacing, region, seed, exclude)
    check_bounds(positions, bounds)
    return positions


def _grid(
    n: int,
    origin: tuple[float, float],
    spacing: float,
    region: Bounds | None,
    exclude: Sequence[tuple[float, float]],
) -> list[useq.Position]:
    out: list[useq.Position] = []
    max_nodes = 16 * (n + len(exclude)) + 64  # bounds the walk when `region` is small
    for k, (i, j) in enumerate(_spiral()):
        if len(out) >= n or k >= max_nodes:
            break
        x, y = round(origin[0] + j * spacing, 3), round(origin[1] + i * spacing, 3)
        if region and not _inside((x, y), region):
            continue
        if _near((x, y), exclude, spacing / 2):
            continue
        out.append(useq.Position(x=x, y=y, name=f"grid_{i:+d}_{j:+d}"))
    return out


def _spiral() -> Iterator[tuple[int, int]]:
    """(row, col) lattice offsets in a square spiral from (0, 0)."""
    yield (0, 0)
    ring = 1
    while True:
        i, j = -ring, -ring
        for di, dj, steps in (
            (0, 1, 2 * ring),
            (1, 0, 2 * ring),
            (0, -1, 2 * ring),
            (-1, 0, 2 * ring),
        ):
            for _ in range(steps):
                yield (i, j)
                i, j = i + di, j + dj
        ring += 1


def _random(
    n: int,
    origin: tuple[float, float],
    spacing: float,
    region: Bounds | None,
    seed: int,
    exclude: Sequence[tuple[float, float]],
) -> list[useq.Position]:
    if region is None:
        half = spacing * math.ceil(math.sqrt(4 * (n + len(exclude)))) / 2
        region = (origin[0] - half, origin[0] + half, origin[1] - half, origin[1] + half)
    rng = np.random.default_rng(seed)
    taken = list(exclude)
    out: list[useq.Position] = []
    for _ in range(200 * n):
        if len(out) >= n:
            break
        x = float(rng.uniform(region[0], region[1]))
        y = float(rng.uniform(region[2], region[3]))
        if _near((x, y), taken, spacing):
            continue
        taken.append((x, y))
        out.append(useq.Position(x=round(x, 3), y=round(y, 3), name=f"random_{len(out):03d}"))
    return out


def check_bounds(positions: Sequence[useq.Position], bounds: Bounds | None) -> None:
    """Raise ConfigError naming the first position outside the stage's travel range."""
    if bounds is None:
        return
    for pos in positions:
        if not _inside((pos.x or 0.0, pos.y or 0.0), bounds):
            raise ConfigError(
                f"position {pos.name or ''} (x={pos.x:g}, y={pos.y:g} um) is outside the stage "
                f"range x {bounds[0]:g}..{bounds[1]:g}, y {bounds[2]:g}..{bounds[3]:g} um; "
                "move the stage toward the slide centre or choose other --positions"
            )


def _inside(xy: tuple[float, float], box: Bounds) -> bool:
    return box[0] <= xy[0] <= box[1] and box[2] <= xy[1] <= box[3]


def _near(xy: tuple[float, float], others: Sequence[tuple[float, float]], distance: float) -> bool:
    return any(math.hypot(xy[0] - ox, xy[1] - oy) < distance for ox, oy in others)


# -- sequence -----------------------------------------------------------------------------


def build_sequence(
    positions: Sequence[useq.Position],
    exposure_ms: float | None = None,
    z_offset_um: float = 0.0,
) -> useq.MDASequence:
    """Stage positions x channels (EPI, TIRF), EPI then TIRF at each position, same focus.

    The shutter stays open from EPI to TIRF at a position (one opening per field, the
    two frames back to back) and closes for the stage move.

    `z_offset_um` is added to every position's z (positions without z keep the focus
    where it is). `exposure_ms=None` keeps the camera's current exposure.
    """
    if exposure_ms is not None and exposure_ms <= 0:
        raise ConfigError("exposure must be positive (ms)")
    stage = [
        p.model_copy(update={"z": None if p.z is None else p.z + z_offset_um}) for p in positions
    ]
    channels = [
        useq.Channel(config=preset, group=ILLUMINATION_GROUP, exposure=exposure_ms)
        for preset in (EPI_PRESET, TIRF_PRESET)
    ]
    return useq.MDASequence(
        stage_positions=stage,
        channels=channels,
        axis_order="pc",
        keep_shutter_open_across=("c",),
        metadata={"ctirf": {"kind": "calibration"}},
    )


# -- quality gate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Quality:
    """Verdict of the quality gate for one pair, with the TIRF measures it used."""

    score: float
    ok: bool
    reason: str = ""
    detail: str = ""
    structure: float = 0.0
    focus: float = 0.0
    coverage: float = 0.0


def assess_pair(
    epi: np.ndarray,
    tirf: np.ndarray,
    registration: Registration | None = None,
    *,
    force: bool = False,
    psf_sigma_px: float = 1.0,
    min_structure: float = MIN_STRUCTURE,
    min_coverage: float = MIN_COVERAGE,
    min_focus: float = MIN_FOCUS,
) -> Quality:
    """Accept or reject a pair: blank TIRF field, TIRF out of focus, or too large a shift.

    Measured on TIRF (it only shows the in-focus bottom layer), in bands scaled by the
    PSF width `psf_sigma_px`, noise-corrected (noise variance from neighbour differences):

    - `structure` (the score: the paper's variance analysis made noise-aware): signal
      variance at 2-4 PSF widths in units of the noise variance there. ~0 on an empty
      field whatever the gain or offset; blind to the illumination profile and haze.
    - `coverage`: fraction of the field more than 5 noise SDs above the background
      (the dimmest 2 %); a field with a cell corner in one edge trains and registers badly.
    - `focus`: signal variance at 2-4 PSF widths over that at 4-8: ~1.2-1.5 in focus,
      below 0.4 at 1 um defocus (measured on the simulated rig).

    A registration flagged for a shift over the limit rejects the pair unless `force`.
    """
    tirf = np.asarray(tirf, dtype=np.float32)
    if np.shape(epi) != tirf.shape:
        raise ValueError(f"EPI {np.shape(epi)} and TIRF {tirf.shape} differ in shape")
    structure, focus, coverage = tirf_measures(tirf, psf_sigma_px)
    measures = {"structure": structure, "focus": focus, "coverage": coverage}
    score = round(structure, 3)
    if structure < min_structure:
        detail = f"TIRF structure {structure:.1f} < {min_structure:g}"
        return Quality(score, False, "blank", detail, **measures)
    if coverage < min_coverage:
        detail = f"TIRF signal covers {coverage:.1%} < {min_coverage:.0%} of the field"
        return Quality(score, False, "blank", detail, **measures)
    if focus < min_focus:
        detail = f"TIRF focus {focus:.2f} < {min_focus:g}"
        return Quality(score, False, "out_of_focus", detail, **measures)
    if registration is not None and registration.flagged and not force:
        detail = f"EPI/TIRF shift {registration.magnitude:.2f} px over the limit"
        return Quality(score, False, "shift", detail, **measures)
    return Quality(score, True, "", "", **measures)


def tirf_measures(image: np.ndarray, psf_sigma_px: float = 1.0) -> tuple[float, float, float]:
    """(structure, focus, coverage) of one frame; see `assess_pair`."""
    image = np.asarray(image, dtype=np.float32)
    s = max(float(psf_sigma_px), 0.5)
    noise_var = max(noise_variance(image), 1e-6)
    g1, g2, g4, g8 = (ndimage.gaussian_filter(image, k * s) for k in (1, 2, 4, 8))
    mid = float(np.var(g2 - g4)) - noise_var * _gain(2 * s, 4 * s)
    low = float(np.var(g4 - g8)) - noise_var * _gain(4 * s, 8 * s)
    structure = max(mid, 0.0) / (noise_var * _gain(2 * s, 4 * s))
    focus = max(mid, 0.0) / low if low > 0 else 0.0
    background = float(np.percentile(g1, 2))
    level = background + 5.0 * math.sqrt(noise_var * _gain(s, None))
    coverage = float(np.mean(g1 > level))
    return float(structure), float(focus), coverage


@functools.lru_cache(maxsize=64)
def _gain(sigma_a: float, sigma_b: float | None) -> float:
    """Variance gain of G(a) - G(b) (or G(a) alone for b=None) on unit white noise."""
    size = int(8 * max(sigma_a, sigma_b or 0.0)) | 1
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    kernel = ndimage.gaussian_filter(delta, sigma_a, mode="constant")
    if sigma_b is not None:
        kernel = kernel - ndimage.gaussian_filter(delta, sigma_b, mode="constant")
    return float(np.sum(kernel**2))


# -- plan -------------------------------------------------------------------------------------


@dataclass
class CalibrationPlan:
    """What a calibration run will do; `calibrate(dry_run=True)` returns it unexecuted."""

    sequence: useq.MDASequence
    out: Path
    optics: Optics
    requested: int
    existing: int
    skipped: int
    exposure_ms: float
    origin_um: tuple[float, float, float | None]
    frame_shape: tuple[int, int]
    bounds: Bounds | None = None
    notes: tuple[str, ...] = ()  # repairs made when the existing folder was opened
    stack_planes: int = 0  # with --stacks: EPI planes recorded upward from each pair's focus
    stack_step_um: float = 0.2

    @property
    def needed(self) -> int:
        return max(0, self.requested - self.existing)

    @property
    def positions(self) -> list[useq.Position]:
        return list(self.sequence.stage_positions)

    @property
    def max_frames(self) -> int:
        return (2 + self.stack_planes) * len(self.sequence.stage_positions)

    def events_by_position(self) -> list[list[useq.MDAEvent]]:
        """Each position's events: EPI, TIRF, then the EPI z-stack when one is planned."""
        return _events_by_position(self.sequence, self.stack_planes, self.stack_step_um)

    def describe(self) -> str:
        """Human-readable plan (what `--dry-run` prints)."""
        skipped = f", {self.skipped} used or rejected before" if self.skipped else ""
        h, w = self.frame_shape
        lines = [
            f"output: {self.out} ({self.existing} pairs there, {self.needed} to collect "
            f"of {self.requested})",
            f"optics: {self.optics.describe()}",
            f"channels: {ILLUMINATION_GROUP} {EPI_PRESET} then {TIRF_PRESET} at each "
            f"position, exposure {self.exposure_ms:g} ms, frames {w}x{h}",
            *(
                [
                    f"stacks: {self.stack_planes} {EPI_PRESET} planes {self.stack_step_um:g} um "
                    "apart, upward from each pair's focus (for ctirf distill --stacks)"
                ]
                if self.stack_planes
                else []
            ),
            f"candidate positions: {len(self.positions)} (stops after {self.needed} good "
            f"pairs; at most {self.max_frames} frames{skipped})",
        ]
        for p in self.positions:
            z = "" if p.z is None else f", z={p.z:.3f}"
            lines.append(f"  {p.name}: x={p.x:.2f}, y={p.y:.2f}{z} um")
        return "\n".join(lines)


def max_tries(pairs: int) -> int:
    """Upper bound on positions tried for `pairs` good pairs."""
    return 3 * pairs + 10


def plan_calibration(
    core: CMMCorePlus,
    rig: RigInfo,
    out: str | Path,
    pairs: int = 20,
    objective: str | None = None,
    positions: str | Path = GRID,
    exposure_ms: float | None = None,
    z_offset_um: float = 0.0,
    seed: int = 0,
    bounds: Bounds | Literal["auto"] | None = "auto",
    stack_planes: int = 0,
    stack_step_um: float = 0.2,
) -> CalibrationPlan:
    """Plan a run without moving anything or writing anything."""
    if pairs < 1:
        raise ConfigError("--pairs must be at least 1")
    if stack_planes == 1 or stack_planes < 0:
        raise ConfigError("--planes must be at least 2 (the paper's ET3dNet uses 6)")
    if stack_planes and not stack_step_um > 0:
        raise ConfigError("--z-step must be positive (um)")
    if stack_planes and not core.getFocusDevice():
        raise CalibrationError(
            "--stacks needs a focus drive, and this configuration has none; "
            "set Core-Focus in the config or calibrate without --stacks"
        )
    if exposure_ms is not None and exposure_ms <= 0:
        raise ConfigError("exposure must be positive (ms)")
    if core.mda.is_running():
        raise CalibrationError("an acquisition is already running on this core; stop it first")
    objective = objective or current_objective(core, rig)
    optics = _planned_optics(core, rig, objective)
    out = Path(out)
    existing, used, calib, notes = _existing(out, optics)
    origin = _origin(core, calib)
    h, w = core.getImageHeight(), core.getImageWidth()
    fov = (w * optics.pixel_size_um, h * optics.pixel_size_um)
    if bounds == "auto":
        bounds = stage_bounds(core)
    kind: str | Path = positions
    if isinstance(positions, str) and positions not in (GRID, RANDOM):
        kind = Path(positions)
    needed = max(0, pairs - len(existing))
    candidates = (
        plan_positions(
            kind,
            max_tries(needed),
            origin=origin[:2],
            fov_um=fov,
            bounds=bounds,
            seed=seed,
            exclude=used,
        )
        if needed
        else []
    )
    if needed and not candidates:
        raise CalibrationError(
            f"no unused positions left in {kind}; {len(existing)} pairs are in {out}"
        )
    z = origin[2]
    candidates = [
        p if p.z is not None or z is None else p.model_copy(update={"z": z}) for p in candidates
    ]
    exposure = float(exposure_ms) if exposure_ms is not None else float(core.getExposure())
    return CalibrationPlan(
        sequence=build_sequence(candidates, exposure_ms, z_offset_um),
        out=out,
        optics=optics,
        requested=pairs,
        existing=len(existing),
        skipped=len(used),
        exposure_ms=exposure,
        origin_um=origin,
        frame_shape=(h, w),
        bounds=bounds,
        notes=notes,
        stack_planes=stack_planes,
        stack_step_um=float(stack_step_um),
    )


def _planned_optics(core: CMMCorePlus, rig: RigInfo, objective: str) -> Optics:
    """Optics of `objective` without switching to it (pixel size scaled by binning)."""
    optics = rig.optics_for(objective)
    if not rig.objective_presets or objective == current_objective(core, rig):
        return active_optics(core, rig, objective)
    return optics.model_copy(update={"pixel_size_um": optics.pixel_size_um * _binning(core)})


def _binning(core: CMMCorePlus) -> int:
    cam = core.getCameraDevice()
    try:
        return int(str(core.getProperty(cam, "Binning")).split("x")[0]) if cam else 1
    except (ValueError, RuntimeError):
        return 1


def _existing(
    out: Path, optics: Optics
) -> tuple[list[Any], list[tuple[float, float]], dict, tuple[str, ...]]:
    """Pairs, used/rejected positions, the calibration record and the repair notes of an
    existing folder."""
    if not (out / "manifest.json").is_file():
        return [], [], {}, ()
    ds = PairedDataset.open(out)
    ds.check_optics(optics)
    calib = dict(ds.manifest.get("calibration") or {})
    used = [(p.position.get("x", 0.0), p.position.get("y", 0.0)) for p in ds.pairs]
    used += [
        (float(r["position"].get("x", 0.0)), float(r["position"].get("y", 0.0)))
        for r in calib.get("rejected", [])
        if r.get("position")
    ]
    return list(ds.pairs), used, calib, tuple(ds.notes)


def _origin(core: CMMCorePlus, calib: dict) -> tuple[float, float, float | None]:
    """Where the plan is anchored: the first run's origin when resuming, else the stage."""
    if calib.get("origin_um"):
        x, y, z = [*calib["origin_um"], None, None, None][:3]
        return (float(x), float(y), None if z is None else float(z))
    x, y = core.getXYPosition() if core.getXYStageDevice() else (0.0, 0.0)
    z = float(core.getPosition()) if core.getFocusDevice() else None
    return (float(x), float(y), z)


# -- run --------------------------------------------------------------------------------------


@dataclass
class CalibrationStatus:
    """Progress of a run, passed to the `progress` callback after every position."""

    done: int
    requested: int
    rejected: int
    tries: int
    max_tries: int
    last: str = ""
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


@overload
def calibrate(
    core: CMMCorePlus,
    rig: RigInfo,
    out: str | Path,
    pairs: int = ...,
    objective: str | None = ...,
    positions: str | Path = ...,
    exposure_ms: float | None = ...,
    z_offset_um: float = ...,
    max_shift_px: float = ...,
    force: bool = ...,
    seed: int = ...,
    dry_run: Literal[False] = ...,
    progress: Any = ...,
    bounds: Any = ...,
    stack_planes: int = ...,
    stack_step_um: float = ...,
) -> PairedDataset: ...
@overload
def calibrate(
    core: CMMCorePlus,
    rig: RigInfo,
    out: str | Path,
    pairs: int = ...,
    objective: str | None = ...,
    positions: str | Path = ...,
    exposure_ms: float | None = ...,
    z_offset_um: float = ...,
    max_shift_px: float = ...,
    force: bool = ...,
    seed: int = ...,
    dry_run: Literal[True] = ...,
    progress: Any = ...,
    bounds: Any = ...,
    stack_planes: int = ...,
    stack_step_um: float = ...,
) -> CalibrationPlan: ...


def calibrate(
    core: CMMCorePlus,
    rig: RigInfo,
    out: str | Path,
    pairs: int = 20,
    objective: str | None = None,
    positions: str | Path = GRID,
    exposure_ms: float | None = None,
    z_offset_um: float = 0.0,
    max_shift_px: float = DEFAULT_MAX_SHIFT_PX,
    force: bool = False,
    seed: int = 0,
    dry_run: bool = False,
    progress: ProgressCallback | Any | None = None,
    bounds: Bounds | Literal["auto"] | None = "auto",
    stack_planes: int = 0,
    stack_step_um: float = 0.2,
) -> PairedDataset | CalibrationPlan:
    """Collect `pairs` registered, quality-checked EPI/TIRF pairs into the folder `out`.

    Resumes a folder that already holds pairs (only the missing ones are collected, on
    positions not used before). `positions`: "grid", "random" or a useq YAML/JSON file.
    `progress`: a callable receiving `CalibrationStatus`, or a rich `Progress`.
    `dry_run` returns the `CalibrationPlan` without moving or writing anything.
    `stack_planes` > 0 also records, at each field, an EPI z-stack of that many planes
    `stack_step_um` apart upward from the pair's focus, saved beside the pair (the
    distillation data of ET3dNet, `ctirf distill --stacks DATASET`).
    Raises `CalibrationError` when the slide yields too few good fields within the bounded
    tries, or when the run stops on an error; pairs written so far stay valid.
    One run writes into a folder at a time (`FolderLockedError` names the other one); the
    returned dataset's `notes` say what was repaired (a killed run, a stale lock).
    """
    args = (core, rig, out, pairs, objective, positions, exposure_ms, z_offset_um, seed, bounds)
    stack = {"stack_planes": stack_planes, "stack_step_um": stack_step_um}
    out = Path(out)
    if dry_run or not out.is_dir():
        plan = plan_calibration(*args, **stack)  # checks the arguments before a folder is made
        if dry_run:
            return plan
    lock = _lock(out)
    try:
        return _calibrate_locked(
            core,
            rig,
            plan_calibration(*args, **stack),
            lock,
            objective,
            max_shift_px,
            force,
            progress,
            str(positions),
            seed,
        )
    finally:
        lock.release()


def _lock(out: Path) -> FolderLock:
    if out.exists() and not out.is_dir():
        raise CalibrationError(f"--out {out} is a file; give a folder for the dataset")
    try:
        return FolderLock(out, command="ctirf calibrate").acquire()
    except FolderLockedError as exc:
        raise CalibrationError(str(exc)) from None
    except OSError as exc:
        raise CalibrationError(
            f"cannot write to {out}: {exc.strerror or exc}; choose another --out"
        ) from None


def _calibrate_locked(
    core: CMMCorePlus,
    rig: RigInfo,
    plan: CalibrationPlan,
    lock: FolderLock,
    objective: str | None,
    max_shift_px: float,
    force: bool,
    progress: ProgressCallback | Any | None,
    positions: str,
    seed: int,
) -> PairedDataset:
    _check_writable(plan, core)
    try:
        ds = PairedDataset.create(plan.out, plan.optics)
    except OSError as exc:
        raise CalibrationError(f"cannot write to {plan.out}: {exc.strerror or exc}") from None
    ds.notes[:0] = [*([lock.note] if lock.note else []), *plan.notes]
    if plan.needed == 0:
        return ds
    objective = objective or current_objective(core, rig)
    optics = set_objective(core, rig, objective)
    ds.check_optics(optics)
    session = _Session(
        ds,
        plan,
        max_shift_px,
        force,
        _progress_callback(progress),
        psf_sigma_px=_psf_sigma_px(optics),
        positions=positions,
        seed=seed,
    )
    session.run(core)
    return ds


def _psf_sigma_px(optics: Optics) -> float:
    """Gaussian sigma of the in-focus PSF in pixels (0.21 lambda / NA)."""
    return 0.21 * optics.wavelength_um / optics.na / optics.pixel_size_um


def _check_writable(plan: CalibrationPlan, core: CMMCorePlus) -> None:
    """Fail before anything moves when `out` is unwritable or the disk cannot hold the run."""
    folder = plan.out
    if folder.exists() and not folder.is_dir():
        raise CalibrationError(f"--out {folder} is a file; give a folder for the dataset")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ctirf_write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise CalibrationError(
            f"cannot write to {folder}: {exc.strerror or exc}; choose another --out"
        ) from None
    per_pair = 2 * plan.frame_shape[0] * plan.frame_shape[1] * max(1, core.getBytesPerPixel())
    need = plan.needed * (per_pair + BYTES_OVERHEAD) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CalibrationError(
            f"not enough disk space in {folder}: {free / 1e6:.1f} MB free, "
            f"{need / 1e6:.1f} MB needed for {plan.needed} pairs; free space or choose "
            "another --out"
        )


def _progress_callback(progress: Any) -> ProgressCallback | None:
    """Accept a callable or a rich Progress (a task is added and kept up to date)."""
    if progress is None or not hasattr(progress, "add_task"):
        return progress
    task = None

    def update(status: CalibrationStatus) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task("pairs", total=status.requested, rejected=0)
        progress.update(
            task, completed=status.done, total=status.requested, rejected=status.rejected
        )

    return update


_STOP = object()


class _Feed:
    """Open-ended event iterator for the MDA runner, fed one position at a time.

    Records when the runner has executed every event of a position (it asks for the
    next event only after the previous one ran), so a position whose frames never arrive
    (the engine logs and skips a failed snap) is noticed instead of awaited forever.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._expected: Counter[int] = Counter()
        self._yielded: Counter[int] = Counter()
        self._current = -1
        self.passed: dict[int, float] = {}

    def put(self, events: Sequence[useq.MDAEvent]) -> None:
        for event in events:
            self._expected[int(event.index.get("p", 0))] += 1
            self._queue.put(event)

    def close(self) -> None:
        self._queue.put(_STOP)

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> useq.MDAEvent:
        p = self._current
        if p >= 0 and self._yielded[p] >= self._expected[p]:
            self.passed.setdefault(p, time.monotonic())
        item = self._queue.get()
        if item is _STOP:
            raise StopIteration
        self._current = int(item.index.get("p", 0))
        self._yielded[self._current] += 1
        return item


class _Frames:
    """MDA handler: queues frames for the calibration loop (runs on the relay thread)."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[np.ndarray, useq.MDAEvent, dict]] = queue.Queue()

    def frameReady(self, img: np.ndarray, event: useq.MDAEvent, meta: dict) -> None:
        self.queue.put((img, event, meta))


class _AcquisitionFailed(RuntimeError):
    """The MDA runner stopped with an error."""


class _MDAThread:
    """One MDA run on a worker thread, fed a position at a time, frames collected by position.

    The runner gets an open-ended event iterator (`_Feed`); frames arrive through an
    output handler and are buffered by position index. `stop` ends the run (cancelling
    it when asked), waits for the runner, and restores the core's auto-shutter.
    """

    def __init__(self, core: CMMCorePlus) -> None:
        self.core = core
        self.feed = _Feed()
        self.frames = _Frames()
        self.buffer: dict[int, dict[str, tuple[np.ndarray, dict]]] = {}
        self.submitted = 0
        self.error: BaseException | None = None
        self._auto_shutter = core.getAutoShutter()
        self.worker = threading.Thread(target=self._run, name="ctirf-calibrate", daemon=True)
        self.worker.start()

    def _run(self) -> None:
        try:
            run_mda(self.core, self.feed, handlers=[self.frames])
        except BaseException as exc:  # re-raised on the calling thread by wait_position
            self.error = exc

    def submit_until(self, groups: Sequence[Sequence[useq.MDAEvent]], last: int) -> None:
        """Queue the events of every position up to index `last` not queued yet."""
        while self.submitted <= min(last, len(groups) - 1):
            self.feed.put(groups[self.submitted])
            self.submitted += 1

    def wait_position(self, index: int, expected: int = 2) -> dict[str, tuple[np.ndarray, dict]]:
        """Frames of position `index` by channel (z-stack planes as "stack:K"); fewer than
        `expected` when a snap failed."""
        while len(self.buffer.get(index, {})) < expected:
            try:
                img, event, meta = self.frames.queue.get(timeout=0.05)
            except queue.Empty:
                if self.error is not None:
                    raise _AcquisitionFailed(_one_line(self.error)) from self.error
                passed = self.feed.passed.get(index)
                done = not self.worker.is_alive() and self.frames.queue.empty()
                if done or (passed and time.monotonic() - passed > FRAME_GRACE_S):
                    break
                continue
            if event.channel is not None:
                slot = self.buffer.setdefault(int(event.index.get("p", -1)), {})
                key = event.channel.config
                if "z" in event.index:
                    key = f"{STACK_KEY}{int(event.index['z'])}"
                slot[key] = (np.asarray(img), dict(meta))
        return self.buffer.pop(index, {})

    def stop(self, cancel: bool) -> None:
        if cancel:
            self.core.mda.cancel()
        self.feed.close()
        self.worker.join(timeout=None if not cancel else 60)
        try:
            if self._auto_shutter and not self.core.getAutoShutter():
                self.core.setAutoShutter(True)
                if self.core.getShutterDevice():
                    self.core.setShutterOpen(False)
        except Exception:  # restoring state must not hide why the run stopped
            pass
        if self.error is not None and not cancel:
            raise _AcquisitionFailed(_one_line(self.error)) from self.error


class _Session:
    """One calibration run: drives the MDA thread, gates and writes pairs."""

    def __init__(
        self,
        ds: PairedDataset,
        plan: CalibrationPlan,
        max_shift_px: float,
        force: bool,
        progress: ProgressCallback | None,
        psf_sigma_px: float,
        positions: str,
        seed: int,
    ) -> None:
        self.ds = ds
        self.plan = plan
        self.max_shift_px = max_shift_px
        self.force = force
        self.progress = progress
        self.psf_sigma_px = psf_sigma_px
        self.record = ds.manifest.setdefault("calibration", {})
        self.record.setdefault("origin_um", list(plan.origin_um))
        self.record.setdefault("rejected", [])
        self.record.update(
            requested=plan.requested,
            positions=positions,
            seed=seed,
            exposure_ms=plan.exposure_ms,
            max_shift_px=max_shift_px,
            force=force,
        )
        self.run_info: dict[str, Any] = {
            "started": _now(),
            "tries": 0,
            "accepted": 0,
            "rejected": 0,
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        self.record.setdefault("runs", []).append(self.run_info)
        self.rejected = Counter(r.get("reason", "?") for r in self.record["rejected"])
        self.missing_in_a_row = 0

    def run(self, core: CMMCorePlus) -> None:
        """Acquire position after position until enough pairs; stop cleanly on any error."""
        groups = self.plan.events_by_position()
        self.ds.save_manifest()
        self._report("")
        mda = _MDAThread(core)
        try:
            for i in range(len(groups)):
                ahead = 1 if self.plan.requested - len(self.ds) > 1 else 0
                mda.submit_until(groups, i + ahead)
                self._process(i, mda.wait_position(i, len(groups[i])))
                if len(self.ds) >= self.plan.requested:
                    break
            mda.stop(cancel=False)  # nothing is queued beyond the last position processed
        except BaseException as exc:
            mda.stop(cancel=True)
            self._finish(
                "interrupted" if isinstance(exc, KeyboardInterrupt) else f"error: {_one_line(exc)}"
            )
            if isinstance(exc, OSError):
                raise CalibrationError(
                    f"stopped: cannot write to {self.ds.folder} ({exc.strerror or exc}); "
                    f"{len(self.ds)} pairs kept there, rerun to resume"
                ) from None
            if isinstance(exc, _AcquisitionFailed):
                raise CalibrationError(
                    f"acquisition stopped: {exc}; {len(self.ds)} pairs kept in "
                    f"{self.ds.folder}, rerun to resume"
                ) from None
            raise
        if len(self.ds) < self.plan.requested:
            self._finish("incomplete")
            raise CalibrationError(
                f"only {len(self.ds)} of {self.plan.requested} good pairs after "
                f"{self.run_info['tries']} positions (rejected: {_reasons(self.rejected)}); "
                "the slide has too few good fields here: try --positions random, another "
                f"region, or --force for large shifts. Pairs are kept in {self.ds.folder}"
            )
        self._finish("completed")

    # gate + write ----------------------------------------------------------------------------

    def _process(self, index: int, frames: dict[str, tuple[np.ndarray, dict]]) -> None:
        pos = self.plan.positions[index]
        position = {"x": float(pos.x or 0.0), "y": float(pos.y or 0.0)}
        if pos.z is not None:
            position["z"] = float(pos.z)
        self.run_info["tries"] += 1
        if EPI_PRESET not in frames or TIRF_PRESET not in frames:
            self._reject(pos, position, Quality(0.0, False, "no_image", "camera returned no frame"))
            self.missing_in_a_row += 1
            if self.missing_in_a_row >= MAX_MISSING_IN_A_ROW:
                raise _AcquisitionFailed(
                    f"the camera returned no image at {self.missing_in_a_row} positions in a "
                    "row (see the log); check the camera and illumination"
                )
            return
        self.missing_in_a_row = 0
        epi, epi_meta = frames[EPI_PRESET]
        tirf, tirf_meta = frames[TIRF_PRESET]
        reg = register(epi, tirf, max_shift_px=self.max_shift_px)
        quality = assess_pair(epi, tirf, reg, force=self.force, psf_sigma_px=self.psf_sigma_px)
        if not quality.ok:
            self._reject(pos, position, quality, reg)
            return
        self.run_info["accepted"] += 1  # counted in the manifest the pair is saved with
        stack, stack_info = self._stack(frames, pos)
        try:
            self.ds.add_pair(
                epi,
                tirf,
                position,
                reg.shift_px,
                quality.score,
                extra={
                    "position_name": pos.name,
                    "mi": round(reg.mi, 5),
                    "shift_flagged": reg.flagged,
                    "focus": round(quality.focus, 4),
                    "coverage": round(quality.coverage, 4),
                    "exposure_ms": self.plan.exposure_ms,
                    "frames": {
                        EPI_PRESET: _frame_info(epi_meta),
                        TIRF_PRESET: _frame_info(tirf_meta),
                    },
                },
                stack=stack,
                stack_info=stack_info,
            )
        except BaseException:
            self.run_info["accepted"] -= 1
            raise
        self._report(f"{pos.name}: ok, shift ({reg.shift_px[0]:+.2f}, {reg.shift_px[1]:+.2f}) px")

    def _stack(
        self, frames: dict[str, tuple[np.ndarray, dict]], pos: useq.Position
    ) -> tuple[np.ndarray | None, dict[str, Any] | None]:
        """The position's EPI z-stack (Z, Y, X) and what to record of it; (None, note)
        when planes are missing (the pair is kept, without a stack)."""
        planes = self.plan.stack_planes
        if not planes:
            return None, None
        got = [frames.get(f"{STACK_KEY}{k}") for k in range(planes)]
        info: dict[str, Any] = {
            "planes": planes,
            "z_step_um": self.plan.stack_step_um,
            "start_um": None if pos.z is None else float(pos.z),
            "direction": "up",
        }
        if any(g is None for g in got):
            missing = sum(g is None for g in got)
            return None, {**info, "missing": f"{missing} of {planes} planes not acquired"}
        return np.stack([g[0] for g in got if g is not None]), info

    def _reject(
        self,
        pos: useq.Position,
        position: dict[str, float],
        quality: Quality,
        reg: Registration | None = None,
    ) -> None:
        entry: dict[str, Any] = {
            "position": position,
            "position_name": pos.name,
            "reason": quality.reason,
            "detail": quality.detail,
            "quality": quality.score,
            "timestamp": _now(),
        }
        if reg is not None:
            entry["shift_px"] = list(reg.shift_px)
        self.record["rejected"].append(entry)
        self.rejected[quality.reason] += 1
        self.run_info["rejected"] += 1
        self.ds.save_manifest()
        self._report(f"{pos.name}: rejected ({quality.detail})")

    def _report(self, last: str) -> None:
        if self.progress is None:
            return
        self.progress(
            CalibrationStatus(
                done=len(self.ds),
                requested=self.plan.requested,
                rejected=sum(self.rejected.values()),
                tries=self.run_info["tries"],
                max_tries=len(self.plan.positions),
                last=last,
                rejected_by_reason=dict(self.rejected),
            )
        )

    def _finish(self, status: str) -> None:
        self.run_info.update(status=status, finished=_now())
        try:
            self.ds.save_manifest()
        except OSError:
            pass  # a full disk: the pairs and the previous manifest are still valid


def _events_by_position(
    sequence: useq.MDASequence, stack_planes: int = 0, stack_step_um: float = 0.2
) -> list[list[useq.MDAEvent]]:
    """The sequence's events grouped by position; with `stack_planes`, each group ends
    with an EPI z-stack climbing from the pair's focus (index z = 0 .. planes - 1)."""
    groups: dict[int, list[useq.MDAEvent]] = {}
    for event in sequence:
        groups.setdefault(int(event.index.get("p", 0)), []).append(event)
    out = [groups[k] for k in sorted(groups)]
    if stack_planes:
        for group in out:
            epi = next(e for e in group if e.channel and e.channel.config == EPI_PRESET)
            if epi.z_pos is None:
                raise CalibrationError(
                    "--stacks needs a known focus position at every field; "
                    "give positions with z or a config whose focus drive reports one"
                )
            group.extend(
                epi.model_copy(
                    update={
                        "index": {**dict(epi.index), "z": k},
                        "z_pos": epi.z_pos + k * stack_step_um,
                        "keep_shutter_open": k < stack_planes - 1,
                    }
                )
                for k in range(stack_planes)
            )
    return out


def _frame_info(meta: dict) -> dict[str, Any]:
    """The per-frame metadata worth keeping: timing and what the camera reported."""
    out: dict[str, Any] = {}
    for key in ("runner_time_ms", "exposure_ms"):
        if key in meta:
            out[key] = meta[key]
    cam = meta.get("camera_metadata")
    if cam:
        out["camera"] = {str(k): str(v) for k, v in dict(cam).items()}
    return out


def summarize(ds: PairedDataset) -> dict[str, Any]:
    """Numbers for the end-of-run summary: pairs, rejections by reason, mean |shift|."""
    calib = ds.manifest.get("calibration") or {}
    shifts = [math.hypot(*p.shift_px) for p in ds.pairs]
    return {
        "pairs": len(ds),
        "requested": calib.get("requested", len(ds)),
        "rejected": dict(Counter(r.get("reason", "?") for r in calib.get("rejected", []))),
        "mean_shift_px": float(np.mean(shifts)) if shifts else 0.0,
        "max_shift_px": float(np.max(shifts)) if shifts else 0.0,
        "folder": str(ds.folder),
    }


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.most_common()) or "none"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
