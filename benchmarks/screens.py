"""Screenshots of the live window's main states, with the shipped model on the demo rig.

    nice -n 10 env QT_QPA_PLATFORM=offscreen .venv/bin/python -m benchmarks.screens \
        --out docs/screens

States: idle after an EPI snap (raw | cTIRF), after an MDA time-lapse, and a 6-plane
z-stack with the XZ views (`--state` picks some). The canvases must really draw: pygfx
(wgpu; headless with Mesa's lavapipe, `apt install mesa-vulkan-drivers`); otherwise this
stops with a message.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("PYMM_SIGNALS_BACKEND", "qt")

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = REPO / "acquisition_configs" / "ctirf_demo.cfg"
MODEL = "et2dnet_s0_60x_sim"
SIZE = (1400, 820)


def wait_until(app, condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Run the Qt event loop until `condition()` holds (or fail naming `what`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.02)


def settle(app, seconds: float) -> None:
    """Let the canvases draw what they were given."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def save(window, path: Path) -> None:
    """Grab the window into a PNG (written beside, then moved into place)."""
    tmp = path.with_suffix(".tmp.png")
    if not window.grab().save(str(tmp), "PNG"):
        raise SystemExit(f"could not write {tmp}")
    tmp.replace(path)
    print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")


STATES = ("snap", "mda", "zstack")


def take_screen(app, window, state: str, out: Path) -> None:
    """One state: idle after an EPI snap, after a time-lapse, or a z-stack with XZ views."""
    import useq

    window.core.setConfig("Illumination", "EPI")
    if state == "snap":
        window.snap()
        wait_until(app, lambda: window.ctirf_pane.shown_plane() is not None, 120, "cTIRF")
    else:
        plan = ({"time_plan": {"interval": 0, "loops": 4}} if state == "mda"
                else {"z_plan": {"range": 1.0, "step": 0.2}})
        window.run_mda(useq.MDASequence(**plan))
    wait_until(app, lambda: window._mode == "idle", 300, f"the {state} run to finish")
    if state == "zstack":
        window.ctirf_pane.set_index({"z": 2})
    settle(app, 3.0)
    save(window, out / f"live_window_{state}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screens")
    parser.add_argument("--roi", type=int, default=256, help="camera ROI (px, square)")
    parser.add_argument("--state", choices=STATES, action="append",
                        help="state(s) to grab (default: all; one process per state is "
                        "steadier on lavapipe, whose wgpu poller thread crashed here)")
    args = parser.parse_args(argv)

    from qtpy.QtWidgets import QApplication

    from ctirf_live.acquisition.core import check_rig, open_core
    from ctirf_live.gui.backend import canvas_renders
    from ctirf_live.gui.live_window import LiveWindow
    from ctirf_live.inference.live import LiveProcessor
    from ctirf_live.inference.restorer import Restorer

    app = QApplication.instance() or QApplication(sys.argv[:1])
    if not canvas_renders():
        print("no canvas backend draws here (pygfx needs a Vulkan driver, e.g. "
              "apt install mesa-vulkan-drivers); no screenshots taken", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    restorer = Restorer(MODEL, device="cpu", tile=512)
    with open_core(DEMO_CFG) as core:
        rig = check_rig(core, DEMO_CFG)
        core.setProperty("Camera", "RealTime", "0")
        size = core.getImageWidth()
        core.setROI((size - args.roi) // 2, (size - args.roi) // 2, args.roi, args.roi)
        processor = LiveProcessor(restorer, policy="record")
        window = LiveWindow(core, processor, rig=rig)
        window.resize(*SIZE)
        window.show()
        try:
            for state in args.state or STATES:
                take_screen(app, window, state, args.out)
        finally:
            window.close()
            window.deleteLater()
            app.processEvents()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
