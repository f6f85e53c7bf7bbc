"""The README's "workflow on a real rig" block, run as written on the simulated rig.

The commands are parsed out of README.md and run in order in a fresh folder; the test
only makes them small, by appending options every command documents (later options win):
fewer pairs and epochs, a binned camera in `$CFG` (the README says "or your rig's
config"), and the README's sequence file with fewer, faster time points. The live window
is opened and closed as a user would (in the slow variant). Output is not a terminal, so
every long step must log timestamped progress lines.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from conftest import REPO, write_cfg_variant
from test_ome_validation import check_ome_tiff
from typer.testing import CliRunner

from ctirf_live.cli import app

README = REPO / "README.md"
SECTION = "## The workflow on a real rig"
PIXEL_100X_BIN4 = 0.065 * 4
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d (.+) \(\d+ s[^()]*\)$", re.M)


def workflow_block() -> tuple[dict[str, str], list[list[str]]]:
    """The variables (`CFG=...`) and the `ctirf` commands of the README's workflow block."""
    text = README.read_text()
    if SECTION not in text:
        raise AssertionError(f"README.md has no section {SECTION!r}")
    block = re.search(r"```bash\n(.*?)```", text.split(SECTION, 1)[1], re.S)
    assert block, "the workflow section has no ```bash block"
    variables: dict[str, str] = {}
    commands: list[list[str]] = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] == "source":
            continue
        if len(words) == 1 and "=" in words[0]:
            name, value = words[0].split("=", 1)
            variables[name] = value
            continue
        assert words[0] == "ctirf", f"not a ctirf command in the README workflow: {line}"
        commands.append(words[1:])
    return variables, commands


def _expand(words: list[str], variables: dict[str, str]) -> list[str]:
    return [re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], w) for w in words]


def _option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _small_rig(tmp_path: Path) -> Path:
    """The demo rig with the camera binned 4x (128 x 128 frames) and no real-time waits."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = write_cfg_variant(tmp_path, drop=("RealTime",), name="rig")
    with cfg.open("a") as fh:
        fh.write("#py Property,Camera,RealTime,0\n#py Property,Camera,Binning,4\n")
    return cfg


def _small_sequence(path: Path, out: Path) -> Path:
    """The README's sequence file with two time points and no interval."""
    seq = yaml.safe_load(path.read_text())
    seq["time_plan"] = {"interval": 0, "loops": 2}
    out.write_text(yaml.safe_dump(seq))
    return out


def _close_live_window_soon() -> list[str]:
    """Close the live window (what a user does: look, then close it); returns what it showed."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from ctirf_live.gui.live_window import LiveWindow

    seen: list[str] = []

    def close() -> None:
        windows = [w for w in QApplication.topLevelWidgets() if isinstance(w, LiveWindow)]
        if not windows:
            QTimer.singleShot(200, close)
            return
        seen.append(str(windows[0].model_combo.currentData()))
        windows[0].close()

    QTimer.singleShot(500, close)
    guard = QTimer(QApplication.instance())  # never hang the suite if it failed to close
    guard.setSingleShot(True)
    guard.timeout.connect(QApplication.quit)
    guard.start(60000)
    return seen


def test_readme_has_the_whole_workflow() -> None:
    variables, commands = workflow_block()
    assert Path(REPO / variables["CFG"]).is_file()
    assert [c[0] for c in commands] == [
        "calibrate", "finetune", "acquire", "live", "process", "evaluate"
    ]
    for words in commands:
        for path in [w for w in words if w.startswith("acquisition_configs/")]:
            assert (REPO / path).is_file(), f"the README names {path}, which is not shipped"


@pytest.mark.parametrize(
    "with_window",
    [
        False,
        # the live window offline waits for its stage icons (~50 s here): slow run only
        pytest.param(True, marks=pytest.mark.slow),
    ],
    ids=["headless", "with-live-window"],
)
def test_readme_workflow_runs_as_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    with_window: bool,
) -> None:
    """Every command of the block in order; `headless` leaves out `ctirf live` (whose
    command line test_live_window also runs), the slow run opens and closes it too."""
    variables, commands = workflow_block()
    if not with_window:
        commands = [c for c in commands if c[0] != "live"]
    variables["CFG"] = str(_small_rig(tmp_path / "rig"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    small = {
        "calibrate": ["--pairs", "2"],
        "finetune": ["--epochs", "1", "--crop", "64", "--device", "cpu"],
        "acquire": ["--device", "cpu", "--tile", "128"],
        "live": ["--device", "cpu"],
        "process": ["--device", "cpu", "--tile", "128"],
        "evaluate": ["--device", "cpu", "--baselines", "rl,bf"],
    }
    logs: dict[str, str] = {}
    for words in commands:
        args = _expand(words, variables)
        name = args[0]
        extra = list(small[name])
        if name == "acquire":
            sequence = REPO / _option(args, "--sequence")
            extra += ["--sequence", str(_small_sequence(sequence, tmp_path / "seq.yaml"))]
        seen = None
        if name == "live":
            request.getfixturevalue("qtbot")  # a QApplication, cleaned up after the test
            seen = _close_live_window_soon()
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, f"ctirf {' '.join(args)}:\n{result.output}"
        if name != "live":  # the window's widgets log to the same stream (their own tests)
            assert "Traceback" not in result.output, result.output
        if seen is not None:
            assert seen, "the live window never opened"
        logs[name] = result.output

    # every long step said how far it got, in timestamped lines (output is not a terminal)
    progress = {name: PROGRESS.findall(text) for name, text in logs.items()}
    assert "calibrating: 2/2 pairs, 0 rejected" in progress["calibrate"]
    assert any(line.startswith("done: 12/12 frames") for line in progress["acquire"])
    assert "cTIRF: 12/12 planes" in progress["process"]
    assert "scoring pairs: 2/2" in progress["evaluate"]
    assert re.search(r"^epoch 1/1: train loss \d", logs["finetune"], re.M)

    # what the README says each step leaves behind
    assert len(list((work / "pairs_100x").glob("pair_*.ome.tif"))) == 2
    assert (work / "model_100x" / "best.safetensors").is_file()
    assert not (work / "model_100x" / "resume.state").exists()  # removed once complete
    with tifffile.TiffFile(work / "run1" / "raw.ome.tiff") as tif:
        assert tif.series[0].shape == (2, 6, 128, 128)  # t, z (6 planes, 0.2 um), y, x
    with tifffile.TiffFile(work / "run1" / "ctirf.ome.tiff") as tif:
        ctirf = tif.series[0].asarray()
    assert ctirf.shape == (2, 6, 128, 128) and np.isfinite(ctirf).all() and ctirf.max() > 0
    with tifffile.TiffFile(work / "run1_offline.ome.tiff") as tif:
        offline = tif.series[0].asarray()
    assert offline.shape == ctirf.shape
    assert (work / "evaluation" / "evaluation.json").is_file()

    # and every OME-TIFF it wrote is valid OME with the binned 100X pixel as its scale
    written = sorted(work.rglob("*.tif*"))
    assert len(written) == 5  # 2 pairs, raw, cTIRF, offline cTIRF
    for path in written:
        check_ome_tiff(path, PIXEL_100X_BIN4)
