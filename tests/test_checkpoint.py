"""Checkpoint format: exact round trip, clear errors, atomic writes, registry."""

from __future__ import annotations

import json
import logging
import os
import random
from datetime import datetime
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from ctirf_live import __version__
from ctirf_live.config import Optics
from ctirf_live.models import checkpoint as ckpt
from ctirf_live.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    list_checkpoints,
    load_checkpoint,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 6, generator=gen)
    return {
        "enc.weight": weight,
        "enc.bias": torch.randn(4, generator=gen),
        "dec.weight": weight,  # tied: shares storage with enc.weight
        "transposed": torch.randn(3, 5, generator=gen).t(),  # non-contiguous
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def _meta() -> dict:
    return {
        "architecture": {"name": "ET2dNet", "kwargs": {"size": "S0", "psf_size": 33}},
        "optics": Optics(objective="100X", na=1.49),
        "psf": {"model": "born_wolf", "size": 33},
        "provenance": {"dataset": "pairs-2025", "epochs": 20},
        "metrics": {"val_loss": 0.125},
    }


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "model.safetensors", _state(), _meta())


@pytest.fixture
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(ckpt, "WEIGHTS_DIR", shipped)
    return shipped


def test_round_trip_is_exact(saved: Path) -> None:
    state, meta = load_checkpoint(saved)
    original = _state()
    assert set(state) == set(original)
    for key, value in original.items():
        assert torch.equal(state[key], value), key
        assert state[key].dtype == value.dtype
    assert meta["architecture"] == _meta()["architecture"]
    assert meta["optics"] == Optics(objective="100X", na=1.49).model_dump()
    assert Optics(**meta["optics"]).na == 1.49
    assert meta["psf"] == {"model": "born_wolf", "size": 33}
    assert meta["provenance"] == _meta()["provenance"]
    assert meta["metrics"] == {"val_loss": 0.125}
    assert meta["normalization"] == {"percentile": 98.0}
    assert meta["format"] == "ctirf-checkpoint" and meta["format_version"] == 1
    assert meta["versions"]["ctirf_live"] == __version__
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None
    assert read_metadata(saved) == meta
    assert json.loads(saved.with_suffix(".json").read_text()) == meta


def test_save_adds_suffix_and_requires_architecture(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "plain", _state(), _meta())
    assert path.name == "plain.safetensors" and path.is_file()
    with pytest.raises(CheckpointError, match=r"architecture\.name"):
        save_checkpoint(tmp_path / "bad.safetensors", _state(), {"optics": None})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*ctirf models"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_metadata(tmp_path / "nope.safetensors")


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 20])
    with pytest.raises(
        CheckpointError, match=r"not a valid ctirf checkpoint \(corrupt or truncated\)"
    ):
        load_checkpoint(saved)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_safetensors_without_ctirf_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="has no ctirf metadata; was it saved by ctirf-live"):
        load_checkpoint(path)


def test_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    meta = {"format": "ctirf-checkpoint", "format_version": 99, "architecture": {"name": "X"}}
    safetensors.torch.save_file({"w": torch.zeros(2)}, path, metadata={"ctirf": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"format 99, newer .* upgrade ctirf-live"):
        load_checkpoint(path)


def test_atomic_write_leaves_no_temp_files(saved: Path) -> None:
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.json", "model.safetensors"]


def test_failed_save_keeps_existing_checkpoint(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()
    sidecar_before = saved.with_suffix(".json").read_text()

    def crash(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(saved, _state(seed=1), _meta())
    assert saved.read_bytes() == before
    assert saved.with_suffix(".json").read_text() == sidecar_before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.json", "model.safetensors"]
    state, _ = load_checkpoint(saved)
    assert torch.equal(state["enc.bias"], _state()["enc.bias"])


def test_check_state_dict_loads_matching_state() -> None:
    torch.manual_seed(0)
    model, source = nn.Linear(3, 2), nn.Linear(3, 2)
    check_state_dict(model, source.state_dict())
    assert torch.equal(model.weight, source.weight)


def test_check_state_dict_wording() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 3), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(model, state)
    msg = str(info.value)
    assert msg.startswith("checkpoint does not match architecture Sequential: ")
    assert "missing 0.bias" in msg
    assert "unexpected extra.weight" in msg
    assert "shape mismatch (checkpoint vs model) 0.weight (5, 3) vs (2, 3)" in msg
    assert "\n" not in msg


def test_check_state_dict_names_only_first_keys() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)])
    with pytest.raises(
        CheckpointError, match=r"missing 0\.weight, 0\.bias, 1\.weight \(\+3 more\)"
    ):
        check_state_dict(model, {})


def test_list_checkpoints_finds_valid_and_skips_corrupt(
    tmp_path: Path, weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint(weights_dir / "et2d-60x.safetensors", _state(), _meta())
    user = tmp_path / "user"
    save_checkpoint(user / "mine.safetensors", _state(), _meta())
    (user / "broken.safetensors").write_bytes(b"\x00" * 64)
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        infos = list_checkpoints([user])
    assert [(i.name, i.shipped) for i in infos] == [("et2d-60x", True), ("mine", False)]
    mine = infos[1]
    assert mine.path == user / "mine.safetensors"
    assert (mine.architecture, mine.objective, mine.na) == ("ET2dNet", "100X", 1.49)
    assert mine.pixel_size_um == pytest.approx(0.0975)
    assert mine.created is not None
    assert "broken.safetensors" in caplog.text


def test_resolve_checkpoint(tmp_path: Path, weights_dir: Path, saved: Path) -> None:
    shipped = save_checkpoint(weights_dir / "et2d-60x.safetensors", _state(), _meta())
    assert resolve_checkpoint(saved) == saved
    assert resolve_checkpoint(str(saved)) == saved
    assert resolve_checkpoint("et2d-60x") == shipped
    assert resolve_checkpoint("et2d-60x.safetensors") == shipped
    with pytest.raises(
        CheckpointError, match="no checkpoint file, run folder or model named 'et3d'"
    ) as info:
        resolve_checkpoint("et3d")
    assert "available models: et2d-60x" in str(info.value)
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*ctirf models"):
        resolve_checkpoint(tmp_path / "missing" / "x.safetensors")


def test_resolve_checkpoint_with_nothing_installed(weights_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="available models: none installed"):
        resolve_checkpoint("anything")
