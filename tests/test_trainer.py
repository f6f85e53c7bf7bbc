import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.config import Optics, TrainSettings
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.data.loaders import FramePair, PairSource
from ctirf_live.models.etnet import ET2dNet, load_model, make_psf, save_model
from ctirf_live.sim.scope import DEFAULT_OBJECTIVES
from ctirf_live.training.trainer import (
    METRICS,
    TrainError,
    evaluate_model,
    finetune,
    finetune_settings,
    inherit_target_ceiling,
    lr_at,
    optics_differ,
    seed_everything,
    train,
)

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads; one avoids spin-waiting on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs() -> PairSource:
    return PairSource.synthetic(4, "60X", seed=2, roi=96, progress=False)


def _settings(**changes: object) -> TrainSettings:
    base = {"epochs": 3, "warmup_epochs": 1, "lr": 2e-3, "batch_size": 2, "crop": 64}
    return TrainSettings(**{**base, **changes})


def _model(optics: Optics, seed: int = 0) -> torch.nn.Module:
    seed_everything(seed)
    return ET2dNet(optics, "tiny")


def test_warmup_cosine_schedule() -> None:
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[10:]) < 0)
    assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 1e-3


def test_tiny_model_loss_falls_and_best_checkpoint_loads(pairs: PairSource, tmp_path: Path) -> None:
    # a fixed batch: two 64 px frames, crop = frame, no rotation; one step per epoch
    fixed = PairSource(
        [FramePair(p.epi[16:80, 16:80], p.tirf[16:80, 16:80], p.field) for p in pairs.pairs[:2]],
        pairs.optics,
        "fixed",
    )
    losses: list[float] = []
    result = train(
        _model(pairs.optics),
        fixed,
        pairs.subset([2]),
        _settings(epochs=12, rotation_probability=0),
        tmp_path,
        device="cpu",
        progress=False,
        samples_per_epoch=2,
        on_step=lambda rec: losses.append(rec["total"]),
    )
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])
    assert len(result.history) == 12
    val = [h["val_loss"] for h in result.history]
    assert result.best_val_loss == pytest.approx(min(val))
    lines = [json.loads(x) for x in (tmp_path / METRICS).read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, 13))
    assert {"train_loss", "train_supervised", "val_loss", "val_ms_ssim", "lr", "seconds"} <= set(
        lines[0]
    )
    model, meta = load_model(result.best_path)
    assert meta["metrics"]["val_loss"] == pytest.approx(min(val))
    assert meta["metrics"]["epoch"] == 1 + int(np.argmin(val))
    assert meta["provenance"]["data"] == "fixed" and meta["provenance"]["seed"] == 0
    assert meta["normalization"]["percentile"] == 98.0
    assert result.last_path.is_file()
    scores = evaluate_model(model, pairs.subset([2, 3]), device="cpu")
    assert scores["pairs"] == 2 and scores["reference"] == "ground truth"
    for name in ("ctirf", "epi"):
        assert 0 < scores[name]["ms_ssim_mean"] <= 1 and np.isfinite(scores[name]["psnr_mean"])


def test_interrupted_run_resumes_with_the_same_history(pairs: PairSource, tmp_path: Path) -> None:
    train_src, val_src = pairs.subset([0, 1]), pairs.subset([2])
    kwargs = {"device": "cpu", "progress": False, "samples_per_epoch": 2}
    full = train(_model(pairs.optics), train_src, val_src, _settings(), tmp_path / "a", **kwargs)

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            _model(pairs.optics),
            train_src,
            val_src,
            _settings(),
            tmp_path / "b",
            on_epoch=stop_after_first,
            **kwargs,
        )
    assert len((tmp_path / "b" / METRICS).read_text().splitlines()) == 1
    resumed = train(
        _model(pairs.optics, seed=99), train_src, val_src, _settings(), tmp_path / "b", **kwargs
    )
    assert any("resumed" in n for n in resumed.notes)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    wa, wb = load_file(full.last_path), load_file(resumed.last_path)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    assert len((tmp_path / "b" / METRICS).read_text().splitlines()) == 3
    with pytest.raises(TrainError, match="differs in settings"):
        train(_model(pairs.optics), train_src, val_src, _settings(seed=5), tmp_path / "b", **kwargs)


def test_finetune_switches_the_psf_to_the_data_optics(pairs: PairSource, tmp_path: Path) -> None:
    ckpt = save_model(_model(pairs.optics), tmp_path / "base.safetensors")
    optics_100x = DEFAULT_OBJECTIVES["100X"]
    assert optics_differ(pairs.optics, optics_100x)
    assert not optics_differ(pairs.optics, pairs.optics.model_copy())
    data_100x = PairSource(pairs.pairs, optics_100x, "toy 100X")
    settings = finetune_settings(epochs=1, crop=64, batch_size=2, val_fraction=0.25)
    result = finetune(ckpt, data_100x, settings, tmp_path / "ft", device="cpu", progress=False)
    assert any("PSF switched" in n and "100X" in n for n in result.notes)
    model, meta = load_model(result.best_path)
    assert meta["optics"]["objective"] == "100X"
    assert meta["provenance"]["init_from"] == str(ckpt)
    assert meta["provenance"]["kind"] == "finetune"
    expected = torch.tensor(make_psf(optics_100x), dtype=torch.float32)
    torch.testing.assert_close(model.forward_model.psf.float(), expected)
    assert settings.lr < TrainSettings().lr and settings.warmup_epochs == 2


def _write_dataset(folder: Path, frames: list[np.ndarray], optics: Optics) -> Path:
    ds = PairedDataset.create(folder, optics)
    for i, frame in enumerate(frames):
        ds.add_pair(frame, frame, {"x": 100.0 * i, "y": 0.0}, (0.0, 0.0), 1.0)
    return folder


def test_cli_train_models_and_finetune_end_to_end(pairs: PairSource, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [*"train --synthetic 4 --variant tiny --epochs 2 --crop 64".split(), "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "best checkpoint:" in result.output and "val MS-SSIM" in result.output
    assert (out / "best.safetensors").is_file()
    assert len((out / METRICS).read_text().splitlines()) == 2
    listed = runner.invoke(app, ["models", "--dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    # the run folder (its best; last is not listed separately), plus the shipped models
    from ctirf_live.models.checkpoint import list_checkpoints

    shipped = sum(info.shipped and info.architecture == "ET2dNet" for info in list_checkpoints())
    assert listed.output.count("ET2dNet") == 1 + shipped and "60X" in listed.output
    data = _write_dataset(
        tmp_path / "ds", [p.epi.astype(np.uint16) for p in pairs.pairs], pairs.optics
    )
    tuned = runner.invoke(
        app,
        [
            *f"finetune --data {data} --from {out} --epochs 1 --crop 64".split(),
            *("-o", str(tmp_path / "tuned")),
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    assert "PSF switched" not in tuned.output
    assert (tmp_path / "tuned" / "best.safetensors").is_file()
    _, meta = load_model(tmp_path / "tuned" / "best.safetensors")
    prov = meta["provenance"]
    used = sorted(prov["train_files"] + prov["val_files"])
    assert used == sorted(rec.file for rec in PairedDataset.open(data).pairs)
    # train's default is unclipped targets; a fine-tune inherits it unless told otherwise
    _, base_meta = load_model(out / "best.safetensors")
    assert base_meta["provenance"]["settings"]["target_ceiling"] is None
    assert prov["settings"]["target_ceiling"] is None
    paper = runner.invoke(
        app,
        [
            *f"finetune --data {data} --from {out} --epochs 1 --crop 64".split(),
            *("--target-ceiling", "1", "-o", str(tmp_path / "paper")),
        ],
    )
    assert paper.exit_code == 0, paper.output
    _, paper_meta = load_model(tmp_path / "paper" / "best.safetensors")
    assert paper_meta["provenance"]["settings"]["target_ceiling"] == 1.0


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("empty", "has no pairs"),
        ("mixed", "different frame shapes"),
        ("crop", "larger than the frames"),
        ("variant", "unknown variant 'XL'"),
        ("neither", "exactly one of --data"),
        ("scaling", "--variance-scaling must be"),
    ],
)
def test_cli_train_bad_input_is_one_line(tmp_path: Path, case: str, fragment: str) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(100, 4000, (64, 64), dtype=np.uint16)
    data = _write_dataset(tmp_path / "ds", [] if case == "empty" else [frame, frame], Optics())
    if case == "mixed":
        PairedDataset.open(data).add_pair(frame[:32], frame[:32], {"x": 900.0}, (0, 0), 1.0)
    args = ["train", "--variant", "XL" if case == "variant" else "tiny", "-o", str(tmp_path / "o")]
    if case != "neither":
        args += ["--data", str(data)]
    if case == "crop":
        args += ["--crop", "128"]
    if case == "scaling":
        args += ["--variance-scaling", "square"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_a_finished_run_drops_its_resume_state_unless_kept(
    pairs: PairSource, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctirf_live.training.trainer import FINISHED, RESUME

    train_src, val_src = pairs.subset([0, 1]), pairs.subset([2])
    kwargs = {"device": "cpu", "samples_per_epoch": 2}
    done = train(_model(pairs.optics), train_src, val_src, _settings(), tmp_path / "a", **kwargs)
    assert not (tmp_path / "a" / RESUME).exists() and (tmp_path / "a" / FINISHED).is_file()
    # output is not a terminal here: one plain line per epoch instead of a progress bar
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and "val MS-SSIM" in lines[0]
    again = train(_model(pairs.optics), train_src, val_src, _settings(), tmp_path / "a", **kwargs)
    assert any("already holds the finished run" in n for n in again.notes)
    assert again.history == done.history
    with pytest.raises(TrainError, match="differs in settings"):
        train(_model(pairs.optics), train_src, val_src, _settings(lr=1e-3), tmp_path / "a",
              **kwargs)  # fmt: skip
    kept = train(
        _model(pairs.optics), train_src, val_src, _settings(), tmp_path / "k",
        keep_resume=True, **kwargs,
    )  # fmt: skip
    assert (tmp_path / "k" / RESUME).is_file() and len(kept.history) == 3


def test_the_monitor_is_calibrated_on_validation_then_training_frames_and_quadrants() -> None:
    """A few-shot run has two or three validation frames: the calibration tops them up
    with their quadrants, then training frames and theirs, up to CALIBRATION_FRAMES."""
    from types import SimpleNamespace

    from ctirf_live.training.trainer import CALIBRATION_FRAMES, _calibration_frames

    def source(n: int, side: int) -> SimpleNamespace:
        return SimpleNamespace(pairs=[SimpleNamespace(epi=np.full((side, side), i, np.float32))
                                      for i in range(n)])

    frames, what = _calibration_frames(source(2, 512), source(18, 512), CALIBRATION_FRAMES)
    assert len(frames) == CALIBRATION_FRAMES == 64
    assert what == ("2 validation frames + 8 validation quadrants + 18 training frames + "
                    "36 training quadrants")
    assert frames[2].shape == (256, 256) and frames[10].shape == (512, 512)
    small, what = _calibration_frames(source(3, 128), source(4, 128), CALIBRATION_FRAMES)
    assert len(small) == 7 and what == "3 validation frames + 4 training frames"


def test_input_ceiling_is_recorded_and_a_finetune_keeps_it(
    pairs: PairSource, tmp_path: Path
) -> None:
    result = train(
        _model(pairs.optics),
        pairs.subset([0, 1]),
        None,
        _settings(epochs=1, input_ceiling=None, target_ceiling=None),
        tmp_path / "base",
        device="cpu",
        progress=False,
    )
    model, meta = load_model(result.last_path)
    assert meta["normalization"]["input_ceiling"] is None and model.input_ceiling is None
    settings = finetune_settings(epochs=1, crop=64, batch_size=2, val_fraction=0.25)
    ft = finetune(result.last_path, pairs, settings, tmp_path / "ft", device="cpu", progress=False)
    ft_model, ft_meta = load_model(ft.best_path)
    assert ft_model.input_ceiling is None
    assert ft_meta["provenance"]["settings"]["target_ceiling"] is None  # inherited too
    named = inherit_target_ceiling(finetune_settings(target_ceiling=2.0), ft_meta)
    assert named.target_ceiling == 2.0
    assert inherit_target_ceiling(finetune_settings(), {"provenance": {}}).target_ceiling == 1.0
    # recipes: 2D training drops Eq. 1's clip on targets; distillation keeps it
    assert TrainSettings().target_ceiling is None
    from ctirf_live.training.distill import distill_settings

    assert distill_settings().target_ceiling == 1.0
    plain, plain_meta = load_model(save_model(_model(pairs.optics), tmp_path / "eq1.safetensors"))
    assert plain.input_ceiling == 1.0 and plain_meta["normalization"]["input_ceiling"] == 1.0
