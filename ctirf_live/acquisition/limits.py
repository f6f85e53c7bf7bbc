"""Stage travel limits, checked for every planned position before anything moves.

Micro-Manager has no generic stage-limit call, so limits come from, in order:

1. `<config>.limits.yaml` beside the .cfg (`x_um`, `y_um`, `z_um`: `[min, max]`),
   which the demo rig ships and a real rig can add;
2. the focus device's `Position` property limits, where its adapter declares them.

Axes with no known limits are not checked. A plan outside the limits raises
`ConfigError` naming the axis, the value and the limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctirf_live.config import ConfigError

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

Range = tuple[float, float]
AXES = ("x", "y", "z")


def limits_file_for(config_path: str | Path) -> Path:
    """`rig.cfg` -> `rig.limits.yaml` beside it."""
    path = Path(config_path)
    return path.with_name(path.stem + ".limits.yaml")


@dataclass(frozen=True)
class StageLimits:
    """Allowed stage positions in um (None: not known, not checked)."""

    x: Range | None = None
    y: Range | None = None
    z: Range | None = None

    def check(self, axis: str, value: float | None, what: str = "position") -> None:
        """Raise ConfigError when `value` is not a finite number inside the axis' limits."""
        if value is None:
            return
        if not math.isfinite(value):
            raise ConfigError(f"{what}: {axis} = {value} um is not a finite number")
        bounds = getattr(self, axis)
        if bounds is not None and not bounds[0] <= value <= bounds[1]:
            raise ConfigError(
                f"{what}: {axis} = {value:g} um is outside the stage limits "
                f"[{bounds[0]:g}, {bounds[1]:g}] um; fix the plan (nothing has moved)"
            )

    def check_sequence(self, sequence: Any) -> None:
        """Check the x, y, z of every event of a useq sequence (sub-sequences included)."""
        for event in sequence:
            where = f"event {dict(event.index)}"
            self.check("x", event.x_pos, where)
            self.check("y", event.y_pos, where)
            self.check("z", event.z_pos, where)


def _range(value: Any, name: str, source: Path) -> Range | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be [min, max] in um, got {value!r}") from None
    if not lo < hi:
        raise ConfigError(f"{source}: {name} must have min < max, got [{lo:g}, {hi:g}]")
    return lo, hi


def load_limits_file(path: str | Path) -> StageLimits:
    """Read `x_um`, `y_um`, `z_um` ranges from a YAML file; unknown keys are errors."""
    import yaml

    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must map x_um/y_um/z_um to [min, max]")
    unknown = sorted(set(doc) - {f"{a}_um" for a in AXES})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; use x_um, y_um or z_um")
    return StageLimits(*(_range(doc.get(f"{a}_um"), f"{a}_um", path) for a in AXES))


def _device_z_limits(core: CMMCorePlus) -> Range | None:
    focus = core.getFocusDevice()
    try:
        if focus and core.hasPropertyLimits(focus, "Position"):
            return core.getPropertyLowerLimit(focus, "Position"), core.getPropertyUpperLimit(
                focus, "Position"
            )
    except Exception:  # adapters without the property, or Python devices
        return None
    return None


def stage_limits(core: CMMCorePlus, config_path: str | Path | None) -> StageLimits:
    """The rig's limits: the limits file, else what the focus adapter declares."""
    file = limits_file_for(config_path) if config_path else None
    limits = load_limits_file(file) if file is not None and file.is_file() else StageLimits()
    if limits.z is None and (z := _device_z_limits(core)) is not None:
        limits = StageLimits(limits.x, limits.y, z)
    return limits
