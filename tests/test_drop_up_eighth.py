"""Removing the 1/16 -> 1/8 attention upsample from a checkpoint, keeping its mean output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.drop_up_eighth import drop_up_eighth
from ctirf_live.config import Optics
from ctirf_live.models.etnet import ET2dNet, load_model, save_model


def _with_branch(bias: float) -> ET2dNet:
    torch.manual_seed(0)
    model = ET2dNet(Optics(), "tiny", attn_up_eighth=True).eval()
    bn = model.backbone.ups[1].attn.proj.bn
    with torch.no_grad():  # a branch whose output is its bias alone: removal is exact
        bn.weight.zero_()
        bn.bias.fill_(bias)
    return model


def test_dropping_the_branch_keeps_its_mean_output(tmp_path: Path) -> None:
    model = _with_branch(3.0)
    source = save_model(model, tmp_path / "with.safetensors")
    target = drop_up_eighth(source, tmp_path / "without.safetensors")
    dropped, meta = load_model(target)
    assert dropped.backbone.ups[1].attn is None
    assert meta["architecture"]["backbone"]["attn_up_eighth"] is False
    assert "removed" in meta["provenance"]["notes"][-1]
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.backbone(x)
        torch.testing.assert_close(dropped.backbone(x), want, rtol=1e-5, atol=1e-5)
        # without folding the bias in, the output would differ
        plain = ET2dNet(Optics(), "tiny").eval()
        state = {k: v for k, v in model.state_dict().items() if ".ups.1.attn." not in k}
        plain.load_state_dict(state)
        assert (plain.backbone(x) - want).abs().max() > 1e-2


def test_a_checkpoint_without_the_branch_is_refused(tmp_path: Path) -> None:
    source = save_model(ET2dNet(Optics(), "tiny").eval(), tmp_path / "plain.safetensors")
    with pytest.raises(SystemExit, match="no 1/16 -> 1/8 attention branch"):
        drop_up_eighth(source, tmp_path / "out.safetensors")
