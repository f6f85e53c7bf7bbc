"""Hybrid loss: image loss regimes, regularisers, baseline ablation, gradients."""

from __future__ import annotations

import pytest
import pytorch_msssim
import torch

from ctirf_live.config import LossWeights
from ctirf_live.training.losses import (
    HybridLoss,
    _multiscale,
    axial_coarse_tv,
    dark_weight,
    image_loss,
    l1_reg,
    leak_weight,
    msssim_regime,
    tv_loss,
)

W = LossWeights()


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=gen)
    b = (0.7 * a + 0.3 * torch.rand(shape, generator=gen)).clamp(0, 1)
    return a, b


REGIMES = [(7, (1, 7)), (12, (1, 7)), (13, (2, 7)), (32, (3, 7)), (64, (4, 7)), (96, (4, 7))]
REGIMES += [(97, (5, 7)), (128, (5, 7)), (160, (5, 7)), (161, (5, 11)), (200, (5, 11))]


@pytest.mark.parametrize(("side", "regime"), REGIMES)
def test_msssim_regime(side: int, regime: tuple[int, int]) -> None:
    assert msssim_regime(side) == regime


def test_msssim_regime_rejects_tiny_images() -> None:
    with pytest.raises(ValueError, match="at least 7 px"):
        msssim_regime(6)


def test_fewer_scale_path_matches_library_at_five_scales() -> None:
    a, b = _pair((2, 1, 128, 128))
    ours = _multiscale(a, b, scales=5, win_size=7)
    ref = pytorch_msssim.ms_ssim(a, b, data_range=1.0, win_size=7, size_average=False)
    torch.testing.assert_close(ours, ref)


# one size per regime: plain SSIM, 2, 3, 4 scales, 5 scales (7-px and 11-px window), stack
SHAPES = [(2, 1, 10, 10), (2, 1, 16, 16), (2, 1, 32, 32), (2, 1, 64, 64), (1, 1, 128, 128)]
SHAPES += [(1, 1, 200, 200), (1, 1, 6, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
def test_image_loss_zero_for_identical_positive_otherwise(shape: tuple[int, ...]) -> None:
    a, b = _pair(shape)
    assert image_loss(a, a.clone(), W).item() == pytest.approx(0.0, abs=1e-5)
    assert image_loss(a, b, W).item() > 0.01


def test_image_loss_terms_use_means() -> None:
    a = torch.zeros(1, 1, 64, 64)
    only_l1 = LossWeights(a1=1.0, a2=0.0, a3=0.0)
    only_l2 = LossWeights(a1=0.0, a2=1.0, a3=0.0)
    assert image_loss(a, a + 0.5, only_l1).item() == pytest.approx(0.5)
    assert image_loss(a, a + 0.5, only_l2).item() == pytest.approx(0.25)


def test_sample_weights_scale_each_sample() -> None:
    a, b = _pair((2, 1, 32, 32))
    plain = image_loss(a, b, W)
    doubled = image_loss(a, b, W, weight=torch.full((2,), 2.0))
    torch.testing.assert_close(doubled, 2 * plain)
    first_only = image_loss(a, b, W, weight=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(first_only, image_loss(a[:1], b[:1], W) / 2)


def test_image_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes"):
        image_loss(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 64), W)


def test_tv_constant_is_zero_checkerboard_is_large() -> None:
    assert tv_loss(torch.full((1, 1, 16, 16), 0.7)).item() == 0.0
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = ((yy + xx) % 2).float()[None, None]
    ramp = (xx / 15.0).float()[None, None]
    assert tv_loss(board).item() == pytest.approx(2.0)
    assert tv_loss(ramp).item() < 0.01
    board3d = torch.stack([board, 1 - board], dim=2)
    assert tv_loss(board3d).item() == pytest.approx(3.0)


def test_l1_reg_is_mean_abs() -> None:
    assert l1_reg(torch.tensor([[-1.0, 3.0]])).item() == pytest.approx(2.0)


def _outputs(seed: int, shape: tuple[int, ...] = (2, 1, 32, 32)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=gen) for _ in range(6)]


def test_hybrid_loss_gradients_finite_and_terms_reported() -> None:
    ctirf, target, recon, epi, g, b = _outputs(1)
    for t in (ctirf, recon, g, b):
        t.requires_grad_(True)
    total, terms = HybridLoss(W)(ctirf, target, recon, epi, g, b)
    total.backward()
    for t in (ctirf, recon, g, b):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert set(terms) == {"supervised", "self_supervised", "tv_g", "tv_b", "l1_g", "total"}
    expected = (
        terms["supervised"]
        + W.self_supervised * terms["self_supervised"]
        + W.b1 * terms["tv_g"]
        + W.b2 * terms["tv_b"]
        + W.b3 * terms["l1_g"]
    )
    assert terms["total"] == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(terms["total"])


def test_hybrid_loss_works_on_stacks() -> None:
    ctirf, target, recon, epi, g, b = _outputs(2, shape=(1, 1, 6, 32, 32))
    total, _ = HybridLoss(W)(ctirf, target, recon, epi, g, b)
    assert torch.isfinite(total)


def test_baseline_ignores_self_supervised_branch() -> None:
    ctirf, target, recon, epi, g, b = _outputs(3)
    other_recon, other_epi, other_b = _outputs(4)[:3]
    baseline = HybridLoss(W, baseline=True)
    reference, terms = baseline(ctirf, target, recon, epi, g, b)
    changed, _ = baseline(ctirf, target, other_recon, other_epi, g, other_b)
    without, _ = baseline(ctirf, target, None, None, g, None)
    assert changed.item() == reference.item() == without.item()
    assert "self_supervised" not in terms and "tv_b" not in terms
    hybrid = HybridLoss(W)
    assert hybrid(ctirf, target, recon, epi, g, b)[0].item() != pytest.approx(
        hybrid(ctirf, target, other_recon, epi, g, b)[0].item()
    )


def test_hybrid_needs_self_supervised_inputs() -> None:
    ctirf, target, _, _, g, _ = _outputs(5)
    with pytest.raises(ValueError, match="baseline=True"):
        HybridLoss(W)(ctirf, target, None, None, g, None)


def test_sample_weight_applies_to_supervised_term() -> None:
    ctirf, target, recon, epi, g, b = _outputs(6)
    loss = HybridLoss(W)
    _, plain = loss(ctirf, target, recon, epi, g, b)
    _, zero = loss(ctirf, target, recon, epi, g, b, sample_weight=torch.zeros(2))
    assert zero["supervised"] == 0.0
    assert zero["self_supervised"] == pytest.approx(plain["self_supervised"])


def test_image_loss_is_float32_under_autocast() -> None:
    a, b = _pair((1, 1, 64, 64))
    expected = image_loss(a, b, W)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = image_loss(a, b, W)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_leak_weight_emphasises_light_the_target_rejects() -> None:
    """Bright input over a dark target weighs more; the weight's mean stays 1."""
    epi = torch.zeros(2, 1, 16, 16)
    target = torch.zeros(2, 1, 16, 16)
    epi[:, :, 4:8] = 0.8  # out-of-layer light: EPI bright, TIRF dark
    epi[:, :, 10:12] = target[:, :, 10:12] = 0.9  # in-layer: both bright
    w = leak_weight(epi, target, 8.0)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    assert float(w[0, 0, 5, 0]) > 5 * float(w[0, 0, 10, 0])
    assert float(w[0, 0, 10, 0]) == pytest.approx(float(w[0, 0, 0, 0]))
    assert not w.requires_grad


def test_leak_weighting_makes_a_kept_haze_cost_more() -> None:
    """The same error costs more on out-of-layer light than on in-layer structure."""
    epi = torch.zeros(1, 1, 32, 32)
    epi[..., :16] = 0.6
    target = torch.zeros_like(epi)
    target[..., 16:] = 0.6
    off_layer = target.clone()
    off_layer[..., :16] += 0.1  # keeps some of the haze
    in_layer = target.clone()
    in_layer[..., 16:] += 0.1  # same error, on the kept structure
    weights = LossWeights(a3=0.0, leak=8.0)
    loss = HybridLoss(weights, baseline=True)
    cost = [loss(p, target, None, epi, p, None)[0] for p in (off_layer, in_layer)]
    assert float(cost[0]) > 2 * float(cost[1])


def test_dark_weight_favours_dim_target_pixels_with_mean_one() -> None:
    """Dim target pixels weigh more than bright ones; the mean stays 1; no gradient."""
    target = torch.zeros(2, 1, 16, 16, requires_grad=True)
    with torch.no_grad():
        target[:, :, :4] = 1.0
        target[:, :, 4:8] = 0.1
    w = dark_weight(target, 0.5)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    ratio = float(w[0, 0, 5, 0] / w[0, 0, 0, 0])
    assert ratio == pytest.approx(((1.0 + 0.05) / (0.1 + 0.05)) ** 0.5, rel=1e-5)
    assert float(w[0, 0, 10, 0]) > float(w[0, 0, 5, 0])  # empty background: floor bounds it
    assert not w.requires_grad
    torch.testing.assert_close(dark_weight(target, 0.0), torch.ones_like(w))


def test_dim_emphasis_makes_a_kept_dim_filament_cost_more() -> None:
    """The same 40% kept of a raised filament: with an absolute L1 the dim one costs a
    tenth of the bright one; weighting by the input's brightness (`dim`) raises that share,
    while the target-based `dark` weight cannot tell the two apart (same dark target)."""
    target = torch.full((1, 1, 32, 32), 0.1)
    target[..., 24:, :] = 1.0  # bright in-layer structure elsewhere in the frame
    epi = target.clone()
    epi[..., 4:6, :16] += 0.1  # a dim filament above the layer, in the input only
    epi[..., 4:6, 16:] += 1.0  # a bright one
    dim_kept, bright_kept = target.clone(), target.clone()
    dim_kept[..., 4:6, :16] += 0.04
    bright_kept[..., 4:6, 16:] += 0.4
    ratios = {}
    for name, weights in {
        "plain": LossWeights(a2=0.0, a3=0.0),
        "dark": LossWeights(a2=0.0, a3=0.0, dark=0.5),
        "dim": LossWeights(a2=0.0, a3=0.0, dim=1.0),
    }.items():
        loss = HybridLoss(weights, baseline=True)
        dim, bright = (
            loss(p, target, None, epi, p, None)[1]["supervised"] for p in (dim_kept, bright_kept)
        )
        ratios[name] = dim / bright
    assert ratios["plain"] == pytest.approx(0.1, rel=1e-4)
    assert ratios["dark"] == pytest.approx(0.1, rel=1e-4)
    assert ratios["dim"] > 3 * ratios["plain"]


def test_dim_emphasis_needs_the_input() -> None:
    """Without the input image the dim-input weighting says what it needs."""
    loss = HybridLoss(LossWeights(dim=1.0), baseline=True)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="input image"):
        loss(x, x, None, None, x, None)


def test_axial_prior_penalises_plane_ringing_not_fine_structure() -> None:
    """Whole planes alternating in brightness cost; fine structure moving between planes
    at a constant plane mean costs nothing."""
    ringing = torch.ones(1, 1, 6, 32, 32) * torch.tensor([0.8, 1.4, 0.8, 0.8, 1.4, 0.8]).view(
        1, 1, 6, 1, 1
    )
    moving = torch.zeros(1, 1, 6, 32, 32)
    for k in range(6):
        moving[0, 0, k, :, k % 2 :: 2] = 1.0  # columns swap between planes, mean stays 0.5
    assert float(axial_coarse_tv(ringing)) > 0.1
    assert float(axial_coarse_tv(moving)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="Z,Y,X"):
        axial_coarse_tv(torch.ones(1, 1, 8, 8))
