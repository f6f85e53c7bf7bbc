"""Paired frames in memory and the torch datasets that crop them for training.

`PairSource` holds registered (EPI, TIRF) frames, each tagged with the field of view it
shows, from an on-disk `PairedDataset` or rendered by a `SimulatedMicroscope`.
`CropDataset` turns a source into training samples (paper Methods 4.3.2):

- each frame is percentile-normalised once, over the whole frame (Eq. 1), so all crops
  of a frame share its scale; Eq. 1 clips at 1, which for TIRF targets flattens the
  brightest ~2% of pixels, the in-focus structures themselves (a stress fibre on the
  glass, 3-4x the 98th percentile, is cut to 1 while one 0.2 um up keeps ~0.55), so
  `target_ceiling` and `input_ceiling` raise or drop that clip (None: none);
- a random `crop` x `crop` window (default 512); with `rotation_probability` (0.8) the
  crop is then transformed by one of the 7 non-identity symmetries of the square (90,
  180, 270 degree rotations and the 4 mirror flips), drawn uniformly: exact, no
  interpolation, and the in-focus PSF is (nearly) symmetric under all of them;
- the TIRF variance weight: the paper multiplies each TIRF target by its variance to damp
  out-of-focus pairs. Here it is a per-sample loss weight, var(TIRF crop) divided by the
  mean variance of the source's normalised TIRF frames (so weights are of order 1);
  pass it to `HybridLoss(..., sample_weight=...)`. `variance_scaling="target"` instead
  multiplies the TIRF crop by that ratio (the paper's literal recipe), "none" skips it.

Samples are deterministic per (seed, epoch, index). Validation uses centre crops of the
training size without augmentation (`augment=False`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ctirf_live.config import Optics
from ctirf_live.data.dataset import DatasetError, PairedDataset
from ctirf_live.data.normalize import percentile_scale

SYMMETRIES: tuple[tuple[int, bool], ...] = tuple(
    (k, flip) for flip in (False, True) for k in range(4) if (k, flip) != (0, False)
)
"""The non-identity symmetries of a square crop: (quarter turns, then mirror left-right)."""

SYNTHETIC_SITE_OFFSET = 500
"""Synthetic pairs come from slide sites around (500, 500) grid steps (20 mm) from the
origin, away from the fields the demo rig's calibration visits near home."""

_SYNTHETIC_OFFSET_UM = 6.0
_PROGRESS_FROM = 8
# how the TIRF variance damps out-of-focus pairs: as a loss weight, literally by multiplying
# the target (the paper's wording; relative to the mean so targets stay of order 1), or not
VARIANCE_SCALING = ("weight", "target", "none")
SYNTHETIC_EXPOSURE_MS = (10.0, 100.0)


@dataclass
class FramePair:
    """One registered pair: EPI and TIRF (float32, raw intensities), its field, and the
    noise-free TIRF ground truth when the pair is simulated."""

    epi: np.ndarray
    tirf: np.ndarray
    field: str
    truth: np.ndarray | None = None
    file: str | None = None  # the dataset's pair file, when read from one


class PairSource:
    """Registered EPI/TIRF frames held in memory, with their optics and provenance.

    Pairs are 2D frames; for ET3dNet distillation they are (Z, Y, X) stacks with the
    teacher's pseudo ground truth in place of TIRF (all pairs of a source alike).
    """

    def __init__(self, pairs: Sequence[FramePair], optics: Optics, description: str) -> None:
        self.pairs = list(pairs)
        self.optics = optics
        self.description = description
        ndims = {p.epi.ndim for p in self.pairs}
        for i, p in enumerate(self.pairs):
            if p.epi.ndim not in (2, 3) or p.epi.shape != p.tirf.shape or len(ndims) > 1:
                raise DatasetError(
                    f"pair {i} ({p.field}): EPI {p.epi.shape} and TIRF {p.tirf.shape} "
                    "must be equal 2D frames (or equal 3D stacks, all alike)"
                )
            if not (np.isfinite(p.epi).all() and np.isfinite(p.tirf).all()):
                raise DatasetError(f"pair {i} ({p.field}) contains NaN or infinite pixels")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> FramePair:
        return self.pairs[index]

    @property
    def files(self) -> list[str]:
        """Dataset pair files of the pairs that came from a dataset, in order."""
        return [p.file for p in self.pairs if p.file]

    def without_files(self, files: Sequence[str]) -> PairSource:
        """The pairs whose dataset file is not in `files` (e.g. those a model trained on)."""
        drop = set(files)
        return self.subset([i for i, p in enumerate(self.pairs) if p.file not in drop])

    @property
    def fields(self) -> list[str]:
        """Field id of each pair, in order."""
        return [p.field for p in self.pairs]

    @property
    def shape(self) -> tuple[int, int]:
        """The smallest frame side along Y and along X over all pairs."""
        if not self.pairs:
            raise DatasetError(f"{self.description} has no pairs")
        return (
            min(p.epi.shape[-2] for p in self.pairs),
            min(p.epi.shape[-1] for p in self.pairs),
        )

    @property
    def has_truth(self) -> bool:
        return bool(self.pairs) and all(p.truth is not None for p in self.pairs)

    def subset(self, indices: Sequence[int]) -> PairSource:
        """The pairs at `indices` (same optics and description)."""
        return PairSource([self.pairs[i] for i in indices], self.optics, self.description)

    @classmethod
    def from_dataset(cls, dataset: PairedDataset | str | Path) -> PairSource:
        """Load every pair of an on-disk dataset, registered (recorded shift applied).

        All pairs must have the same frame shape. Pairs whose fields of view overlap
        (stage positions closer than a frame) share a field id, so a train/validation
        split by field never shows the same cells on both sides.
        """
        ds = dataset if isinstance(dataset, PairedDataset) else PairedDataset.open(dataset)
        if len(ds) == 0:
            raise DatasetError(
                f"{ds.folder} has no pairs; collect some with `ctirf calibrate --out {ds.folder}`"
            )
        shape = _check_same_shape(ds)
        optics = ds.optics
        fields = _overlap_groups(
            [rec.position for rec in ds.pairs],
            [rec.file for rec in ds.pairs],
            (shape[0] * optics.pixel_size_um, shape[1] * optics.pixel_size_um),
        )
        pairs = []
        for i, field_id in enumerate(fields):
            epi, tirf = ds.load_pair(i, registered=True)
            pairs.append(FramePair(epi, tirf, field_id, file=ds.pairs[i].file))
        return cls(pairs, optics, str(ds.folder))

    @classmethod
    def synthetic(
        cls,
        n: int,
        optics_objective: str = "60X",
        seed: int = 0,
        roi: int = 256,
        exposure_ms: float | tuple[float, float] | None = None,
        progress: bool | Callable[[int, int], None] = True,
        families: Sequence[str] = ("factin",),
    ) -> PairSource:
        """Render `n` noisy EPI/TIRF pairs of distinct, non-overlapping fields with cells.

        Pair i is drawn from slide `seed` of specimen family `families[i % len]` (see
        `ctirf_live.sim.sample.FAMILIES`), each with its own drift-free
        `SimulatedMicroscope` (pairs are registered by construction), focus z = 0 for both
        modes, a centred `roi` x `roi` camera ROI. Each field is centred within a few
        micrometres of a cell. The exposure is `exposure_ms`, or drawn per pair
        log-uniformly from a (low, high) range (default 10-100 ms, as real pairs vary):
        photon counts, hence noise, vary as on a real rig. The noise-free TIRF
        (`FramePair.truth`, in camera units with offset and gain maps, like the measured
        frames) is kept for evaluation. `progress`: show progress (from 8 pairs), or a
        `(done, total)` callback.
        """
        from ctirf_live.sim.sample import FAMILIES
        from ctirf_live.sim.scope import SENSOR_SHAPE

        if n < 1:
            raise DatasetError(f"--synthetic needs at least 1 pair, got {n}")
        if not 32 <= roi <= min(SENSOR_SHAPE):
            raise DatasetError(f"synthetic frames must be 32-{min(SENSOR_SHAPE)} px, got {roi}")
        families = tuple(families) or ("factin",)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise DatasetError(
                f"unknown specimen family {unknown[0]!r}; choose from {', '.join(FAMILIES)}"
            )
        if exposure_ms is None:
            exposure_ms = SYNTHETIC_EXPOSURE_MS
        low, high = (
            (float(exposure_ms), float(exposure_ms))
            if np.ndim(exposure_ms) == 0
            else (float(exposure_ms[0]), float(exposure_ms[1]))  # type: ignore[index]
        )
        if not 0 < low <= high:
            raise DatasetError(f"exposure must be positive (low <= high), got {exposure_ms} ms")
        rng = np.random.default_rng([seed, 0xE4905])
        exposures = np.exp(rng.uniform(math.log(low), math.log(high), n))
        fields = simulated_fields(n, families, optics_objective, seed, roi)
        pairs = []
        with _maybe_progress(progress, n) as advance:
            for i, (scope, (x, y)) in enumerate(fields):
                fam = scope.family
                scope.xy_um = (x, y)
                scope.exposure_ms = float(exposures[i])
                pairs.append(snap_pair(scope, f"sim:{fam}:{x:.1f},{y:.1f}"))
                scope.clear_cache()
                advance()
        names = "+".join(dict.fromkeys(families))
        description = f"synthetic {n} ({optics_objective}, {names}, seed {seed}, {roi} px)"
        return cls(pairs, fields[0][0].optics, description)


class CropDataset(Dataset):
    """Training (or validation) samples from a `PairSource`; see the module docstring.

    Item `i` of epoch `e` comes from frame `i % len(source)` with a crop (and rotation)
    drawn from an RNG seeded by (seed, e, i); call `set_epoch` before each epoch.
    With `augment=False`: the centre crop of each frame, untransformed (validation).
    Items are dicts: `epi`, `tirf` (1, crop, crop) float32 in [0, 1], `weight` (scalar
    tensor) and `frame` (the source index).
    """

    def __init__(
        self,
        source: PairSource,
        crop: int = 512,
        rotation_probability: float = 0.8,
        percentile: float = 98.0,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        augment: bool = True,
        variance_scaling: str = "weight",
        target_scale: str = "own",
        target_ceiling: float | None = 1.0,
        input_ceiling: float | None = 1.0,
    ) -> None:
        if len(source) == 0:
            raise DatasetError(f"{source.description}: no pairs to crop from")
        if variance_scaling not in VARIANCE_SCALING:
            raise ValueError(
                f"variance_scaling must be one of {', '.join(VARIANCE_SCALING)}, "
                f"got {variance_scaling!r}"
            )
        if target_scale not in ("own", "input"):
            raise ValueError(f"target_scale must be 'own' or 'input', got {target_scale!r}")
        for name, value in (("target_ceiling", target_ceiling), ("input_ceiling", input_ceiling)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")
        self.variance_scaling = variance_scaling
        self.target_scale = target_scale
        self.target_ceiling = target_ceiling
        self.input_ceiling = input_ceiling
        if not 0.0 <= rotation_probability <= 1.0:
            raise ValueError(f"rotation_probability must be in [0, 1], got {rotation_probability}")
        check_crop(source, crop)
        self.source = source
        self.crop = int(crop)
        self.rotation_probability = float(rotation_probability) if augment else 0.0
        self.seed = int(seed)
        self.augment = augment
        self.samples_per_epoch = int(samples_per_epoch or len(source)) if augment else len(source)
        self.epoch = 0
        self.scales = []
        for p in source.pairs:
            epi_scale = percentile_scale(p.epi, percentile)
            tirf_scale = (
                epi_scale if target_scale == "input" else percentile_scale(p.tirf, percentile)
            )
            self.scales.append((epi_scale, tirf_scale))
        variances = [float(self._normalised(i, "tirf").var()) for i in range(len(source))]
        self.reference_variance = float(np.mean(variances))

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose crops `__getitem__` returns (training is per epoch)."""
        self.epoch = int(epoch)

    def _normalised(
        self, frame: int, which: str, window: tuple[slice, slice] | None = None
    ) -> np.ndarray:
        pair = self.source.pairs[frame]
        image = pair.epi if which == "epi" else pair.tirf
        scale = self.scales[frame][0 if which == "epi" else 1]
        region = image if window is None else image[window]
        ceiling = self.input_ceiling if which == "epi" else self.target_ceiling
        return np.clip(region / np.float32(scale), 0.0, ceiling).astype(np.float32)

    def plan(self, index: int) -> tuple[int, int, int, tuple[int, bool] | None]:
        """(frame, y0, x0, symmetry or None) of item `index` in the current epoch."""
        frame = index % len(self.source)
        ny, nx = self.source.pairs[frame].epi.shape[-2:]
        if not self.augment:
            return frame, (ny - self.crop) // 2, (nx - self.crop) // 2, None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        y0 = int(rng.integers(0, ny - self.crop + 1))
        x0 = int(rng.integers(0, nx - self.crop + 1))
        symmetry = None
        if rng.random() < self.rotation_probability:
            symmetry = SYMMETRIES[int(rng.integers(len(SYMMETRIES)))]
        return frame, y0, x0, symmetry

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        frame, y0, x0, symmetry = self.plan(index)
        window = (Ellipsis, slice(y0, y0 + self.crop), slice(x0, x0 + self.crop))
        epi = transform(self._normalised(frame, "epi", window), symmetry)
        tirf = transform(self._normalised(frame, "tirf", window), symmetry)
        weight = float(tirf.var()) / self.reference_variance if self.reference_variance else 1.0
        if self.variance_scaling == "target":
            tirf = (tirf * np.float32(weight)).astype(np.float32)
        if self.variance_scaling != "weight":
            weight = 1.0
        return {
            "epi": torch.from_numpy(epi)[None],
            "tirf": torch.from_numpy(tirf)[None],
            "weight": torch.tensor(weight, dtype=torch.float32),
            "frame": frame,
        }


def check_crop(source: PairSource, crop: int) -> None:
    """Raise a DatasetError when `crop` does not fit in every frame of `source`."""
    ny, nx = source.shape
    if crop > min(ny, nx):
        raise DatasetError(
            f"crop {crop} px is larger than the frames ({ny}x{nx} px); "
            f"use a crop of at most {min(ny, nx)} px"
        )


def transform(image: np.ndarray, symmetry: tuple[int, bool] | None) -> np.ndarray:
    """Apply a square symmetry (quarter turns, then optional left-right mirror) to the last
    two axes (a frame or every plane of a stack alike); contiguous."""
    if symmetry is None:
        return np.ascontiguousarray(image)
    k, flip = symmetry
    out = np.rot90(image, k, axes=(-2, -1))
    if flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def split_by_field(
    source: PairSource, val_fraction: float, seed: int = 0
) -> tuple[PairSource, PairSource]:
    """Split into (train, validation) by field, so no field of view is on both sides.

    About `val_fraction` of the fields (at least one when `val_fraction` > 0 and there
    are two or more fields, never all of them) go to validation, drawn with `seed`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    fields = sorted(set(source.fields))
    n_val = round(val_fraction * len(fields))
    if val_fraction > 0 and len(fields) >= 2:
        n_val = min(max(n_val, 1), len(fields) - 1)
    rng = np.random.default_rng([seed, 0x5B117])
    val_fields = {fields[i] for i in rng.permutation(len(fields))[:n_val]}
    train_idx = [i for i, f in enumerate(source.fields) if f not in val_fields]
    val_idx = [i for i, f in enumerate(source.fields) if f in val_fields]
    return source.subset(train_idx), source.subset(val_idx)


def _check_same_shape(ds: PairedDataset) -> tuple[int, int]:
    """The dataset's one frame shape (from file headers), or a DatasetError naming them."""
    import tifffile

    by_shape: dict[tuple[int, int], list[str]] = {}
    for rec in ds.pairs:
        with tifffile.TiffFile(ds.folder / rec.file) as tif:
            shape = tuple(int(s) for s in tif.series[0].shape[-2:])
        by_shape.setdefault(shape, []).append(rec.file)  # type: ignore[arg-type]
    if len(by_shape) > 1:
        parts = [
            f"{s[0]}x{s[1]} ({len(files)} pairs, e.g. {files[0]})"
            for s, files in sorted(by_shape.items(), key=lambda kv: -len(kv[1]))
        ]
        raise DatasetError(
            f"{ds.folder}: pairs have different frame shapes: {', '.join(parts)}; "
            "move the odd ones to another folder"
        )
    return next(iter(by_shape))


def _overlap_groups(
    positions: Sequence[dict[str, float]], names: Sequence[str], size_um: tuple[float, float]
) -> list[str]:
    """Field ids: pairs whose frames overlap on the slide (transitively) share one.

    A pair without an x/y position is its own field, named after its file.
    """
    n = len(positions)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    xy = [(p.get("x"), p.get("y")) for p in positions]
    known = [i for i in range(n) if xy[i][0] is not None and xy[i][1] is not None]
    for a_pos, a in enumerate(known):
        for b in known[a_pos + 1 :]:
            dx = abs(xy[a][0] - xy[b][0])  # type: ignore[operator]
            dy = abs(xy[a][1] - xy[b][1])  # type: ignore[operator]
            if dx < size_um[1] and dy < size_um[0]:
                parent[root(a)] = root(b)
    return [f"field:{names[root(i)]}" for i in range(n)]


def snap_pair(scope: Any, name: str) -> FramePair:
    """One EPI frame, one TIRF frame and the noise-free TIRF truth of a `SimulatedMicroscope`."""
    scope.set_illumination("EPI")
    epi = scope.snap().astype(np.float32)
    scope.set_illumination("TIRF")
    tirf = scope.snap().astype(np.float32)
    truth = scope.ground_truth_tirf(camera_units=True).astype(np.float32)
    return FramePair(epi, tirf, name, truth)


def simulated_fields(
    n: int, families: Sequence[str], objective: str, seed: int, roi: int
) -> list[tuple[Any, tuple[float, float]]]:
    """Field i of `n`: the drift-free microscope of family `families[i % len]` (one per
    family, slide `seed`, `objective`, a centred `roi` px ROI) and its stage position, near
    a distinct cell, frames never overlapping."""
    from ctirf_live.sim.scope import SimulatedMicroscope

    scopes, queues = {}, {}
    for fam in dict.fromkeys(families):
        scope = SimulatedMicroscope(seed=seed, drift_px=0.0, family=fam)
        scope.objective = objective
        scope.centre_roi(roi)
        count = sum(1 for i in range(n) if families[i % len(families)] == fam)
        scopes[fam] = scope
        queues[fam] = iter(_synthetic_positions(count, seed, roi * scope.pixel_size_um(), fam))
    return [(scopes[f], next(queues[f])) for f in (families[i % len(families)] for i in range(n))]


def _synthetic_positions(
    n: int, seed: int, side_um: float, family: str = "factin"
) -> list[tuple[float, float]]:
    """`n` stage positions near distinct cells whose frames (side `side_um`) never overlap."""
    from ctirf_live.sim.sample import cell_at

    rng = np.random.default_rng([seed, 0x517E])
    radius = max(2, math.ceil(math.sqrt(4 * n)))
    out: list[tuple[float, float]] = []
    tried: set[tuple[int, int]] = set()
    while len(out) < n:
        i, j = (int(v) + SYNTHETIC_SITE_OFFSET for v in rng.integers(-radius, radius + 1, 2))
        if (i, j) in tried:
            if len(tried) >= (2 * radius + 1) ** 2:
                radius *= 2
            continue
        tried.add((i, j))
        cell = cell_at(seed, i, j, family)
        if cell is None:
            continue
        x = cell.cx + float(rng.uniform(-_SYNTHETIC_OFFSET_UM, _SYNTHETIC_OFFSET_UM))
        y = cell.cy + float(rng.uniform(-_SYNTHETIC_OFFSET_UM, _SYNTHETIC_OFFSET_UM))
        if all(abs(x - u) >= side_um or abs(y - v) >= side_um for u, v in out):
            out.append((round(x, 3), round(y, 3)))
    return out


@contextlib.contextmanager
def _maybe_progress(
    progress: bool | Callable[[int, int], None], total: int
) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` that reports one more of `total` pairs: to a `(done, total)`
    callback, or with the shared progress report when `progress` is True (from
    `_PROGRESS_FROM` pairs)."""
    if callable(progress):
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1
            progress(done, total)

        yield advance
        return
    if not progress or total < _PROGRESS_FROM:
        yield lambda: None
        return
    from ctirf_live.progress import ProgressReport

    with ProgressReport("rendering pairs", total, unit="pairs") as report:
        yield report.advance
