"""EPI z-stacks for ET3dNet: simulated (with a sectioned ground truth) or read from files.

ET3dNet sees short stacks: 6 planes 200 nm apart in the paper (Section 2.3). The
simulated stacks start at a random height within the cells (0-2 um above the coverslip),
so the stack has emitters below and above it (ventral cortex, cell body, floating cells):
strong out-of-volume background. Their ground truth is what lies near each focal plane,
imaged with the in-focus PSF (`SimulatedMicroscope.in_focus_section`). File stacks come from
OME-TIFFs as `ctirf acquire` or `ctirf process` write them (T/P/C/Z/Y/X), EPI channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.config import Optics

PLANES = 6
Z_STEP_UM = 0.2
STACK_START_UM = (0.0, 2.0)


class StackError(ValueError):
    """A stack input problem; the message says what to do."""


@dataclass
class Stack:
    """One EPI z-stack (Z, Y, X) float32, where it came from, and its ground truth if any."""

    epi: np.ndarray
    field: str
    truth: np.ndarray | None = None
    start_um: float | None = None


@dataclass
class StackSet:
    """Stacks of one objective with their optics and plane spacing."""

    stacks: list[Stack]
    optics: Optics
    z_step_um: float
    description: str
    optics_recorded: bool = True  # False: files gave only pixel size and z step

    def __len__(self) -> int:
        return len(self.stacks)

    @property
    def planes(self) -> int:
        return int(self.stacks[0].epi.shape[0]) if self.stacks else 0

    def subset(self, indices: Sequence[int]) -> StackSet:
        return StackSet(
            [self.stacks[i] for i in indices],
            self.optics,
            self.z_step_um,
            self.description,
            self.optics_recorded,
        )

    def with_optics(self, optics: Optics) -> StackSet:
        """The same stacks under `optics` (pixel size and z step kept from the data)."""
        merged = optics.model_copy(
            update={"pixel_size_um": self.optics.pixel_size_um, "z_step_um": self.z_step_um}
        )
        return StackSet(self.stacks, merged, self.z_step_um, self.description, True)


def synthetic_stacks(
    n: int,
    objective: str = "60X",
    seed: int = 0,
    size: int = 256,
    planes: int = PLANES,
    z_step_um: float = Z_STEP_UM,
    families: Sequence[str] = ("factin",),
    exposure_ms: tuple[float, float] = (10.0, 100.0),
    progress: Callable[[int, int], None] | None = None,
) -> StackSet:
    """`n` simulated EPI stacks of distinct cell fields, with their sectioned ground truth.

    Each stack starts at a height drawn from `STACK_START_UM` (on the z grid) and climbs
    `planes` planes `z_step_um` apart; the exposure is log-uniform in `exposure_ms` per stack.
    `progress(done, total)` is called after each stack (simulating one takes seconds).
    """
    from ctirf_live.data.loaders import simulated_fields
    from ctirf_live.sim.scope import SENSOR_SHAPE

    if n < 1 or planes < 2:
        raise StackError(f"need at least 1 stack of 2 or more planes, got {n} x {planes}")
    if not 32 <= size <= min(SENSOR_SHAPE):
        raise StackError(f"stack frames must be 32-{min(SENSOR_SHAPE)} px, got {size}")
    rng = np.random.default_rng([seed, 0x57AC])
    families = tuple(families) or ("factin",)
    stacks: list[Stack] = []
    fields = simulated_fields(n, families, objective, seed, size)
    for scope, xy in fields:
        scope.xy_um = xy
        scope.exposure_ms = float(math.exp(rng.uniform(*np.log(exposure_ms))))
        # starts on the z grid: foci repeat between stacks, so the OTFs are reused
        steps = round((STACK_START_UM[1] - STACK_START_UM[0]) / z_step_um)
        start = STACK_START_UM[0] + z_step_um * int(rng.integers(0, steps + 1))
        scope.set_illumination("EPI")
        epi = np.empty((planes, size, size), np.float32)
        truth = np.empty_like(epi)
        for k in range(planes):
            scope.z_um = start + k * z_step_um
            epi[k] = scope.snap()
            truth[k] = scope.in_focus_section()
        x, y = scope.xy_um
        stacks.append(Stack(epi, f"sim:{scope.family}:{x:.1f},{y:.1f}", truth, start))
        scope.clear_cache()
        if progress is not None:
            progress(len(stacks), n)
    optics = fields[0][0].optics.model_copy(update={"z_step_um": z_step_um})
    names = "+".join(dict.fromkeys(families))
    return StackSet(stacks, optics, z_step_um, f"synthetic stacks {n} ({objective}, {names})")


def read_tiff_images(path: str | Path) -> list[tuple[Any, Any]]:
    """The one image of an OME-TIFF as (array, TiffInfo): `stacks_from_files`' reader."""
    from ctirf_live.data.tiff import read_ome_tiff

    return [read_ome_tiff(path)]


def _images(
    paths: Sequence[str | Path], reader: Callable[[str | Path], list[tuple[Any, Any]]]
) -> Iterator[tuple[str | Path, str, Any, Any]]:
    """(path, position label, array, info) of every image, file by file; the label is
    `pK:` for files with more than one image (positions of an OME-Zarr store), else ''."""
    for path in paths:
        found = reader(path)
        for k, (data, info) in enumerate(found):
            yield path, (f"p{k}:" if len(found) > 1 else ""), data, info


def stacks_from_files(
    paths: Sequence[str | Path],
    planes: int = PLANES,
    channel: str = "EPI",
    reader: Callable[[str | Path], list[tuple[Any, Any]]] | None = None,
) -> StackSet:
    """Every (T, P) z-stack of `channel` in image files, split into `planes`-plane stacks.

    `reader(path)` gives each image (series, position) of a file as (array, info), info
    with `axes`, `z_step_um`, `pixel_size_um`, `channel_names` and `metadata` as
    `data.tiff.TiffInfo`; the default reads OME-TIFF (an OME-Zarr reader lives with the
    chunked processing, `inference.dask_process.read_chunked`). All files must share the
    pixel size and z step; a stack whose Z count is not a multiple of `planes` keeps its
    first whole windows.
    """
    stacks: list[Stack] = []
    pixel = step = None
    recorded: dict | None = None
    for path, position, data, info in _images(paths, reader or read_tiff_images):
        axes = info.axes.upper()
        if "Z" not in axes:
            raise StackError(f"{path} has no Z axis (axes {info.axes}); pass EPI z-stacks")
        if not info.z_step_um:
            raise StackError(f"{path} does not record its z step; write it in the OME metadata")
        if pixel is not None and (
            not math.isclose(info.pixel_size_um or 0, pixel, rel_tol=0.01)
            or not math.isclose(info.z_step_um, step or 0, rel_tol=0.01)
        ):
            raise StackError(f"{path} has another pixel size or z step than the first file")
        pixel, step = info.pixel_size_um, info.z_step_um
        if recorded is None and isinstance(info.metadata.get("optics"), dict):
            recorded = info.metadata["optics"]
        arr = _to_tczyx(np.asarray(data, np.float32), axes)
        names = info.channel_names or []
        c = names.index(channel) if channel in names else 0
        if arr.shape[2] < planes:
            raise StackError(f"{path} has {arr.shape[2]} planes; ET3dNet needs {planes}")
        where = f"{Path(path).name}:{position}"
        for t in range(arr.shape[0]):
            for z0 in range(0, arr.shape[2] - planes + 1, planes):
                stacks.append(Stack(arr[t, c, z0 : z0 + planes], f"{where}t{t}:z{z0}"))
    if not stacks:
        raise StackError("no stacks found; pass OME-TIFF or OME-Zarr z-stacks (ctirf acquire)")
    sizes = {"pixel_size_um": pixel or Optics().pixel_size_um, "z_step_um": step or Z_STEP_UM}
    optics = Optics(**{**(recorded or {}), **sizes})
    return StackSet(
        stacks, optics, float(step or Z_STEP_UM), f"{len(paths)} stack files", recorded is not None
    )


def stacks_from_dataset(folder: str | Path, planes: int = PLANES) -> StackSet:
    """The EPI z-stacks a `ctirf calibrate --stacks` dataset holds, with its optics."""
    from ctirf_live.data.dataset import PairedDataset

    ds = PairedDataset.open(folder)
    files = [path for _, path in ds.stack_files()]
    if not files:
        raise StackError(
            f"{folder} holds no z-stacks; record them with `ctirf calibrate --stacks`"
        )
    found = stacks_from_files(files, planes)
    return found.with_optics(ds.optics)


def _to_tczyx(data: np.ndarray, axes: str) -> np.ndarray:
    """Reorder to (T*P, C, Z, Y, X), adding missing axes; other axes are refused."""
    order = [a for a in axes]
    extra = [a for a in order if a not in "TPCZYX"]
    if extra:
        raise StackError(f"unsupported axes {''.join(extra)} in {axes}")
    for a in "TPCZ":
        if a not in order:
            data = data[None]
            order.insert(0, a)
    data = np.transpose(data, [order.index(a) for a in "TPCZYX"])
    t, p = data.shape[:2]
    return data.reshape(t * p, *data.shape[2:])
