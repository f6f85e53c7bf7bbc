"""One model resolver for every command: shipped name, run folder or file (issue 13, item 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.config import Optics
from ctirf_live.data.tiff import write_ome_tiff
from ctirf_live.models.checkpoint import CheckpointError, resolve_checkpoint
from ctirf_live.models.etnet import ET2dNet, save_model

runner = CliRunner()


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """What `ctirf train/finetune -o model_100x` leaves: best and last checkpoints."""
    torch.manual_seed(0)
    net = ET2dNet(Optics(), "tiny")
    save_model(net, tmp_path / "model_100x" / "best.safetensors")
    save_model(net, tmp_path / "model_100x" / "last.safetensors")
    return tmp_path / "model_100x"


def test_run_folder_means_its_best_checkpoint(run_folder: Path, monkeypatch) -> None:
    best = run_folder / "best.safetensors"
    assert resolve_checkpoint(run_folder) == best
    monkeypatch.chdir(run_folder.parent)
    assert resolve_checkpoint("model_100x") == Path("model_100x") / "best.safetensors"
    assert resolve_checkpoint("et2dnet_s0_60x_sim").name == "et2dnet_s0_60x_sim.safetensors"


def test_run_folder_without_best_says_what_it_holds(run_folder: Path) -> None:
    (run_folder / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no best\.safetensors; it holds last"):
        resolve_checkpoint(run_folder)
    (run_folder / "last.safetensors").unlink()
    with pytest.raises(CheckpointError, match="is the training finished"):
        resolve_checkpoint(run_folder)


def test_models_lists_run_folders_by_name_and_process_takes_it(
    run_folder: Path, monkeypatch
) -> None:
    monkeypatch.chdir(run_folder.parent)
    listed = runner.invoke(app, ["models", "--dir", "."])
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if "model_100x" in line]
    assert len(rows) == 1 and "best" not in rows[0] and "last" not in listed.output
    data = np.random.default_rng(0).poisson(200, (64, 64)).astype(np.uint16)
    write_ome_tiff("epi.ome.tif", data, "YX", pixel_size_um=0.0975)
    done = runner.invoke(app, ["process", "epi.ome.tif", "-m", "model_100x", "-o", "c.ome.tif"])
    assert done.exit_code == 0, done.output
    assert Path("c.ome.tif").is_file()
