"""Acquiring commands select the objective and refuse a model made for other optics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEMO_CFG, REPO
from typer.testing import CliRunner

from ctirf_live.acquisition.core import check_rig, open_core
from ctirf_live.acquisition.objective import check_model_optics, optics_mismatch, select_objective
from ctirf_live.cli import app
from ctirf_live.config import ConfigError, Optics
from ctirf_live.data.tiff import read_ome_tiff
from ctirf_live.models.etnet import ET2dNet, save_model

runner = CliRunner()
SEQ = REPO / "acquisition_configs" / "timelapse.yaml"


def test_select_objective_switches_and_mismatch_names_both_and_the_fix() -> None:
    with open_core(DEMO_CFG) as core:
        rig = check_rig(core, DEMO_CFG)
        rig_100x = select_objective(core, rig, "100X")
        assert core.getCurrentConfig("Objective") == "100X"
        assert rig_100x is not None and rig_100x.pixel_size_um == pytest.approx(0.065)
        assert select_objective(core, rig, None) == rig_100x  # the active one
        model_60x = rig.optics_for("60X")
        msg = optics_mismatch(model_60x, rig_100x, rig)
        assert msg is not None and "trained for 60X (NA 1.5" in msg
        assert "images with 100X (NA 1.45" in msg and "pass --objective 60X" in msg
        assert "ctirf finetune --data PAIRS -m MODEL" in msg
        with pytest.raises(ConfigError, match="trained for 60X"):
            check_model_optics(model_60x, rig_100x, rig)
        assert optics_mismatch(model_60x, select_objective(core, rig, "60X"), rig) is None


def test_a_model_for_an_objective_the_rig_lacks_is_told_to_fine_tune() -> None:
    other = Optics(objective="40X", na=1.3, pixel_size_um=0.16)
    msg = optics_mismatch(other, Optics())
    assert msg is not None and "pass --objective" not in msg
    assert "fine-tune it to 60X" in msg
    assert optics_mismatch(Optics(), Optics(pixel_size_um=0.0975 * 1.03)) is None


def test_cli_acquire_refuses_the_wrong_objective_before_anything_moves(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["acquire", "-c", str(DEMO_CFG), "-s", str(SEQ), "-m", "et2dnet_s0_60x_sim"]
    result = runner.invoke(app, [*args, "-o", str(out), "--objective", "100X"])
    assert result.exit_code == 2, result.output
    assert "pass --objective 60X" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_acquire_images_with_the_chosen_objective(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = save_model(
        ET2dNet(
            Optics(
                objective="100X",
                na=1.45,
                emission_wavelength_nm=600,
                excitation_wavelength_nm=561,
                pixel_size_um=0.065,
            ),
            "tiny",
        ),
        tmp_path / "m100",
    )
    seq = tmp_path / "seq.yaml"
    seq.write_text("time_plan: {interval: 0, loops: 1}\nchannels: [{config: EPI, exposure: 1}]\n")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "acquire",
            "-c",
            str(DEMO_CFG),
            "-s",
            str(seq),
            "-m",
            str(model),
            "-o",
            str(out),
            "--objective",
            "100X",
            "--tile",
            "256",
        ],
    )
    assert result.exit_code == 0, result.output
    raw = sorted(out.glob("raw*"))[0]
    _, info = read_ome_tiff(raw if raw.is_file() else next(raw.iterdir()))
    assert info.pixel_size_um == pytest.approx(0.065)


def test_cli_live_refuses_the_wrong_objective(qtbot) -> None:
    args = ["live", "-c", str(DEMO_CFG), "-m", "et2dnet_s0_60x_sim", "--objective", "100X"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "trained for 60X" in result.output and "pass --objective 60X" in result.output


def test_snap_mode_is_case_insensitive_and_lists_its_choices(tmp_path: Path) -> None:
    out = tmp_path / "t.ome.tif"
    result = runner.invoke(app, ["snap", "-c", str(DEMO_CFG), "-o", str(out), "--mode", "tirf"])
    assert result.exit_code == 0, result.output
    assert read_ome_tiff(out)[1].metadata["mode"] == "TIRF"
    assert "EPI|TIRF" in runner.invoke(app, ["snap", "--help"]).output
