"""Options read the same in every command: no `<bool>` on flags, choices listed, any case."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEMO_CFG
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.config import Optics
from ctirf_live.models.etnet import ET2dNet, save_model

runner = CliRunner()
COMMANDS = ["snap", "calibrate", "train", "distill", "finetune", "models", "process",
            "acquire", "repair", "live", "evaluate", "demo"]


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_no_bool_placeholder_on_flags(command: str) -> None:
    text = _help(*([command] if command else []))
    assert "<bool>" not in text and "--help" in text


@pytest.mark.parametrize("command", ["process", "acquire", "live"])
def test_restoring_commands_take_device_threads_tile(command: str) -> None:
    text = _help(command)
    for option in ("--model", "-m", "--device", "--threads", "--tile", "--out", "-o"):
        assert option in text, option


def test_choices_are_listed() -> None:
    assert "EPI|TIRF" in _help("snap")
    assert "record|preview" in _help("acquire") and "record|preview" in _help("live")
    assert "ome-tiff|ome-zarr" in _help("acquire")


def _acquire_args(tmp_path: Path, loops: int) -> list[str]:
    """`ctirf acquire` of `loops` EPI frames with a tiny model, without the output."""
    torch.manual_seed(0)
    model = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny.safetensors")
    seq = tmp_path / "seq.yaml"
    seq.write_text(
        f"time_plan: {{interval: 0, loops: {loops}}}\nchannels: [{{config: EPI, exposure: 1}}]\n"
    )
    return ["acquire", "-c", str(DEMO_CFG), "-s", str(seq), "-m", str(model), "--tile", "256"]


def test_acquire_policy_and_format_in_any_case(tmp_path: Path) -> None:
    args = _acquire_args(tmp_path, 1)
    out = tmp_path / "run"
    result = runner.invoke(
        app, [*args, "-o", str(out), "--policy", "RECORD", "--format", "OME-Zarr", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "raw.ome.zarr").is_dir() and (out / "ctirf.ome.zarr").is_dir()
    bad = runner.invoke(app, [*args, "-o", str(tmp_path / "x"), "--policy", "fast"])
    assert bad.exit_code == 2 and "use record or preview" in bad.output


def test_acquire_checks_the_focus_against_the_coverslip_given(tmp_path: Path) -> None:
    """--coverslip-z: a frame focused 2 um above it is flagged, and the table says so."""
    import json

    args = _acquire_args(tmp_path, 2)
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "run"), "--coverslip-z", "-2"])
    assert result.exit_code == 0, result.output
    assert "2 of 2 planes flagged" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["consistency"]
    assert summary["context"]["focus_reference_um"] == -2.0 and summary["flagged"] == 2
