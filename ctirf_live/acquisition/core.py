"""Load a Micro-Manager configuration and check that the rig can do cTIRF.

A rig is usable when it has the config group `Illumination` with presets `EPI` and
`TIRF`, pixel-size configs, and optics (NA, emission wavelength, immersion index) for
its objective(s) from `<config>.optics.yaml` or the command line.

Cores are opened through `open_core`, which releases them on exit: pymmcore-plus
cores abort at interpreter shutdown in a large fraction of runs unless they are
released first (see DESIGN.md, "Known pitfalls").
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pymmcore_plus import CMMCorePlus

from ctirf_live.config import (
    EPI_PRESET,
    ILLUMINATION_GROUP,
    OBJECTIVE_GROUP,
    TIRF_PRESET,
    ConfigError,
    Optics,
    load_optics_file,
)

log = logging.getLogger(__name__)

PY_DEVICE_PREFIX = "#py "
DEMO_ROI = 512
Signals = Literal["psygnal", "qt", "auto"]
RELEASE_TIMEOUT_S = 30.0


def optics_file_for(config_path: str | Path) -> Path:
    """`rig.cfg` -> `rig.optics.yaml` beside it."""
    path = Path(config_path)
    return path.with_name(path.stem + ".optics.yaml")


def _uses_python_devices(text: str) -> bool:
    return any(line.strip().startswith(PY_DEVICE_PREFIX) for line in text.splitlines())


def load_core(config_path: str | Path, signals: Signals = "psygnal") -> CMMCorePlus:
    """Return a core with `config_path` loaded.

    Configs with `#py` Python-device lines (the demo rig) load into `UniMMCore`; plain
    Micro-Manager configs load into `CMMCorePlus` with the user's installed adapters.
    Prefer `open_core`, which also releases the core.

    `signals`: the core's event backend. "psygnal" (default) delivers MDA events on the
    acquisition thread, which the blocking calls (acquire, calibrate, the demo) rely on:
    with Qt signals, which pymmcore-plus picks whenever a QApplication exists or
    pymmcore-widgets was imported, events are queued to a main thread that is busy
    waiting for the run, and never arrive. The live window asks for "qt".
    """
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}; pass --config with a Micro-Manager .cfg "
            "(acquisition_configs/ctirf_demo.cfg runs the simulated rig)"
        )
    text = path.read_text(errors="replace")
    with _signals_backend(signals):
        core = _new_core(text)
    try:
        core.loadSystemConfiguration(str(path))
        problem = None
    except Exception as exc:  # pymmcore raises several types; all mean a bad config
        lines = str(exc).strip().splitlines()
        problem = " ".join(lines[:2]) if lines else type(exc).__name__
    if problem is not None:
        # release outside the except block so no traceback keeps the core alive
        _release(core)
        del core
        gc.collect()
        raise ConfigError(
            f"could not load {path}: {problem}; fix the config in Micro-Manager's "
            "Hardware Configuration Wizard or see acquisition_configs/README.md"
        )
    if _uses_python_devices(text) and core.getCameraDevice():
        _centre_roi(core, DEMO_ROI)
    return core


def _new_core(text: str) -> CMMCorePlus:
    """The core class the config needs (UniMMCore for `#py` Python devices)."""
    if _uses_python_devices(text):
        from pymmcore_plus.experimental.unicore import UniMMCore

        core: CMMCorePlus = _quietly(_python_device_core_class(UniMMCore))
        if "ctirf_live.sim" in text:
            from ctirf_live.sim.scope import reset_microscope

            reset_microscope()
        return core
    return CMMCorePlus()


@contextmanager
def _signals_backend(signals: Signals) -> Iterator[None]:
    """pymmcore-plus reads PYMM_SIGNALS_BACKEND when a core is made: set it for that."""
    old = os.environ.get("PYMM_SIGNALS_BACKEND")
    os.environ["PYMM_SIGNALS_BACKEND"] = signals
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYMM_SIGNALS_BACKEND", None)
        else:
            os.environ["PYMM_SIGNALS_BACKEND"] = old


def _python_device_core_class(base: type[CMMCorePlus]) -> type[CMMCorePlus]:
    """UniMMCore whose pixel-size lookup also sees Python devices.

    UniMMCore (pymmcore-plus 0.18) asks the C++ core for the current pixel-size config,
    which cannot read Python devices' properties, so rigs whose objective is a Python
    device report 0 um. This subclass matches the configs against the live properties.
    """

    class PythonDeviceCore(base):  # type: ignore[misc, valid-type]
        def getCurrentPixelSizeConfig(self, cached: bool = False) -> str:
            found = super().getCurrentPixelSizeConfig(cached)
            return found or matching_pixel_config(self)

        def getPixelSizeUm(self, cached: bool = False) -> float:
            value = super().getPixelSizeUm(cached)
            if value or not (name := self.getCurrentPixelSizeConfig(cached)):
                return value
            camera = self.getCameraDevice()
            binning = float(self.getProperty(camera, "Binning")) if camera else 1.0
            return self.getPixelSizeUmByID(name) * binning / self.getMagnificationFactor()

    return PythonDeviceCore


def matching_pixel_config(core: CMMCorePlus) -> str:
    """Name of the pixel-size config whose device settings all match the rig's state."""
    for name in core.getAvailablePixelSizeConfigs():
        settings = list(core.getPixelSizeConfigData(name))
        if settings and all(
            str(core.getProperty(dev, prop)) == str(val) for dev, prop, val in settings
        ):
            return name
    return ""


def _quietly(factory: type[CMMCorePlus]) -> CMMCorePlus:
    """Build a Python-device core without pymmcore-plus's 'no Micro-Manager found' error log.

    The demo rig needs no Micro-Manager adapters, so the search for them is noise.
    """
    mm_log = logging.getLogger("pymmcore-plus")
    level = mm_log.level
    mm_log.setLevel(logging.CRITICAL)
    try:
        return factory()
    finally:
        mm_log.setLevel(level)


def _centre_roi(core: CMMCorePlus, size: int) -> None:
    width, height = core.getImageWidth(), core.getImageHeight()
    if width > size and height > size:
        core.setROI((width - size) // 2, (height - size) // 2, size, size)


def wait_for_mda_end(core: CMMCorePlus, timeout: float = RELEASE_TIMEOUT_S) -> bool:
    """Cancel a running MDA and wait (Ctrl-C-proof) until it has ended; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not core.mda.is_running():
                return True
            core.mda.cancel()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        except KeyboardInterrupt:
            continue


def _release(core: CMMCorePlus) -> None:
    """Unload the devices, but never under a running MDA (cancel it and wait first)."""
    try:
        if not wait_for_mda_end(core):
            log.error("MDA still running after %.0f s; devices left loaded", RELEASE_TIMEOUT_S)
            return
        core.unloadAllDevices()
    except Exception as exc:  # releasing must never mask the real error
        log.debug("error while releasing core: %s", exc)


@contextmanager
def open_core(config_path: str | Path, signals: Signals = "psygnal") -> Iterator[CMMCorePlus]:
    """Load a config, yield the core, and release it (devices unloaded, object freed).

    `signals`: the core's event backend, as in `load_core` ("qt" for a Qt window)."""
    core = load_core(config_path, signals)
    try:
        yield core
    finally:
        _release(core)
        del core
        gc.collect()


@dataclass
class RigInfo:
    """What ctirf-live needs to know about a loaded rig."""

    config_path: Path
    illumination_presets: tuple[str, ...]
    objectives: dict[str, Optics] = field(default_factory=dict)
    objective_presets: tuple[str, ...] = ()

    def optics_for(self, objective: str) -> Optics:
        """Optics of one objective preset, with a clear error when it has none."""
        if objective not in self.objectives:
            known = ", ".join(sorted(self.objectives)) or "none"
            raise ConfigError(
                f"objective {objective!r} has no optics (known: {known}); add it to "
                f"{optics_file_for(self.config_path).name} (see acquisition_configs/README.md)"
            )
        return self.objectives[objective]


def check_rig(
    core: CMMCorePlus,
    config_path: str | Path,
    optics: dict[str, Optics] | None = None,
) -> RigInfo:
    """Check a loaded rig for what cTIRF needs; raise ConfigError naming the first gap.

    `optics` overrides/extends what `<config>.optics.yaml` provides.
    """
    config_path = Path(config_path)
    groups = set(core.getAvailableConfigGroups())
    if ILLUMINATION_GROUP not in groups:
        raise ConfigError(
            f"{config_path.name} has no config group {ILLUMINATION_GROUP!r}; add one with "
            f"presets {EPI_PRESET!r} and {TIRF_PRESET!r} (see acquisition_configs/README.md)"
        )
    presets = tuple(core.getAvailableConfigs(ILLUMINATION_GROUP))
    missing = [p for p in (EPI_PRESET, TIRF_PRESET) if p not in presets]
    if missing:
        raise ConfigError(
            f"config group {ILLUMINATION_GROUP!r} lacks preset(s) {', '.join(missing)} "
            f"(has: {', '.join(presets) or 'none'}); add them in {config_path.name}"
        )
    if not core.getAvailablePixelSizeConfigs():
        raise ConfigError(
            f"{config_path.name} defines no pixel size; add a pixel-size config "
            "(PixelSize_um) for each objective"
        )
    objectives: dict[str, Optics] = {}
    opt_file = optics_file_for(config_path)
    if opt_file.is_file():
        objectives.update(load_optics_file(opt_file))
    objectives.update(optics or {})
    objective_presets = (
        tuple(core.getAvailableConfigs(OBJECTIVE_GROUP)) if OBJECTIVE_GROUP in groups else ()
    )
    if not objectives:
        raise ConfigError(
            f"no optics for {config_path.name}: create {opt_file.name} beside it (NA, "
            "emission wavelength, immersion index per objective; see acquisition_configs/README.md)"
        )
    return RigInfo(config_path, presets, objectives, objective_presets)


def current_objective(core: CMMCorePlus, rig: RigInfo) -> str:
    """The active objective preset, or the only known objective on single-objective rigs."""
    if rig.objective_presets:
        name = core.getCurrentConfig(OBJECTIVE_GROUP)
        if name:
            return name
    if len(rig.objectives) == 1:
        return next(iter(rig.objectives))
    raise ConfigError(
        f"cannot tell which objective is in use; define config group {OBJECTIVE_GROUP!r} "
        "or pass --objective"
    )


def set_objective(core: CMMCorePlus, rig: RigInfo, objective: str) -> Optics:
    """Switch to an objective preset and return its optics (pixel size from the core)."""
    rig.optics_for(objective)  # fail before moving anything when there are no optics
    if rig.objective_presets:
        if objective not in rig.objective_presets:
            raise ConfigError(
                f"unknown objective preset {objective!r}; available: "
                f"{', '.join(rig.objective_presets)}"
            )
        core.setConfig(OBJECTIVE_GROUP, objective)
        core.waitForConfig(OBJECTIVE_GROUP, objective)
    return active_optics(core, rig, objective)


def active_optics(core: CMMCorePlus, rig: RigInfo, objective: str | None = None) -> Optics:
    """Optics of the active objective, pixel size taken from Micro-Manager (binning included)."""
    objective = objective or current_objective(core, rig)
    optics = rig.optics_for(objective)
    pixel = core.getPixelSizeUm()
    if pixel > 0:
        optics = optics.model_copy(update={"pixel_size_um": float(pixel)})
    return optics


def set_illumination(core: CMMCorePlus, mode: str) -> None:
    """Switch the Illumination group to EPI or TIRF, with a clear error for other names."""
    presets = core.getAvailableConfigs(ILLUMINATION_GROUP)
    if mode not in presets:
        raise ConfigError(f"unknown illumination preset {mode!r}; available: {', '.join(presets)}")
    core.setConfig(ILLUMINATION_GROUP, mode)
    core.waitForConfig(ILLUMINATION_GROUP, mode)
