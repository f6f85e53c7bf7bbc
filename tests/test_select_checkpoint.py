"""Choosing the checkpoint to ship: sectioning among those near the best MS-SSIM."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.select_checkpoint import checkpoint_epoch, pick


def _row(name: str, val: float | None, deviation: float) -> dict:
    return {"path": name, "val_ms_ssim": val, "deviation": deviation}


def test_pick_prefers_sectioning_within_the_slack() -> None:
    rows = [_row("a", 0.895, 0.40), _row("b", 0.893, 0.30), _row("c", 0.880, 0.10)]
    assert pick(rows, slack=0.003)["path"] == "b"


def test_pick_ignores_sectioning_outside_the_slack() -> None:
    rows = [_row("a", 0.895, 0.40), _row("c", 0.880, 0.10)]
    assert pick(rows, slack=0.003)["path"] == "a"
    assert pick(rows, slack=0.02)["path"] == "c"


def test_pick_without_validation_scores_uses_sectioning_alone() -> None:
    rows = [_row("a", None, 0.40), _row("b", None, 0.20)]
    assert pick(rows, slack=0.003)["path"] == "b"


def test_checkpoint_epoch_reads_the_sidecar(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(b"")
    assert checkpoint_epoch(ckpt) == (None, None)
    ckpt.with_suffix(".json").write_text(json.dumps({"metrics": {"epoch": 7, "val_ms_ssim": 0.9}}))
    assert checkpoint_epoch(ckpt) == (7, 0.9)
