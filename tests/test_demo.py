from pathlib import Path

import pytest
import torch

from ctirf_live.config import Optics
from ctirf_live.demo import DemoOptions, adaptation_verdict, run_demo
from ctirf_live.models.etnet import ET2dNet, ET3dNet, save_model


@pytest.fixture
def tiny_60x(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny60x")


def test_demo_runs_the_whole_workflow(tmp_path: Path, tiny_60x: Path, capsys) -> None:
    options = DemoOptions(
        out=tmp_path / "demo",
        model=str(tiny_60x),
        pairs=3,
        epochs=1,
        crop=64,
        eval_pairs=2,
        timepoints=1,
        roi=128,
        device="cpu",
        model3d=None,
    )
    lines: list[str] = []
    report = run_demo(options, step=lines.append)
    steps = [line[:5] for line in lines if line.startswith("[")]
    assert steps == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert report.verdict.startswith("fine-tuning") and report.verdict in lines
    assert report.pairs == 3
    assert Path(report.model_path).is_file()
    for scores in (report.before, report.after):
        assert 0 < scores["ctirf"]["ms_ssim_mean"] <= 1
    acq = report.acquisition
    assert acq["frames"] == acq["expected"] == 6  # 1 time point x 6 planes
    assert acq["processed"] == 6
    assert Path(acq["raw"]).exists() and Path(acq["ctirf"]).exists()
    assert (tmp_path / "demo" / "demo_report.json").is_file()
    # not a terminal: every long step still says how far it got, in timestamped lines
    log = capsys.readouterr().err
    for line in (
        "calibrating: 3/3 pairs",
        "scoring the shipped model: 2/2 pairs",
        "scoring the fine-tuned model: 2/2 pairs",
        "done: 6/6 frames, processed 6",
    ):
        assert line in log, log


def test_demo_without_shipped_model_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_shipped"):
        run_demo(DemoOptions(out=tmp_path, model="no_such_model"))


def test_adaptation_verdict_says_plainly_whether_fine_tuning_helped() -> None:
    def scores(mean: float, sd: float = 0.01) -> dict[str, float]:
        return {"ms_ssim_mean": mean, "ms_ssim_sd": sd}

    assert adaptation_verdict(scores(0.80), scores(0.86), 8, pairs=6).startswith(
        "fine-tuning helped"
    )
    assert "worse" in adaptation_verdict(scores(0.86), scores(0.80), 8, pairs=6)
    same = adaptation_verdict(scores(0.850), scores(0.852), 8, pairs=6)
    assert "no measurable difference" in same and "--epochs" in same
    # a gain smaller than the spread of a few pairs is not called a gain
    assert "no measurable" in adaptation_verdict(scores(0.80, 0.05), scores(0.81, 0.05), 8, 4)


def test_demo_time_lapse_runs_through_et3dnet(tmp_path: Path, tiny_60x: Path) -> None:
    torch.manual_seed(0)
    tiny3d = save_model(
        ET3dNet(Optics(z_step_um=0.2), "tiny"),
        tmp_path / "tiny3d",
        stack={"planes": 6, "z_step_um": 0.2},
    )
    options = DemoOptions(
        out=tmp_path / "demo",
        model=str(tiny_60x),
        model3d=str(tiny3d),
        pairs=2,
        epochs=1,
        crop=64,
        eval_pairs=1,
        timepoints=1,
        roi=128,
        device="cpu",
    )
    lines: list[str] = []
    report = run_demo(options, step=lines.append)
    last = next(line for line in lines if line.startswith("[4/4]"))
    assert "ET3dNet" in last and "one forward per stack" in last
    acq = report.acquisition
    assert acq["model"]["architecture"]["name"] == "ET3dNet"
    assert acq["frames"] == acq["expected"] == 6 and acq["processed"] >= 1
    assert Path(acq["ctirf"]).exists()
    # a 3D model that does not fit the stacks falls back to ET2dNet, and says why
    short = save_model(
        ET3dNet(Optics(z_step_um=0.5), "tiny"),
        tmp_path / "z05",
        stack={"planes": 6, "z_step_um": 0.5},
    )
    options.model3d, options.out = str(short), tmp_path / "demo2"
    report = run_demo(options, step=lines.append)
    assert report.acquisition["model"]["architecture"]["name"] == "ET2dNet"
    assert any("z step" in note for note in report.notes)


def test_the_monitor_flags_a_new_rig_until_the_model_is_fine_tuned_for_it(
    tmp_path: Path,
) -> None:
    """The demo's before/after line: the shipped 60X model on the 100X rig is flagged on
    every frame (another pixel size); a model adapted to that rig (its optics, and a
    calibration on that rig's frames, as `ctirf finetune` records) is not."""
    from ctirf_live.data.loaders import PairSource
    from ctirf_live.demo import consistency_line, flagged_before_after
    from ctirf_live.inference.consistency import calibrate, record_calibration
    from ctirf_live.inference.restorer import Restorer
    from ctirf_live.models.etnet import load_model

    torch.set_num_threads(2)
    rig = PairSource.synthetic(8, "100X", seed=5, roi=160, progress=False)
    model, _ = load_model("et2dnet_s0_60x_sim")
    model.set_optics(rig.optics)
    tuned = save_model(model, tmp_path / "tuned.safetensors")
    frames = [p.epi for p in rig.pairs]
    record_calibration(tuned, calibrate(Restorer(tuned, device="cpu"), frames[:6], "rig"))
    held_out = PairSource(rig.pairs[6:], rig.optics, "held out")
    counts = flagged_before_after("et2dnet_s0_60x_sim", tuned, held_out)
    assert counts["before"] == 2 and counts["after"] < 2
    assert counts["after"] == counts["image_after"]  # the adapted model fits the rig
    line = consistency_line(counts)
    assert "2 of 2 held-out frames of this rig flagged before" in line and "drops" in line
