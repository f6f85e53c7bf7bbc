"""Microscope controls from pymmcore-widgets, and the MDA editor wired to cTIRF.

`DevicePanel` gathers what a Micro-Manager user reaches for first: Snap/Live, exposure,
the Illumination (EPI/TIRF) and objective presets, XY stage and focus. `CtirfMDAWidget`
is pymmcore-widgets' MDA editor (channels, z, time, positions, grid; save/load of
sequences; a save box with folder, name and format) whose Run goes through the live
window, so each run also restores cTIRF and writes its store beside the raw one.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
from qtpy.QtWidgets import QFormLayout, QGroupBox, QHBoxLayout, QVBoxLayout, QWidget

from ctirf_live.config import ILLUMINATION_GROUP, OBJECTIVE_GROUP

log = logging.getLogger(__name__)

RunRequest = Callable[[Any, "Path | None"], None]
FORMATS = {".ome.tiff": "ome-tiff", ".ome.tif": "ome-tiff", ".ome.zarr": "ome-zarr"}


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


@contextmanager
def generated_icons() -> Iterator[None]:
    """Plain stand-in icons while iconify.design cannot be reached.

    pymmcore-widgets and superqt fetch their icons from iconify.design once and cache
    them; offline (common on microscope PCs) superqt falls back by itself, but the stage
    widget's arrows raise. Inside this block both get a generated dot in the requested
    colour instead (the arrow buttons keep their positions, so directions stay clear).
    """
    import pymmcore_widgets.control._stage_widget as stage_module
    import superqt.iconify as iconify

    folder = Path(tempfile.mkdtemp(prefix="ctirf-icons-"))

    def svg_path(*key: str, color: str | None = None, **kwargs: Any) -> Path:
        fill = color or "#808080"
        path = folder / f"{abs(hash((key, fill)))}.svg"
        if not path.exists():
            path.write_text(
                '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24">'
                f'<circle cx="12" cy="12" r="7" fill="{fill}"/></svg>'
            )
        return path

    saved = stage_module.svg_path, iconify.svg_path
    stage_module.svg_path = iconify.svg_path = svg_path
    try:
        yield
    finally:
        stage_module.svg_path, iconify.svg_path = saved


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


def stage_widget(device: str, core: CMMCorePlus) -> StageWidget:
    """pymmcore-widgets' stage control; with generated icons when iconify is unreachable."""
    try:
        return _StageWidget(device, mmcore=core)
    except OSError as exc:
        log.warning("stage icons unavailable (%s); using plain ones", exc)
        with generated_icons():
            return _StageWidget(device, mmcore=core)


class DevicePanel(QWidget):
    """Snap/Live, exposure, illumination and objective presets, stage and focus."""

    def __init__(self, core: CMMCorePlus, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.snap_button = SnapButton(mmcore=core)
        self.live_button = LiveButton(mmcore=core)
        self.exposure = ExposureWidget(mmcore=core)
        groups = set(core.getAvailableConfigGroups())
        self.illumination = PresetsWidget(ILLUMINATION_GROUP, mmcore=core)
        self.objective = (
            PresetsWidget(OBJECTIVE_GROUP, mmcore=core) if OBJECTIVE_GROUP in groups else None
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
