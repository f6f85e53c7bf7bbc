"""Evaluation report: score table, comparison figure, axial resolution, adaptation, CLI."""

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.data.loaders import PairSource
from ctirf_live.data.tiff import write_ome_tiff
from ctirf_live.evaluation.axial import axial_resolution, simulated_stack, stack_planes_um
from ctirf_live.evaluation.report import (
    EvaluationError,
    comparison_figure,
    evaluate_pairs,
    pick_region,
)
from ctirf_live.models.etnet import ET2dNet, save_model
from ctirf_live.sim.scope import DEFAULT_OBJECTIVES

runner = CliRunner()
METHODS = ["epi", "rl", "wbns", "rolling_ball", "bf", "ctirf"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """MS-SSIM's small convolutions run far faster on one thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_model(ET2dNet(DEFAULT_OBJECTIVES["60X"], "tiny"), path)


@pytest.fixture(scope="module")
def pairs() -> PairSource:
    return PairSource.synthetic(3, "60X", seed=4, roi=64, progress=False)


class Oracle:
    """A stand-in restorer that returns stored images in call order (or the input)."""

    dims = 2
    optics = DEFAULT_OBJECTIVES["60X"]
    model = None

    def __init__(self, outputs: list[np.ndarray] | None = None) -> None:
        self.outputs = list(outputs or [])
        self.metadata = {"path": "oracle"}

    def restore(self, image: np.ndarray) -> np.ndarray:
        if self.outputs:
            return self.outputs.pop(0)
        return np.asarray(image, np.float32)


def test_evaluate_cli_writes_table_figure_and_axial(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(checkpoint), "--synthetic", "4", "--size", "96"]
    result = runner.invoke(app, [*args, "--planes", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "cTIRF" in result.output and "MS-SSIM" in result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert [r["method"] for r in report["summary"]] == METHODS
    assert report["reference"] == "truth" and report["pairs"] == 4
    assert all(len(report["per_pair"][m]["ms_ssim"]) == 4 for m in METHODS)
    for row in report["summary"]:
        assert 0 < row["ms_ssim_mean"] <= 1 and row["ms_ssim_sd"] >= 0
    with (out / "evaluation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == METHODS
    assert float(rows[0]["psnr_mean"]) == pytest.approx(report["summary"][0]["psnr_mean"])
    assert (out / "comparison.png").stat().st_size > 30_000
    axial = json.loads((out / "axial.json").read_text())
    assert axial["planes"] == 20 and axial["stack"].startswith("simulated")
    for stack in ("epi", "ctirf", "truth"):
        assert all(0 <= axial[stack][a]["kc"] <= 1 for a in ("xz", "yz"))
    assert set(axial["ideal_ratio"]) == {"xz", "yz"}
    assert "perfect 100 nm section" in result.output
    assert (out / "axial_xz.png").stat().st_size > 10_000


def test_oracle_restorer_scores_best_and_reference_is_reported(pairs: PairSource) -> None:
    truths = [p.truth for p in pairs.pairs]
    table = evaluate_pairs(Oracle(truths), pairs, baselines=("wbns", "bf"))  # type: ignore[arg-type]
    assert table.methods == ["epi", "wbns", "bf", "ctirf"] and table.reference == "truth"
    assert table.mean("ctirf") == pytest.approx(1.0, abs=1e-5)
    assert table.mean("ctirf") > max(table.mean(m) for m in ("epi", "wbns", "bf"))
    assert np.isinf(table.scores["ctirf"]["psnr"]).all()
    assert table.to_dict()["summary"][-1]["psnr_mean"] is None  # inf is not valid JSON
    measured = evaluate_pairs(Oracle(), pairs, baselines=(), reference="tirf")  # type: ignore[arg-type]
    assert measured.reference == "tirf" and measured.methods == ["epi", "ctirf"]
    assert measured.mean("ctirf") == pytest.approx(measured.mean("epi"))
    with pytest.raises(EvaluationError, match="unknown baseline"):
        evaluate_pairs(Oracle(), pairs, baselines=("deconvolve",))  # type: ignore[arg-type]


def test_comparison_figure_and_region_choice(pairs: PairSource, tmp_path: Path) -> None:
    image = np.zeros((64, 64), np.float32)
    image[[42, 47, 52], 8:24] = 1.0  # three thin filaments
    yy, xx = np.mgrid[:64, :64]
    image += 2.0 * np.exp(-((yy - 16) ** 2 + (xx - 44) ** 2) / 400.0)  # bright but smooth
    assert pick_region(image) == (40, 8, 16, 16)
    p = pairs[0]
    path = comparison_figure(
        p.epi, {"bf": p.epi - p.epi.min()}, p.truth, p.tirf, tmp_path / "fig.png",
        pixel_size_um=0.0975, scores={"epi": 0.5, "bf": 0.6, "ctirf": 0.9},
    )  # fmt: skip
    assert path.stat().st_size > 20_000
    with pytest.raises(ValueError, match="one shape"):
        comparison_figure(p.epi, {}, p.epi[:32], p.tirf, tmp_path / "bad.png")


def test_axial_resolution_on_a_simulated_stack() -> None:
    truth = np.full((20, 64, 64), np.nan, np.float32)
    stack, optics = simulated_stack(n_planes=20, step_um=0.1, size=64, seed=1, truth=truth)
    assert stack.shape == (20, 64, 64) and stack.dtype == np.float32
    # the perfect section: finite, noise-free, the same below the coverslip (focus clamps
    # to the glass) and changing once focus moves up into the cell
    assert np.all(np.isfinite(truth)) and truth.min() >= 0
    np.testing.assert_allclose(truth[0], truth[9], rtol=1e-5)
    assert np.abs(truth[19] - truth[11]).mean() > 0.2 * truth[11].mean()
    with pytest.raises(ValueError, match="shape"):
        simulated_stack(n_planes=20, size=64, truth=np.empty((2, 64, 64), np.float32))
    result = axial_resolution(
        Oracle(),  # type: ignore[arg-type]
        stack,
        optics.pixel_size_um,
        0.1,
        truth=truth,
    )
    assert set(result["ideal_ratio"]) == {"xz", "yz"}
    for name in ("epi", "ctirf", "truth"):
        for axis in ("xz", "yz"):
            kc = result[name][axis]["kc"]
            assert 0 < kc <= 1
            assert result[name][axis]["resolution_nm"] == pytest.approx(200.0 / kc)
    assert result["ratio"]["xz"] == pytest.approx(1.0) and result["ratio"]["mean"] == 1.0


def test_simulated_stacks_render_the_specimen_finely_wherever_focus_goes() -> None:
    # the paper's stack: 201 planes at 100 nm from 1 um below the coverslip
    planes = stack_planes_um(201, 0.1, -1.0, 0.1)
    assert planes is not None
    fine = planes[planes <= 15.0]
    assert np.diff(fine).max() == pytest.approx(0.1)  # no coarse gap up to the top emitter
    short = stack_planes_um(20, 0.1, -1.0, 0.1)
    assert short is not None and np.diff(short[short <= 2.9]).max() == pytest.approx(0.1)
    assert np.diff(short[short > 3.0]).min() > 0.1  # beyond focus + 2 um: the default planes
    assert stack_planes_um(20, 0.1, -1.0, None) is None


def test_axially_sharper_restoration_raises_the_axial_cutoff() -> None:
    rng = np.random.default_rng(7)
    points = (rng.random((48, 64, 64)) < 0.01).astype(np.float32)
    rng_noise = np.random.default_rng(8)

    def image(sigma_z: float) -> np.ndarray:
        blurred = ndimage.gaussian_filter(points, (sigma_z, 1.5, 1.5)) * 4000 + 100
        return rng_noise.poisson(blurred).astype(np.float32)

    epi, sharp = image(6.0), image(1.5)
    result = axial_resolution(Oracle(list(sharp)), epi, 0.1, 0.1)  # type: ignore[arg-type]
    assert result["ratio"]["xz"] > 1.5 and result["ratio"]["yz"] > 1.5


def test_adaptation_cli_records_both_curves(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapt"
    args = ["evaluate", "--adaptation", "--model", str(checkpoint), "--synthetic", "2"]
    result = runner.invoke(app, [*args, "--size", "64", "--epochs", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "adaptation.json").read_text())
    assert data["objective"] == "100X" and data["train_pairs"] == 2 and data["val_pairs"] == 2
    assert set(data["curves"]) == {"hybrid", "baseline"}
    for curve in data["curves"].values():
        assert [e["epoch"] for e in curve["epochs"]] == [0, 1, 2]
        assert all(len(e["ms_ssim"]) == 2 for e in curve["epochs"])
        assert len(curve["ms_ssim_smoothed"]) == 3
    hybrid, baseline = data["curves"]["hybrid"], data["curves"]["baseline"]
    assert hybrid["initial"] == pytest.approx(baseline["initial"])  # same start
    assert (out / "adaptation.png").stat().st_size > 10_000
    assert (out / "hybrid" / "best.safetensors").is_file()


def _dataset(folder: Path, pairs: PairSource, empty_tirf: bool = False) -> Path:
    ds = PairedDataset.create(folder, pairs.optics)
    for i, p in enumerate(pairs.pairs):
        tirf = np.full_like(p.tirf, 100.0) if empty_tirf and i == 1 else p.tirf
        ds.add_pair(p.epi, tirf, {"x": 100.0 * i, "y": 0.0}, (0.0, 0.0), 1.0)
    return folder


def test_measured_dataset_is_scored_against_measured_tirf(
    checkpoint: Path, pairs: PairSource, tmp_path: Path
) -> None:
    data = _dataset(tmp_path / "ds", pairs)
    args = ["evaluate", "--model", str(checkpoint), "--data", str(data), "--baselines", "bf"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["reference"] == "tirf"
    assert [r["method"] for r in report["summary"]] == ["epi", "bf", "ctirf"]
    assert "--stack" in result.output  # axial needs a stack for measured data
    assert not (tmp_path / "out" / "axial.json").exists()


def test_evaluate_holds_out_the_pairs_a_model_was_fine_tuned_on(
    pairs: PairSource, tmp_path: Path
) -> None:
    data = _dataset(tmp_path / "ds", pairs)
    files = PairSource.from_dataset(data).files
    assert len(files) == 3
    torch.manual_seed(0)
    net = ET2dNet(DEFAULT_OBJECTIVES["60X"], "tiny")
    tuned = save_model(
        net,
        tmp_path / "tuned.safetensors",
        provenance={"train_files": files[:1], "val_files": files[1:2]},
    )
    args = ["evaluate", "--model", str(tuned), "--data", str(data), "--baselines", "none"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "held out 2 of 3 pairs" in " ".join(result.output.split())
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert report["pairs"] == 1
    everything = save_model(
        net, tmp_path / "all.safetensors", provenance={"train_files": files, "val_files": []}
    )
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(everything),
            "--data",
            str(data),
            "--baselines",
            "none",
            "--out",
            str(tmp_path / "out2"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "optimistic" in " ".join(result.output.split())


def test_axial_from_a_stack_file(checkpoint: Path, pairs: PairSource, tmp_path: Path) -> None:
    stack, optics = simulated_stack(n_planes=18, step_um=0.2, size=64, seed=2)
    path = tmp_path / "stack.ome.tif"
    write_ome_tiff(path, stack[None], "CZYX", pixel_size_um=optics.pixel_size_um, z_step_um=0.2)
    data = _dataset(tmp_path / "ds", pairs)
    args = ["evaluate", "--model", str(checkpoint), "--data", str(data), "--baselines", "none"]
    result = runner.invoke(app, [*args, "--stack", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    axial = json.loads((tmp_path / "out" / "axial.json").read_text())
    assert axial["stack"] == str(path) and axial["planes"] == 18
    assert axial["z_step_um"] == pytest.approx(0.2)
    assert axial["pixel_size_um"] == pytest.approx(optics.pixel_size_um)


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("no_manifest", "not a paired dataset"),
        ("no_pairs", "has no pairs"),
        ("no_tirf", "has no TIRF image"),
        ("thin_stack", "too thin"),
        ("thin_stack_file", "too thin"),
        ("both_sources", "exactly one of"),
        ("bad_baseline", "unknown baseline"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(
    case: str, fragment: str, checkpoint: Path, pairs: PairSource, tmp_path: Path
) -> None:
    base = ["evaluate", "--model", str(checkpoint), "--out", str(tmp_path / "out")]
    synthetic = ["--synthetic", "1", "--size", "64"]
    if case == "no_manifest":
        (tmp_path / "empty").mkdir()
        args = ["--data", str(tmp_path / "empty")]
    elif case == "no_pairs":
        PairedDataset.create(tmp_path / "ds", pairs.optics)
        args = ["--data", str(tmp_path / "ds")]
    elif case == "no_tirf":
        args = ["--data", str(_dataset(tmp_path / "ds", pairs, empty_tirf=True))]
    elif case == "thin_stack":
        args = [*synthetic, "--planes", "8", "--baselines", "none"]
    elif case == "thin_stack_file":
        stack = tmp_path / "stack.ome.tif"
        write_ome_tiff(stack, np.ones((8, 64, 64), np.uint16), "ZYX", z_step_um=0.1)
        args = [*synthetic, "--stack", str(stack), "--baselines", "none"]
    elif case == "both_sources":
        args = [*synthetic, "--data", str(tmp_path)]
    else:
        args = [*synthetic, "--baselines", "rl,deconvolve"]
    result = runner.invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
