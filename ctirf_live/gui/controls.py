"""Microscope controls from pymmcore-widgets, and the MDA editor wired to cTIRF.

`DevicePanel` gathers what a Micro-Manager user reaches for first: Snap/Live, exposure,
the Illumination (EPI/TIRF) and objective presets, XY stage and focus. `CtirfMDAWidget`
is pymmcore-widgets' MDA editor (channels, z, time, positions, grid; save/load of
sequences; a save box with folder, name and format) whose Run goes through the live
window, so each run also restores cTIRF and writes its store beside the raw one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from pymmcore_plus import CMMCorePlus
from pymmcore_widgets import (
    ExposureWidget,
    LiveButton,
    MDAWidget,
    PresetsWidget,
    SnapButton,
    StageWidget,
)
from qtpy.compat import isalive
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFormLayout, QGroupBox, QHBoxLayout, QVBoxLayout, QWidget

from ctirf_live.config import ILLUMINATION_GROUP, OBJECTIVE_GROUP
from ctirf_live.gui import icons

RunRequest = Callable[[Any, "Path | None"], None]
FORMATS = {".ome.tiff": "ome-tiff", ".ome.tif": "ome-tiff", ".ome.zarr": "ome-zarr"}
# pymmcore-widgets parts (0.12) that connect to the core without a `_disconnect`
CORE_SLOTS = {
    "PropertyWidget": (("propertyChanged", "_on_core_changed"),
                       ("systemConfigurationLoaded", "_on_config_loaded")),
    "CoreConnectedGridPlanWidget": (("systemConfigurationLoaded", "_update_fov_size"),
                                    ("pixelSizeChanged", "_update_fov_size"),
                                    ("roiSet", "_update_fov_size")),
}


def run_folder_and_format(save_path: str | Path) -> tuple[Path, str]:
    """The run folder and store format for the MDA widget's save path.

    pymmcore-widgets names one file (`dir/exp_001.ome.tiff`); a cTIRF run writes two
    stores, so they go into the folder `dir/exp_001/` as `raw.*` and `ctirf.*`.
    """
    path = Path(save_path)
    for suffix, fmt in FORMATS.items():
        if path.name.lower().endswith(suffix):
            return path.with_name(path.name[: -len(suffix)]), fmt
    raise ValueError(
        f"cannot save {path.name!r}: cTIRF runs are stored as OME-TIFF or OME-Zarr; "
        "choose ome-tiff or ome-zarr in the MDA's save box"
    )


def disconnect_widgets(root: QWidget) -> int:
    """Disconnect every pymmcore-widgets widget under `root` from its core, now.

    Those widgets disconnect on their `destroyed` signal, which does not reach them with
    PySide6 6.12 (measured: a deleted PresetsWidget still received propertyChanged), and
    the property browser's and grid plan's widgets have no disconnect at all. A window
    closed on a core that lives on (scripts, notebooks, tests) then left slots of
    deleted C++ widgets on the core's events, called at the next property change or
    MDA: exceptions, and a crash during the next z-stack. Returns how many widgets were
    disconnected.
    """
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Qt: "failed to disconnect"
        for widget in [root, *root.findChildren(QWidget)]:
            core = getattr(widget, "_mmc", None)
            if core is None:
                continue
            disconnect = getattr(widget, "_disconnect", None)
            if callable(disconnect):
                with suppress(Exception):  # half-connected or already disconnected
                    disconnect()
            for cls in type(widget).__mro__:
                for signal, slot in CORE_SLOTS.get(cls.__name__, ()):
                    with suppress(Exception):
                        getattr(core.events, signal).disconnect(getattr(widget, slot))
            count += 1
    return count


class _StageWidget(StageWidget):
    """StageWidget that does not re-assign the core's stage when it already is that one
    (UniMMCore refuses `setProperty("Core", "Focus", ...)` for Python devices, so the demo
    rig raised on every window; real rigs are unaffected)."""

    def _on_radiobutton_toggled(self, state: bool) -> None:
        core = self._mmc
        current = core.getXYStageDevice() if self._is_2axis else core.getFocusDevice()
        if state and current == self._device:
            return
        super()._on_radiobutton_toggled(state)


class _PresetsWidget(PresetsWidget):
    """PresetsWidget that compares the presets once a property change has settled.

    UniMMCore emits a Python device's propertyChanged before it caches the new value, so
    the stock widget matched the presets against the old cache and switched the selector
    back (Illumination set to TIRF, the selector showing EPI). Checking on the next turn
    of the event loop sees the cached value.
    """

    def _on_property_changed(self, device: str, property: str, value: str) -> None:
        if isalive(self):
            check = super()._on_property_changed
            QTimer.singleShot(0, self, lambda: check(device, property, value))


def stage_widget(device: str, core: CMMCorePlus) -> StageWidget:
    """pymmcore-widgets' stage control (its arrow icons come through `icons.install`)."""
    return _StageWidget(device, mmcore=core)


class DevicePanel(QWidget):
    """Snap/Live, exposure, illumination and objective presets, stage and focus."""

    def __init__(self, core: CMMCorePlus, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        icons.install()
        self.snap_button = SnapButton(mmcore=core)
        self.live_button = LiveButton(mmcore=core)
        self.exposure = ExposureWidget(mmcore=core)
        groups = set(core.getAvailableConfigGroups())
        self.illumination = _PresetsWidget(ILLUMINATION_GROUP, mmcore=core)
        self.objective = (
            _PresetsWidget(OBJECTIVE_GROUP, mmcore=core) if OBJECTIVE_GROUP in groups else None
        )

        buttons = QHBoxLayout()
        buttons.addWidget(self.snap_button)
        buttons.addWidget(self.live_button)
        form = QFormLayout()
        form.addRow("exposure", self.exposure)
        form.addRow("illumination", self.illumination)
        if self.objective is not None:
            form.addRow("objective", self.objective)

        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addLayout(form)
        self.stages: list[StageWidget] = []
        stages = ((core.getXYStageDevice(), "XY stage"), (core.getFocusDevice(), "focus"))
        for device, title in stages:
            if device:
                box = QGroupBox(f"{title} ({device})")
                inner = QVBoxLayout(box)
                stage = stage_widget(device, core)
                inner.addWidget(stage)
                self.stages.append(stage)
                layout.addWidget(box)
        layout.addStretch(1)


class CtirfMDAWidget(MDAWidget):
    """The MDA editor; Run hands the sequence and save path to `run(sequence, path)`."""

    def __init__(self, core: CMMCorePlus, run: RunRequest, parent: QWidget | None = None) -> None:
        super().__init__(mmcore=core, parent=parent)
        self._run_request = run

    def execute_mda(self, output: Any) -> None:
        """Run through the live window (not `core.run_mda` alone): cTIRF, two stores."""
        path = Path(output) if isinstance(output, str | Path) else None
        self._run_request(self.value(), path)
