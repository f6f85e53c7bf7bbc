"""The raw store after a crash: SIGKILL a writing subprocess, then count and repair."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.inference.rawstore import count_raw_frames, repair_path, repair_raw_tiff

FRAMES, WRITTEN = 12, 7

# pymmcore-plus's raw sink (ome-writers) fed known frames, then killed without warning
WRITER = """
import os, signal, sys, time
import numpy as np, useq
from ome_writers import AcquisitionSettings, create_stream, useq_to_acquisition_settings
seq = useq.MDASequence(time_plan={{"interval": 0, "loops": {loops}}},
                       z_plan={{"range": 0.2, "step": 0.2}})
settings = AcquisitionSettings.model_validate({{
    "root_path": sys.argv[1], "dtype": "uint16",
    **useq_to_acquisition_settings(seq, image_width=48, image_height=32, pixel_size_um=0.1)}})
stream = create_stream(settings)
for k in range({written}):
    stream.append(np.full((32, 48), 100 + k, np.uint16))
time.sleep(1.0)  # let the writer thread / futures reach the disk
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_writer(path: Path) -> None:
    script = WRITER.format(loops=FRAMES // 2, written=WRITTEN)
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-800:]
    assert b"written" in proc.stdout


def test_a_killed_raw_tiff_is_rebuilt_from_its_pages(tmp_path: Path) -> None:
    raw = tmp_path / "raw.ome.tiff"
    _kill_writer(raw)
    with tifffile.TiffFile(raw) as tif:  # what a reader sees without the repair
        assert len(tif.pages) < WRITTEN
    result = repair_raw_tiff(raw)
    assert result.frames_recovered == WRITTEN and result.planes_planned == FRAMES
    with tifffile.TiffFile(result.output) as tif:
        data, axes = tif.series[0].asarray(), tif.series[0].axes
    assert axes == "TZYX" and data.shape == (4, 2, 32, 48)  # cut after the last time point
    flat = data.reshape(8, 32, 48)
    for k in range(WRITTEN):
        assert (flat[k] == 100 + k).all()
    assert flat[WRITTEN].max() == 0  # the plane that never arrived
    assert count_raw_frames(result.output) == 8
    assert raw.stat().st_size > 0 and result.output != raw  # the original is untouched
    again = repair_raw_tiff(result.output)
    assert again.output is None and "nothing to repair" in again.describe()
    with pytest.raises(FileExistsError, match="--overwrite"):
        repair_raw_tiff(raw)


def test_a_killed_raw_zarr_keeps_every_frame(tmp_path: Path) -> None:
    raw = tmp_path / "raw.ome.zarr"
    _kill_writer(raw)
    assert count_raw_frames(raw) == WRITTEN
    assert "nothing to repair" in repair_path(tmp_path)[0]


def test_repair_command_on_a_run_folder(tmp_path: Path) -> None:
    _kill_writer(tmp_path / "raw.ome.tiff")
    res = CliRunner().invoke(app, ["repair", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"recovered {WRITTEN} of {FRAMES}" in res.output
    assert (tmp_path / "raw.repaired.ome.tiff").is_file()
    res = CliRunner().invoke(app, ["repair", str(tmp_path / "missing")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigkill_during_ctirf_acquire_leaves_a_recoverable_run(tmp_path: Path) -> None:
    """The real thing: `ctirf acquire` killed mid-run, then `ctirf repair`."""
    import torch
    from conftest import DEMO_CFG

    from ctirf_live.config import Optics
    from ctirf_live.models.etnet import ET2dNet, save_model

    torch.manual_seed(0)
    model = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny.safetensors")
    seq = tmp_path / "seq.yaml"
    seq.write_text("time_plan: {interval: 0.1, loops: 300}\n"
                   "channels: [{config: EPI, exposure: 2}]\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ctirf_live.cli", "acquire", "-c", str(DEMO_CFG), "-s", str(seq),
           "-m", str(model), "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raw = out / "raw.ome.tiff"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not raw.exists() or raw.stat().st_size < 5 * 2**20):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert '"status": "running"' in (out / "summary.json").read_text()
    result = repair_raw_tiff(raw)
    assert result.frames_recovered >= 10
    data = tifffile.imread(result.output)
    assert data.shape[0] == result.frames_recovered and np.all(data.reshape(len(data), -1).max(1))
