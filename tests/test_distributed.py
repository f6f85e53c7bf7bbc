"""Data-parallel training: two CPU processes (gloo) train a tiny model, stop, resume."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from scipy import ndimage
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.config import Optics, TrainSettings
from ctirf_live.data.loaders import FramePair, PairSource
from ctirf_live.training import distributed
from ctirf_live.training.__main__ import main as training_main

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record_writes(trainer: Any, log: list[str]) -> None:
    """Wrap the trainer's file writers so every write it attempts is logged."""
    atomic_write, save_model, builtin_open = trainer.atomic_write, trainer.save_model, open

    def logged_atomic(path: Path, *args: Any, **kwargs: Any) -> Any:
        log.append(str(path))
        return atomic_write(path, *args, **kwargs)

    def logged_save(model: Any, path: Path, *args: Any, **kwargs: Any) -> Any:
        log.append(str(path))
        return save_model(model, path, *args, **kwargs)

    def logged_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            log.append(str(path))
        return builtin_open(path, mode, *args, **kwargs)

    trainer.atomic_write, trainer.save_model, trainer.open = logged_atomic, logged_save, logged_open


def _worker(rank: int, port: int, tmp: str, pairs: PairSource) -> None:
    """One rank: two epochs, interrupted after the first, then resumed."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from ctirf_live.models.etnet import ET2dNet
    from ctirf_live.training import trainer

    writes: list[str] = []
    _record_writes(trainer, writes)
    settings = TrainSettings(epochs=2, warmup_epochs=1, lr=2e-3, batch_size=1, crop=64, seed=3)
    train_source, val_source = pairs.subset([0, 1, 2]), pairs.subset([3])
    out = Path(tmp) / "run"

    def stop_after_first(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with distributed.session():
        trainer.seed_everything(rank)  # different initial weights: DDP must broadcast rank 0's
        model = ET2dNet(pairs.optics, "tiny")
        with pytest.raises(KeyboardInterrupt):
            trainer.train(model, train_source, val_source, settings, out, device="cpu",
                          progress=False, on_epoch=stop_after_first)  # fmt: skip
        model = ET2dNet(pairs.optics, "tiny")
        result = trainer.train(
            model, train_source, val_source, settings, out, device="cpu", progress=False
        )
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(tmp) / f"rank{rank}.safetensors"))
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in result.history]
    report = {"history": history, "notes": result.notes, "writes": writes}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def pairs() -> PairSource:
    """Four 96 px pairs of blurred random spots (a TIRF-like sharp and an EPI-like haze)."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(4):
        spots = (rng.random((96, 96)) > 0.99).astype(np.float32) * 1000
        tirf = ndimage.gaussian_filter(spots, 1.5) + 100
        epi = tirf + ndimage.gaussian_filter(spots, 6) * 20 + rng.normal(0, 5, (96, 96))
        out.append(FramePair(epi.astype(np.float32), tirf.astype(np.float32), f"f{i}"))
    return PairSource(out, Optics(), "random spots")


def test_two_gloo_ranks_agree_and_only_rank0_writes(pairs: PairSource, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), pairs), nprocs=WORLD, join=True)
    states = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():  # weights and BatchNorm statistics alike
        assert torch.equal(value, states[1][key]), key
    # the resumed run continued after epoch 1 on both ranks and finished epoch 2
    for report in reports:
        assert [h["epoch"] for h in report["history"]] == [1, 2]
        assert any("resumed" in note for note in report["notes"])
    # rank 1 validates nothing itself (1 validation pair): the sums were reduced
    assert reports[0]["history"] == reports[1]["history"]
    assert reports[0]["history"][-1]["val_loss"] is not None
    assert reports[0]["writes"], "rank 0 wrote the run folder"
    assert reports[1]["writes"] == []
    run = tmp_path / "run"
    assert {"best.safetensors", "last.safetensors", "metrics.jsonl", "finished.json"} <= {
        p.name for p in run.iterdir()
    }
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_outside_torchrun_there_is_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session() as run:
        assert run is None and distributed.active() is None
        assert distributed.is_main_process()


def test_incomplete_torchrun_environment_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(distributed.DistributedError, match="launch with `torchrun"):
        with distributed.session():
            pass


def _options(help_text: str) -> set[str]:
    return {word.strip(",") for word in help_text.split() if word.startswith("--")}


def test_module_cli_has_the_train_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        training_main(["--help"])
    assert exit_info.value.code == 0
    ours = _options(capsys.readouterr().out)
    theirs = _options(CliRunner().invoke(app, ["train", "--help"]).output)
    assert "--synthetic" in ours and ours == theirs
    with pytest.raises(SystemExit):
        training_main(["distill", "--help"])
    assert "--teacher" in capsys.readouterr().out
