"""Single-frame acquisition with the metadata a cTIRF pipeline needs."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pymmcore_plus import CMMCorePlus

from ctirf_live import __version__
from ctirf_live.acquisition.core import (
    RigInfo,
    active_optics,
    set_illumination,
    set_objective,
)
from ctirf_live.acquisition.limits import stage_limits
from ctirf_live.config import ConfigError, Optics
from ctirf_live.data.tiff import write_ome_tiff


def acquisition_metadata(core: CMMCorePlus, optics: Optics, mode: str) -> dict[str, Any]:
    """State of the rig worth keeping with every frame: optics, stage, exposure, versions."""
    meta: dict[str, Any] = {
        "mode": mode,
        "optics": optics.model_dump(),
        "exposure_ms": core.getExposure(),
        "camera": core.getCameraDevice(),
        "binning": core.getProperty(core.getCameraDevice(), "Binning")
        if core.getCameraDevice()
        else None,
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "software": {"ctirf_live": __version__, "python": platform.python_version()},
    }
    if core.getXYStageDevice():
        x, y = core.getXYPosition()
        meta["stage_xy_um"] = [float(x), float(y)]
    if core.getFocusDevice():
        meta["stage_z_um"] = float(core.getPosition())
    return meta


def snap(
    core: CMMCorePlus,
    rig: RigInfo,
    mode: str = "EPI",
    objective: str | None = None,
    z_um: float | None = None,
    exposure_ms: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Snap one frame in `mode` (an Illumination preset); returns (image, metadata).

    `z_um` is checked against the stage limits (`stage_limits`) before anything moves.
    """
    if z_um is not None:
        stage_limits(core, rig.config_path).check("z", float(z_um), "--z")
    optics = set_objective(core, rig, objective) if objective else active_optics(core, rig)
    set_illumination(core, mode)
    if exposure_ms is not None:
        if exposure_ms <= 0:
            raise ConfigError("exposure must be positive (ms)")
        core.setExposure(exposure_ms)
    if z_um is not None:
        if not core.getFocusDevice():
            raise ConfigError("this rig has no focus device; drop --z")
        core.setPosition(float(z_um))
        core.waitForDevice(core.getFocusDevice())
    image = core.snap()
    return image, acquisition_metadata(core, optics, mode)


def save_snap(path: str | Path, image: np.ndarray, metadata: dict[str, Any]) -> Path:
    """Write a snapped frame as OME-TIFF with pixel size and acquisition metadata."""
    return write_ome_tiff(
        path,
        image,
        "YX",
        pixel_size_um=metadata["optics"]["pixel_size_um"],
        channel_names=[metadata["mode"]],
        metadata=metadata,
        name=f"ctirf snap {metadata['mode']}",
        optics=Optics(**metadata["optics"]),
        modes=[metadata["mode"]],
        exposure_ms=metadata.get("exposure_ms"),
        acquired=datetime.fromisoformat(metadata["timestamp"]),
    )
