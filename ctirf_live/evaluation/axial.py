"""Axial resolution of EPI and cTIRF z-stacks by sectorial decorrelation (paper Methods 4.7).

ET2dNet restores each XY plane of an EPI z-stack on its own; both stacks are re-sliced
into XZ and YZ sections and the cut-off kc of the axial sector (the 5th of 8, centred
on Z) is averaged over sections. kc is in units of the Z Nyquist frequency
1 / (2 z_step), so the axial resolution is 2 z_step / kc. The paper's stack (201 planes,
100 nm step, 97.5 nm pixels) gave kc 0.19 / 0.21 (EPI, XZ / YZ) and 0.60 / 0.67 (cTIRF).

Z is not resampled to the lateral pixel size: Fourier upsampling leaves an empty band
just below the new Nyquist frequency, and the analysis then reads the camera noise as
band-limited signal with a cut-off there (kc ~ 0.98 whatever the optics).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.config import Optics
from ctirf_live.evaluation.metrics import axial_cutoff, reslice
from ctirf_live.inference.restorer import Restorer, pixel_size_warning

MIN_AXIAL_PLANES = 16
"""Fewer planes leave too few axial frequencies for a decorrelation peak."""
N_SECTORS = 8
AXIAL_SECTOR = N_SECTORS // 2
MAX_SECTIONS = 32
"""Evenly spaced XZ (and YZ) sections analysed per stack; the paper used all 512."""
FLICKER_KC = 0.95
"""A cut-off this close to Nyquist means plane-to-plane noise, not axial detail."""
DEFAULT_Z_START_UM = -1.0
"""Simulated stacks start 1 um below the coverslip and move focus up through the cell."""
STACK_PLANE_STEP_UM = 0.1
"""Specimen plane spacing of simulated stacks (`sim.scope.uniform_planes_um`): the stack's
own step, so the specimen holds axial detail up to the stack's Nyquist frequency at every
height, not only in the first 1.6 um where the default planes are fine."""
FINE_PLANES_ABOVE_UM = 2.0
"""Fine planes reach this far above the stack's highest focus (nominal); beyond it the
specimen only adds haze, and the default planes do."""


def simulated_stack(
    n_planes: int = 201,
    step_um: float = 0.1,
    size: int = 256,
    seed: int = 0,
    objective: str = "60X",
    z_start_um: float = DEFAULT_Z_START_UM,
    exposure_ms: float = 100.0,
    progress: Callable[[int, int], None] | None = None,
    plane_step_um: float | None = STACK_PLANE_STEP_UM,
    truth: np.ndarray | None = None,
) -> tuple[np.ndarray, Optics]:
    """An EPI z-stack (Z, size, size) float32 of a simulated cell, with camera noise.

    Focus moves from `z_start_um` up in `step_um` steps (the paper: 201 planes at
    100 nm). The field is centred on the cell at grid site (0, 0) of slide `seed`, away
    from the sites `PairSource.synthetic` trains on. The specimen is rendered every
    `plane_step_um` (None: the training frames' planes, coarse above 1.6 um). `truth`,
    an array of the stack's shape, receives the perfect answer: each plane's in-focus
    100 nm section (`SimulatedMicroscope.in_focus_section`, photo-electrons, no noise),
    the reference for what axial resolution a sectioning method could reach.
    Returns (stack, the objective's optics).
    """
    from ctirf_live.sim.scope import SENSOR_SHAPE

    check_planes(n_planes)
    if step_um <= 0:
        raise ValueError(f"z step must be positive, got {step_um} um")
    if not 32 <= size <= min(SENSOR_SHAPE):
        raise ValueError(f"simulated stack frames must be 32-{min(SENSOR_SHAPE)} px, got {size}")
    if truth is not None and truth.shape != (n_planes, size, size):
        raise ValueError(f"truth must have the stack's shape {(n_planes, size, size)}")
    planes = stack_planes_um(n_planes, step_um, z_start_um, plane_step_um)
    scope = stack_scope(size, seed, objective, exposure_ms, planes)
    stack = np.empty((n_planes, size, size), np.float32)
    for k in range(n_planes):
        scope.z_um = float(z_start_um + k * step_um)
        stack[k] = scope.snap()
        if truth is not None:
            truth[k] = scope.in_focus_section()
        if progress is not None:
            progress(k + 1, n_planes)
    return stack, scope.optics


def stack_scope(
    size: int, seed: int, objective: str, exposure_ms: float, planes_um: np.ndarray | None
) -> Any:
    """A drift-free simulated microscope in EPI on the cell at grid site (0, 0) of slide
    `seed`, `size` px ROI, specimen rendered at `planes_um` (None: the default planes)."""
    from ctirf_live.sim.sample import cell_at
    from ctirf_live.sim.scope import SimulatedMicroscope

    scope = SimulatedMicroscope(seed=seed, drift_px=0.0, planes_um=planes_um)
    scope.objective = objective
    scope.centre_roi(size)
    scope.exposure_ms = float(exposure_ms)
    scope.set_illumination("EPI")
    cell = cell_at(seed, 0, 0)
    if cell is not None:
        scope.xy_um = (cell.cx, cell.cy)
    return scope


def stack_planes_um(
    n_planes: int, step_um: float, z_start_um: float, plane_step_um: float | None
) -> np.ndarray | None:
    """Specimen heights for a simulated stack: every `plane_step_um` up to
    `FINE_PLANES_ABOVE_UM` above its highest focus, the default planes beyond (None:
    the default planes throughout)."""
    from ctirf_live.sim.sample import TOP_UM
    from ctirf_live.sim.scope import uniform_planes_um

    if plane_step_um is None:
        return None
    top = max(z_start_um + (n_planes - 1) * step_um, 0.0) + FINE_PLANES_ABOVE_UM
    return uniform_planes_um(plane_step_um, top_um=min(top, TOP_UM))


def check_planes(n_planes: int) -> None:
    """Refuse stacks too thin for axial decorrelation analysis."""
    if n_planes < MIN_AXIAL_PLANES:
        raise ValueError(
            f"a stack of {n_planes} planes is too thin for axial decorrelation analysis; "
            f"it needs at least {MIN_AXIAL_PLANES} (the paper uses 201 planes at 100 nm)"
        )


def read_stack(
    path: str | Path, z_step_um: float | None = None
) -> tuple[np.ndarray, float | None, float]:
    """An EPI z-stack from a (OME-)TIFF: (stack (Z, Y, X) float32, pixel size or None,
    z step). Axes other than Z, Y, X must have length 1; `z_step_um` overrides the file's."""
    from ctirf_live.data.tiff import read_ome_tiff

    data, info = read_ome_tiff(path)
    axes = info.axes.upper()
    if "Z" not in axes or not axes.endswith("YX"):
        raise ValueError(f"{path} is not a z-stack (axes {info.axes!r}); pass an EPI Z, Y, X stack")
    extra = [a for a, n in zip(axes, data.shape, strict=True) if a not in "ZYX" and n > 1]
    if extra:
        raise ValueError(
            f"{path} has more than one {', '.join(extra)}; save a single EPI z-stack (Z, Y, X)"
        )
    stack = data[tuple(slice(None) if a in "ZYX" else 0 for a in axes)]  # Z before Y, X
    step = z_step_um or info.z_step_um
    if not step:
        raise ValueError(f"{path} does not record its z step; pass it with --z-step (um)")
    return np.asarray(stack, dtype=np.float32), info.pixel_size_um, float(step)


def restore_stack(
    restorer: Restorer, stack: np.ndarray, progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """cTIRF of every XY plane of a (Z, Y, X) stack, each normalised on its own (ET2dNet)."""
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise ValueError(f"expected a z-stack (Z, Y, X), got shape {arr.shape}")
    if restorer.dims != 2:
        raise ValueError("axial evaluation restores planes one by one: use an ET2dNet model")
    out = np.empty(arr.shape, np.float32)
    for k, plane in enumerate(arr):
        out[k] = restorer.restore(plane)
        if progress is not None:
            progress(k + 1, len(arr))
    return out


def axial_resolution(
    restorer: Restorer,
    stack: np.ndarray,
    pixel_size_um: float,
    z_step_um: float,
    *,
    ctirf: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    max_sections: int = MAX_SECTIONS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Axial cut-off kc and resolution (nm) of an EPI stack and its cTIRF, XZ and YZ.

    `ctirf`: the stack already restored (`restore_stack`), else it is computed here.
    `truth` (simulated stacks): the perfect section of every plane, scored the same way;
    its ratio to EPI (`ideal_ratio`) is what this specimen lets any method reach.
    Returns kc per stack and re-slice, the cTIRF / EPI kc ratios (the resolution gain;
    the paper reports ~3x) and the settings used.
    """
    arr = np.asarray(stack, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"expected a z-stack (Z, Y, X), got shape {arr.shape}")
    check_planes(arr.shape[0])
    if pixel_size_um <= 0 or z_step_um <= 0:
        raise ValueError("pixel size and z step must be positive")
    restored = restore_stack(restorer, arr, progress) if ctirf is None else np.asarray(ctirf)
    if restored.shape != arr.shape:
        raise ValueError(f"cTIRF stack {restored.shape} does not match the EPI stack {arr.shape}")
    result: dict[str, Any] = {
        "planes": int(arr.shape[0]),
        "shape": list(arr.shape),
        "pixel_size_um": float(pixel_size_um),
        "z_step_um": float(z_step_um),
        "sector": f"{AXIAL_SECTOR + 1} of {N_SECTORS} (centred on Z)",
        "sections_per_axis": int(min(max_sections, arr.shape[1])),
        "kc_units": "Z Nyquist frequency, 1 / (2 z_step)",
        "warnings": [w for w in [pixel_size_warning(restorer.optics, pixel_size_um)] if w],
    }
    stacks = [("epi", arr), ("ctirf", restored)]
    if truth is not None:
        if np.shape(truth) != arr.shape:
            raise ValueError(f"truth stack {np.shape(truth)} does not match the EPI stack")
        stacks.append(("truth", np.asarray(truth, dtype=np.float32)))
    kc: dict[str, dict[str, float]] = {}
    for name, data in stacks:
        kc[name] = {
            axis: axial_cutoff(
                data, axis, n_sectors=N_SECTORS, sector=AXIAL_SECTOR, max_sections=max_sections
            )
            for axis in ("xz", "yz")
        }
        result[name] = {
            axis: {"kc": value, "resolution_nm": _resolution_nm(value, z_step_um)}
            for axis, value in kc[name].items()
        }
    ratios = {
        axis: (kc["ctirf"][axis] / kc["epi"][axis] if kc["epi"][axis] > 0 else None)
        for axis in ("xz", "yz")
    }
    valid = [r for r in ratios.values() if r is not None]
    result["ratio"] = {**ratios, "mean": float(np.mean(valid)) if valid else None}
    if truth is not None:
        result["ideal_ratio"] = {
            axis: (kc["truth"][axis] / kc["epi"][axis] if kc["epi"][axis] > 0 else None)
            for axis in ("xz", "yz")
        }
    if max(kc["ctirf"].values()) >= FLICKER_KC:
        result["warnings"].append(
            "cTIRF axial kc is at the Z Nyquist frequency: planes that change independently "
            "(flicker, e.g. an untrained model) look like resolution; inspect axial_xz.png"
        )
    return result


def _resolution_nm(kc: float, z_step_um: float) -> float | None:
    return 2000.0 * z_step_um / kc if kc > 0 else None


def axial_figure(
    epi: np.ndarray,
    ctirf: np.ndarray,
    path: str | Path,
    pixel_size_um: float,
    z_step_um: float,
    row: int | None = None,
    result: dict[str, Any] | None = None,
) -> Path:
    """PNG of one XZ re-slice of the EPI and cTIRF stacks, side by side, in micrometres.

    `row`: the Y index of the section (default: the row with the most in-focus
    structure, the largest standard deviation of the EPI stack's sharpest plane).
    `result` (from `axial_resolution`) adds the XZ kc to the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epi = np.asarray(epi, dtype=np.float32)
    ctirf = np.asarray(ctirf, dtype=np.float32)
    if row is None:
        sharpest = epi[int(np.argmax(epi.std(axis=(1, 2))))]
        row = int(np.argmax(sharpest.std(axis=1)))
    nz, _, nx = epi.shape
    extent = (0.0, nx * pixel_size_um, 0.0, nz * z_step_um)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6), layout="constrained")
    for ax, name, data in ((axes[0], "EPI", epi), (axes[1], "cTIRF", ctirf)):
        section = reslice(data, "xz")[row]
        lo, hi = np.percentile(section, (0.5, 99.7))
        ax.imshow(
            section,
            cmap="gray",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1,
            origin="lower",
            extent=extent,
            aspect="equal",
            interpolation="nearest",
        )
        title = f"{name}, XZ at y = {row * pixel_size_um:.1f} µm"
        if result is not None:
            kc = result["epi" if name == "EPI" else "ctirf"]["xz"]["kc"]
            title += f"\nmean axial kc (XZ) {kc:.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("z (µm, from the first plane)")
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
