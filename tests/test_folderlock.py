"""One writer per dataset folder; killed runs and their leftovers are found (issue 12, item 9)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DEMO_CFG
from typer.testing import CliRunner

from ctirf_live.atomic import leftover_temps
from ctirf_live.cli import app
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.folderlock import LOCK_NAME, FolderLock, FolderLockedError, folder_owner

runner = CliRunner()

# A calibration that pauses after its second pair (the progress callback sleeps), so the
# test can try a second writer and then SIGKILL it mid-run.
CHILD = """
import sys, time
from pathlib import Path
from ctirf_live.acquisition.calibration import calibrate
from ctirf_live.acquisition.core import check_rig, open_core

cfg, out = Path(sys.argv[1]), Path(sys.argv[2])

def pause(status):
    if status.done == 2:
        (out / ".tmp_hold").mkdir(exist_ok=True)
        (out / ".manifest.json.abcd1234.tmp").write_text("{half")
        print("PAUSED", flush=True)
        time.sleep(120)

with open_core(cfg) as core:
    core.setProperty("Camera", "RealTime", "0")
    core.setExposure(100)
    core.setROI(960, 960, 128, 128)
    calibrate(core, check_rig(core, cfg), out, pairs=6, exposure_ms=100, progress=pause)
"""


def test_second_lock_is_refused_naming_the_owner(tmp_path: Path) -> None:
    with FolderLock(tmp_path, command="ctirf calibrate") as first:
        assert first.note is None
        owner = folder_owner(tmp_path)
        assert owner is not None and owner.pid == os.getpid()
        with pytest.raises(FolderLockedError) as info:
            FolderLock(tmp_path).acquire()
        msg = str(info.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg
        assert "ctirf calibrate" in msg and "another --out" in msg
    assert folder_owner(tmp_path) is None
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released cleanly: nothing stale


def test_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ctirf_live.folderlock import FolderLock; "
            "FolderLock(sys.argv[1], 'ctirf calibrate').acquire(); print('HELD', flush=True); "
            "time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "HELD"
        assert folder_owner(tmp_path).pid == child.pid  # type: ignore[union-attr]
        with pytest.raises(FolderLockedError, match=f"pid {child.pid}"):
            FolderLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    lock = FolderLock(tmp_path).acquire()
    try:
        assert lock.stale is not None and lock.stale.pid == child.pid
        assert lock.note and f"pid {child.pid}" in lock.note and "took over" in lock.note
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_open_marks_killed_runs_and_removes_temps_only_when_free(tmp_path: Path) -> None:
    from ctirf_live.config import Optics

    ds = PairedDataset.create(tmp_path, Optics())
    mine = {"started": "t1", "accepted": 1, "status": "running"}
    mine |= {"pid": os.getpid(), "host": socket.gethostname()}
    dead = {"started": "t0", "accepted": 3, "status": "running", "pid": 1 << 22, "host": "x"}
    ds.manifest["calibration"] = {"runs": [dead, mine]}
    ds.save_manifest()
    temp = tmp_path / ".pair_0003.ome.tif.k2j4h5g6.tmp"
    temp.write_bytes(b"half a pair")
    with FolderLock(tmp_path):  # this process writes here: its own run is alive
        held = PairedDataset.open(tmp_path)
    assert [r["status"] for r in held.manifest["calibration"]["runs"]] == ["killed", "running"]
    assert not temp.exists() and leftover_temps(tmp_path) == []
    assert any("was killed after 3 pair(s)" in n for n in held.notes)
    assert any("removed 1 temp file" in n for n in held.notes)
    opened = PairedDataset.open(tmp_path)  # nobody holds the folder: that run is gone too
    assert [r["status"] for r in opened.manifest["calibration"]["runs"]] == ["killed"] * 2
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["calibration"]["runs"][1]["status"] == "killed"


def test_concurrent_calibrate_is_refused_and_a_killed_one_is_resumed(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(DEMO_CFG), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "PAUSED"
        args = ["calibrate", "-c", str(DEMO_CFG), "--out", str(out), "--pairs", "3"]
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2
        assert f"in use by `ctirf calibrate` (pid {child.pid}" in refused.output
        reader = PairedDataset.open(out)  # a live writer: the reader repairs nothing on disk
        assert len(reader) == 2 and reader.manifest["calibration"]["runs"][0]["status"] == "running"
        assert len(leftover_temps(out)) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    started = time.monotonic()
    result = runner.invoke(app, [*args[:-1], "4"])
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 60
    text = " ".join(result.output.split())
    assert f"took over the lock of {out} left by `ctirf calibrate` (pid {child.pid}" in text
    assert "was killed after 2 pair(s)" in text and "removed 1 temp file" in text
    ds = PairedDataset.open(out)
    assert len(ds) == 4 and len({p.file for p in ds.pairs}) == 4
    assert [r["status"] for r in ds.manifest["calibration"]["runs"]] == ["killed", "completed"]
    assert leftover_temps(out) == [] and (out / ".tmp_hold").is_dir()  # folders are not temps
