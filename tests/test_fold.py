"""BatchNorm folding: the folded network computes what the unfolded one does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ctirf_live.config import Optics
from ctirf_live.models.etnet import ET2dNet, ET3dNet
from ctirf_live.models.fold import count_batchnorms, fold_batchnorm


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine terms, so folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)


@pytest.mark.parametrize(
    ("make", "shape"), [(ET2dNet, (2, 1, 96, 64)), (ET3dNet, (1, 1, 4, 64, 64))]
)
def test_folded_matches_unfolded(make, shape) -> None:
    torch.manual_seed(0)
    model = make(Optics(), "tiny").eval()
    _randomise_batchnorms(model)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert count_batchnorms(folded) == 0
    assert count_batchnorms(model) > 0  # the original is untouched
    for a, b in ((ref.g, out.g), (ref.b, out.b), (ref.ctirf, out.ctirf)):
        scale = float(a.abs().max())
        assert scale > 0
        assert float((a - b).abs().max()) <= 1e-5 * max(scale, 1.0)


def test_grouped_transposed_and_sequential() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1, output_padding=1, groups=3),
        nn.BatchNorm2d(6),
        nn.GELU(),
        nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False),
        nn.BatchNorm2d(4),
    ).eval()
    _randomise_batchnorms(seq, seed=3)
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    folded = fold_batchnorm(seq)
    with torch.no_grad():
        assert torch.allclose(folded(x), seq(x), atol=1e-5, rtol=1e-5)
    assert count_batchnorms(folded) == 0


def test_refuses_training_mode_and_inplace_folds() -> None:
    model = ET2dNet(Optics(), "tiny")
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model)
    model.eval()
    assert fold_batchnorm(model, inplace=True) is model
    assert count_batchnorms(model) == 0
    assert count_batchnorms(fold_batchnorm(model)) == 0  # folding twice is harmless
