"""ctirf-live: computational TIRF (cTIRF) inside the microscope's acquisition loop.

The public API, imported lazily so `import ctirf_live` stays light (no torch until a
model is needed)::

    from ctirf_live import Restorer, LiveProcessor, calibrate, open_core, train, finetune
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Optics": "ctirf_live.config",
    "open_core": "ctirf_live.acquisition.core",
    "check_rig": "ctirf_live.acquisition.core",
    "calibrate": "ctirf_live.acquisition.calibration",
    "run_mda": "ctirf_live.acquisition.mda",
    "PairedDataset": "ctirf_live.data.dataset",
    "PairSource": "ctirf_live.data.loaders",
    "ET2dNet": "ctirf_live.models.etnet",
    "ET3dNet": "ctirf_live.models.etnet",
    "load_model": "ctirf_live.models.etnet",
    "train": "ctirf_live.training.trainer",
    "finetune": "ctirf_live.training.trainer",
    "Restorer": "ctirf_live.inference.restorer",
    "LiveProcessor": "ctirf_live.inference.live",
    "acquire": "ctirf_live.inference.acquire",
    "SimulatedMicroscope": "ctirf_live.sim.scope",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ctirf_live' has no attribute {name!r}")
