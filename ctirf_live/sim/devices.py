"""pymmcore-plus Python devices bound to the shared `SimulatedMicroscope`.

`acquisition_configs/ctirf_demo.cfg` loads these with `UniMMCore` (`#py pyDevice,...`).
Config loading instantiates the classes with no arguments and a device's `self.core`
is a restricted proxy, so the devices cannot see each other: they all read and write
the one microscope returned by `ctirf_live.sim.scope.get_microscope()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from pymmcore_plus.experimental.unicore import (
    CameraDevice,
    ShutterDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
    pymm_property,
)

from ctirf_live.sim.scope import SENSOR_SHAPE, SimulatedMicroscope, get_microscope, reset_microscope

ILLUMINATION_LABELS = {0: "EPI", 1: "TIRF"}
OBJECTIVE_LABELS = {0: "60X", 1: "100X"}
BINNINGS = (1, 2, 4)


def _scope() -> SimulatedMicroscope:
    return get_microscope()


class SimCamera(CameraDevice):
    """A 2048x2048 sCMOS camera with hardware-style ROI and binning.

    Only the ROI is rendered (the simulator is asked for exactly the pixels read out).
    With `RealTime` on, each frame takes at least its exposure time, as a real camera.
    """

    def __init__(self) -> None:
        super().__init__()
        self._real_time = True

    def get_exposure(self) -> float:
        return float(_scope().exposure_ms)

    def set_exposure(self, exposure: float) -> None:
        exposure = float(exposure)  # config files hand properties over as strings
        if exposure <= 0:
            raise ValueError("exposure must be positive (ms)")
        _scope().exposure_ms = float(exposure)

    def get_binning(self) -> int:
        return int(_scope().binning)

    def set_binning(self, value: int) -> None:
        value = int(value)
        if value not in BINNINGS:
            raise ValueError(f"binning must be one of {BINNINGS}")
        scope = _scope()
        with scope.lock:
            x, y, w, h = scope.roi
            scope.binning = value
            # keep the ROI a whole number of binned pixels
            scope.roi = (x, y, w - w % value, h - h % value)

    def shape(self) -> tuple[int, int]:
        scope = _scope()
        _, _, w, h = scope.roi
        return (h // scope.binning, w // scope.binning)

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def get_roi(self) -> tuple[int, int, int, int]:
        return tuple(_scope().roi)  # type: ignore[return-value]

    def set_roi(self, x: int, y: int, width: int, height: int) -> None:
        sh, sw = SENSOR_SHAPE
        if x < 0 or y < 0 or width <= 0 or height <= 0 or x + width > sw or y + height > sh:
            raise ValueError(
                f"ROI ({x}, {y}, {width}, {height}) is outside the {sw}x{sh} sensor"
            )
        _scope().roi = (int(x), int(y), int(width), int(height))

    def clear_roi(self) -> None:
        sh, sw = SENSOR_SHAPE
        _scope().roi = (0, 0, sw, sh)

    @pymm_property(limits=(0, 1), name="RealTime", property_type=int)
    def real_time(self) -> int:
        """1: a frame takes at least its exposure time; 0: render as fast as possible."""
        return int(self._real_time)

    @real_time.setter
    def real_time(self, value: int) -> None:
        self._real_time = bool(int(value))

    @pymm_property(limits=(0, 2**31 - 1), name="Seed", property_type=int)
    def seed(self) -> int:
        """Seed of the simulated slide; setting it loads a new slide (same state otherwise)."""
        return int(_scope().seed)

    @seed.setter
    def seed(self, value: int) -> None:
        old = _scope()
        if int(value) != old.seed:
            new = reset_microscope(seed=int(value))
            with old.lock:
                new.xy_um, new.z_um = old.xy_um, old.z_um
                new.objective, new.exposure_ms = old.objective, old.exposure_ms
                new.roi, new.binning = old.roi, old.binning

    def start_sequence(
        self,
        n: int | None,
        get_buffer: Callable[[Sequence[int], np.dtype], np.ndarray],
    ) -> Iterator[Mapping]:
        scope = _scope()
        count = 0
        while n is None or count < n:
            t0 = time.perf_counter()
            frame = scope.snap()
            buf = get_buffer(frame.shape, frame.dtype)
            buf[:] = frame
            if self._real_time:
                remaining = scope.exposure_ms / 1000.0 - (time.perf_counter() - t0)
                if remaining > 0:
                    time.sleep(remaining)
            count += 1
            yield self._frame_metadata(scope)

    @staticmethod
    def _frame_metadata(scope: SimulatedMicroscope) -> dict[str, str]:
        dy, dx = scope.drift_px
        return {
            "SimIllumination": scope.illumination,
            "SimObjective": scope.objective,
            "SimDriftPx": f"{dy:.4f},{dx:.4f}",
            "SimZUm": f"{scope.z_um:.4f}",
            "SimPenetrationDepthUm": f"{scope.penetration_depth_um:.4f}",
        }


class SimZStage(StageDevice):
    """Focus drive: `z_um` is the focal plane height above the coverslip."""

    def set_position_um(self, val: float) -> None:
        _scope().z_um = float(val)

    def get_position_um(self) -> float:
        return float(_scope().z_um)

    def home(self) -> None:
        _scope().z_um = 0.0

    def stop(self) -> None:
        """Moves are instantaneous: nothing to stop."""

    def set_origin(self) -> None:
        """The simulated focus is absolute (0 = coverslip); origin is fixed."""


class SimXYStage(XYStageDevice):
    """XY stage over the virtual slide; positions in micrometres."""

    def set_position_um(self, x: float, y: float) -> None:
        _scope().xy_um = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        x, y = _scope().xy_um
        return (float(x), float(y))

    def home(self) -> None:
        _scope().xy_um = (0.0, 0.0)

    def stop(self) -> None:
        """Moves are instantaneous: nothing to stop."""

    def set_origin_x(self) -> None:
        """The slide coordinates are absolute; origin is fixed."""

    def set_origin_y(self) -> None:
        """The slide coordinates are absolute; origin is fixed."""


class SimIllumination(StateDevice):
    """EPI/TIRF switch (a motorised TIRF stage on a real rig), with the TIRF angle."""

    def __init__(self) -> None:
        super().__init__(ILLUMINATION_LABELS)

    def get_state(self) -> int:
        return 0 if _scope().illumination == "EPI" else 1

    def set_state(self, position: int) -> None:
        _scope().set_illumination(ILLUMINATION_LABELS[int(position)])

    @pymm_property(limits=(0.0, 90.0), name="TIRFAngle", property_type=float)
    def tirf_angle_deg(self) -> float:
        """Incidence angle in the immersion medium; sets the evanescent penetration depth."""
        return float(_scope().tirf_angle_deg)

    @tirf_angle_deg.setter
    def tirf_angle_deg(self, value: float) -> None:
        _scope().tirf_angle_deg = float(value)


class SimObjective(StateDevice):
    """Objective turret: 60X/1.5 oil and 100X/1.5 oil."""

    def __init__(self) -> None:
        super().__init__(OBJECTIVE_LABELS)

    def get_state(self) -> int:
        return 0 if _scope().objective == "60X" else 1

    def set_state(self, position: int) -> None:
        _scope().objective = OBJECTIVE_LABELS[int(position)]


class SimShutter(ShutterDevice):
    """Excitation shutter: closed gives dark frames (offset + read noise)."""

    def get_open(self) -> bool:
        return bool(_scope().shutter_open)

    def set_open(self, open: bool) -> None:
        _scope().shutter_open = bool(open)
