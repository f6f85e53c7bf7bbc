"""Filament-survival sectioning test: the scene, the measure and `ctirf evaluate --sectioning`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.evaluation.sectioning import (
    HEIGHTS_UM,
    SectioningScene,
    build_scene,
    run_sectioning,
)
from ctirf_live.models.etnet import ET2dNet, save_model
from ctirf_live.sim.scope import DEFAULT_OBJECTIVES

runner = CliRunner()


@pytest.fixture(scope="module")
def scene() -> SectioningScene:
    return build_scene(objective="60X", seed=11)


def test_tirf_loses_raised_filaments_that_epi_keeps(scene: SectioningScene) -> None:
    result = run_sectioning({}, scene)
    for level in ("bright", "dim"):
        tirf = np.array(result.survival["tirf"][level])
        epi = np.array(result.survival["epi_noise_free"][level])
        assert tirf[0] == epi[0] == 1.0
        assert np.all(np.diff(tirf) < 0) and np.all(np.diff(epi) < 0)
        assert tirf[1] < 0.3 and tirf[2] < 0.06  # exp(-z/d) plus the scattered share
        assert epi[2] > 0.15 and epi[3] > 0.08  # EPI still shows them: nothing sectioned
        assert np.all(epi[1:] > 3 * tirf[1:])
    assert result.deviation_from("epi") > 0.3


def test_a_method_that_outputs_tirf_scores_zero_deviation(scene: SectioningScene) -> None:
    truth = {
        id(scene.epi): scene.references["tirf"][0],
        id(scene.epi_without): scene.references["tirf"][1],
    }
    result = run_sectioning({"oracle": lambda img: truth[id(img)]}, scene)
    assert result.deviation_from("oracle") == pytest.approx(0.0, abs=1e-9)
    blur = run_sectioning({"identity": lambda img: img}, scene)
    assert blur.deviation_from("identity") == pytest.approx(blur.deviation_from("epi"))
    table = blur.markdown()
    assert "identity" in table and table.count("\n") == 1 + 2 * 4
    assert set(blur.to_dict()["max_deviation_from_tirf"]) == {"epi_noise_free", "epi", "identity"}


def test_heights_off_the_simulator_planes_are_refused() -> None:
    with pytest.raises(ValueError, match="not simulator planes"):
        build_scene(heights_um=(0.0, 0.33))


def test_evaluate_cli_writes_the_survival_table(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = save_model(ET2dNet(DEFAULT_OBJECTIVES["60X"], "tiny"), tmp_path / "tiny.safetensors")
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(ckpt), "--sectioning", "--baselines", "bf", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "filament survival" in result.output
    record = json.loads((out / "sectioning.json").read_text())
    assert record["heights_um"] == list(HEIGHTS_UM)
    assert {"tirf", "epi", "bf", "ctirf"} <= set(record["survival"])
    assert len(record["survival"]["ctirf"]["dim"]) == len(HEIGHTS_UM)
