"""Which objective a run images with, and whether the model was trained for it.

A model restores the optics it was trained on: another objective (NA, wavelength, pixel
size) gives plausible-looking but wrong cTIRF. Every acquiring command selects the
objective first (`--objective`) and refuses a model made for other optics, naming both
and the fix: switch to the model's objective, or fine-tune the model to this one.
"""

from __future__ import annotations

from pymmcore_plus import CMMCorePlus

from ctirf_live.acquisition.core import RigInfo, active_optics, set_objective
from ctirf_live.config import ConfigError, Optics

PIXEL_TOLERANCE = 0.05  # relative
NA_TOLERANCE = 0.02
WAVELENGTH_TOLERANCE_NM = 20.0


def select_objective(core: CMMCorePlus, rig: RigInfo, objective: str | None) -> Optics | None:
    """Switch to `objective` when given; the optics the rig now images with (None when the
    rig cannot tell which objective is in use and none was given)."""
    if objective is not None:
        return set_objective(core, rig, objective)
    try:
        return active_optics(core, rig)
    except ConfigError:
        return None


def _differences(model: Optics, data: Optics) -> list[str]:
    found = []
    if model.objective != data.objective:
        found.append("objective")
    if abs(data.pixel_size_um / model.pixel_size_um - 1) > PIXEL_TOLERANCE:
        found.append("pixel size")
    if abs(data.na - model.na) > NA_TOLERANCE:
        found.append("NA")
    if abs(data.emission_wavelength_nm - model.emission_wavelength_nm) > WAVELENGTH_TOLERANCE_NM:
        found.append("emission wavelength")
    return found


def _short(optics: Optics) -> str:
    return (
        f"{optics.objective} (NA {optics.na:g}, {optics.emission_wavelength_nm:g} nm, "
        f"{optics.pixel_size_um * 1000:g} nm pixels)"
    )


def optics_mismatch(model: Optics, data: Optics, rig: RigInfo | None = None) -> str | None:
    """One line naming the model's and the rig's optics and the fix, or None if they agree."""
    differ = _differences(model, data)
    if not differ:
        return None
    if model.objective != data.objective and rig is not None and model.objective in rig.objectives:
        fix = (
            f"pass --objective {model.objective} to image with the model's objective, or "
            f"fine-tune it to {data.objective}"
        )
    else:
        fix = f"fine-tune it to {data.objective}"
    return (
        f"the model was trained for {_short(model)} but the rig images with {_short(data)} "
        f"({', '.join(differ)} differ); {fix}: ctirf calibrate -c CONFIG --objective "
        f"{data.objective} -o PAIRS, then ctirf finetune --data PAIRS -m MODEL -o NEW_MODEL"
    )


def check_model_optics(model: Optics, data: Optics | None, rig: RigInfo | None = None) -> None:
    """Raise ConfigError when a model does not fit the optics a rig images with."""
    if data is not None and (msg := optics_mismatch(model, data, rig)):
        raise ConfigError(msg)
