"""Tests for the EViT-UNet backbone and its generic layers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ctirf_live.models.evit_unet import (
    VARIANTS,
    WINDOW_STRETCH,
    EViTUNet,
    RelativePositionBias,
    _window_plan,
    count_parameters,
    estimate_flops,
    window_count,
    windowed_attention,
)
from ctirf_live.models.layers import ConvNorm, ConvTransposeNorm, DropPath, LayerScale


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_SIZES = [(64, 64), (96, 160), (256, 256)]
_HEAVY = {("S1", (256, 256)), ("S2", (256, 256)), ("L", (256, 256))}


@pytest.mark.parametrize(
    ("variant", "size"),
    [
        pytest.param(
            v, s, marks=[pytest.mark.slow] if (v, s) in _HEAVY else [], id=f"{v}-{s[0]}x{s[1]}"
        )
        for v in ("tiny", "S0", "S1", "S2", "L")
        for s in _SIZES
    ],
)
def test_every_variant_keeps_spatial_size(variant: str, size: tuple[int, int]) -> None:
    model = EViTUNet(variant).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, *size))
    assert y.shape == (1, 2, *size)
    assert torch.isfinite(y).all()


def test_weights_trained_at_one_size_run_at_another() -> None:
    model = EViTUNet("tiny", attn_window=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.rand(2, 1, 64, 64)).square().mean()
    loss.backward()
    opt.step()

    fresh = EViTUNet.from_arch_config(json.loads(json.dumps(model.arch_config())))
    result = fresh.load_state_dict(model.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []

    model.eval()
    fresh.eval()
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        y = fresh(x)
        assert y.shape == (1, 2, 128, 128)
        torch.testing.assert_close(y, model(x))


def test_no_parameter_depends_on_input_size() -> None:
    shapes = {k: v.shape for k, v in EViTUNet("tiny").state_dict().items()}
    other = {k: v.shape for k, v in EViTUNet("tiny", attn_window=4).state_dict().items()}
    assert shapes == other


def test_3d_tiny_runs_on_short_stack_and_backprops() -> None:
    model = EViTUNet("tiny", dims=3)
    x = torch.rand(1, 1, 6, 64, 64)
    y = model(x)
    assert y.shape == (1, 2, 6, 64, 64)
    y.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_gradients_are_finite_and_reach_attention() -> None:
    model = EViTUNet("tiny", attn_window=2)
    y = model(torch.rand(2, 1, 128, 96))
    (y - 1.0).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    head = model.encoder[3][0].mixer.bias.mlp[2]
    assert head.weight.grad.abs().sum() > 0


def test_parameter_counts_grow_with_variant() -> None:
    counts = [count_parameters(EViTUNet(v)) for v in ("S0", "S1", "S2", "L")]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert count_parameters(EViTUNet("tiny")) < counts[0]


def test_widths_and_depths_match_efficientformer_v2() -> None:
    assert VARIANTS["S0"]["widths"] == (32, 48, 96, 176)
    assert VARIANTS["L"]["depths"] == (5, 5, 15, 10)
    for cfg in VARIANTS.values():
        assert [len(r) for r in cfg["mlp_ratios"]] == list(cfg["depths"])


@pytest.mark.parametrize("size", [(50, 70), (10, 12), (33, 64)])
def test_non_multiple_of_32_is_padded_and_cropped(size: tuple[int, int]) -> None:
    model = EViTUNet("tiny").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, *size)).shape == (1, 2, *size)


def test_bad_inputs_raise_value_error() -> None:
    model = EViTUNet("tiny")
    with pytest.raises(ValueError, match="4-D"):
        model(torch.rand(1, 1, 2, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="variant"):
        EViTUNet("XL")


def test_arch_config_is_json_and_rebuilds_same_architecture() -> None:
    model = EViTUNet("tiny", in_channels=1, out_channels=3, dims=3, drop_path=0.1)
    cfg = json.loads(json.dumps(model.arch_config()))
    assert cfg["variant"] == "tiny" and cfg["dims"] == 3 and cfg["out_channels"] == 3
    rebuilt = EViTUNet(**cfg)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_estimate_flops_scales_with_area() -> None:
    model = EViTUNet("tiny")
    small = estimate_flops(model, (1, 1, 64, 64))
    large = estimate_flops(model, (1, 1, 128, 128))
    assert small > 0
    assert 3.5 * small < large < 4.5 * small
    assert model.training


def _random_bias(heads: int) -> RelativePositionBias:
    bias = RelativePositionBias(heads)
    nn.init.normal_(bias.mlp[2].weight)
    return bias


@pytest.mark.parametrize(
    ("mode", "q_size", "k_size", "q_cut", "k_cut"),
    [
        ("same", 7, 7, slice(4, 7), slice(4, 7)),
        ("down", 3, 6, slice(2, 3), slice(4, 6)),
        ("up", 6, 3, slice(4, 6), slice(2, 3)),
    ],
)
def test_padded_window_equals_attention_on_its_tokens_alone(
    mode: str, q_size: int, k_size: int, q_cut: slice, k_cut: slice
) -> None:
    """The last (padded) window must ignore padding and use the same offset biases."""
    heads, window = 2, 2 if mode != "same" else 4
    q = torch.randn(1, heads * 4, 2, q_size, q_size)
    k = torch.randn(1, heads * 4, 2, k_size, k_size)
    v = torch.randn(1, heads * 3, 2, k_size, k_size)
    bias = _random_bias(heads)
    talking = (nn.Conv2d(heads, heads, 1), nn.Conv2d(heads, heads, 1))
    full = windowed_attention(q, k, v, heads, bias, window, mode=mode, talking_heads=talking)
    assert full.shape == (1, heads * 3, 2, q_size, q_size)
    alone = windowed_attention(
        q[..., q_cut, q_cut],
        k[..., k_cut, k_cut],
        v[..., k_cut, k_cut],
        heads,
        bias,
        window,
        mode=mode,
        talking_heads=talking,
    )
    torch.testing.assert_close(full[..., q_cut, q_cut], alone)


def test_shifted_windows_partition_the_grid() -> None:
    """Shift by half a window: on 11x7 with window 4 the windows start at -2, 2, 6."""
    heads = 2
    q, k, v = (torch.randn(1, heads * 4, 1, 11, 7) for _ in range(3))
    bias = _random_bias(heads)
    out = windowed_attention(q, k, v, heads, bias, 4, shift=True)
    assert out.shape == (1, heads * 4, 1, 11, 7)
    for rows, cols in [(slice(2, 6), slice(2, 6)), (slice(0, 2), slice(2, 6))]:
        alone = windowed_attention(
            q[..., rows, cols], k[..., rows, cols], v[..., rows, cols], heads, bias, 4
        )
        torch.testing.assert_close(out[..., rows, cols], alone)


def _fixed_windows_tokens(size: int, window: int) -> int:
    """Tokens (real + masked padding) that windows of exactly `window` would use."""
    return size if size <= window else -(-size // window) * window


@pytest.mark.parametrize("window", [2, 4, 8, 16])
def test_window_plan_covers_the_grid_and_never_pads_more(window: int) -> None:
    for size in range(1, 300):
        n = window_count(size, window)
        w, before, after = _window_plan(size, window, shift=False)
        assert w * n == size + after and before == 0
        assert w <= max(size if n == 1 else 0, int(window * WINDOW_STRETCH))
        assert n * w <= _fixed_windows_tokens(size, window)
        if size % window == 0:  # the grids training crops make keep the trained window
            assert w == min(size, window)
        _, sb, sa = _window_plan(size, window, shift=True)
        assert n == 1 or (sb == w // 2 and (size + sb + sa) % w == 0)


def test_edge_padded_512_frame_uses_few_padded_tokens() -> None:
    """576 px (512 + edge pad, to a multiple of 32): grids 18 and 36 with window 16."""
    assert _window_plan(18, 16, False) == (18, 0, 0)  # one global window, not 2 x 16
    assert _window_plan(36, 16, False) == (18, 0, 0)  # two windows, not 3 x 16
    assert _window_plan(32, 16, False) == (16, 0, 0)  # a 512 crop as trained


def test_position_bias_depends_only_on_offsets() -> None:
    bias = _random_bias(3)
    small = bias((1, 2, 2), (1, 2, 2), "same", "cpu")
    large = bias((1, 5, 5), (1, 5, 5), "same", "cpu")
    assert small.shape == (3, 4, 4) and large.shape == (3, 25, 25)
    torch.testing.assert_close(small[:, 0, 3], large[:, 0, 6])


def test_drop_path_scales_kept_samples_and_is_identity_in_eval() -> None:
    layer = DropPath(0.5)
    x = torch.ones(64, 3, 4, 4)
    y = layer(x)
    per_sample = y.flatten(1)
    assert set(per_sample[:, 0].unique().tolist()) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()
    layer.eval()
    assert torch.equal(layer(x), x)


def test_layer_scale_and_3d_convs_keep_z() -> None:
    ls = LayerScale(4, init_value=0.5)
    assert torch.equal(ls(torch.ones(1, 4, 2, 3, 3)), torch.full((1, 4, 2, 3, 3), 0.5))
    x = torch.rand(1, 2, 6, 8, 8)
    down = ConvNorm(2, 5, 3, stride=2, dims=3, act=True)(x)
    assert down.shape == (1, 5, 6, 4, 4)
    assert ConvTransposeNorm(5, 2, dims=3)(down).shape == (1, 2, 6, 8, 8)


def test_training_works_after_inference_in_the_same_process() -> None:
    """Cached position indices made under inference_mode must not break training."""
    torch.manual_seed(0)
    model = EViTUNet("tiny")
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        model.eval()(x)
    model.train()
    model(torch.rand(2, 1, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_position_bias_is_cached_for_inference_until_weights_change() -> None:
    bias = _random_bias(2).eval()
    args = ((1, 4, 4), (1, 4, 4), "same", "cpu")
    with torch.no_grad():
        first = bias(*args)
        assert bias(*args) is first  # kept: no gather per attention call
        other = _random_bias(2)
        bias.load_state_dict(other.state_dict())  # weights changed in place
        changed = bias(*args)
        torch.testing.assert_close(changed, other.eval()(*args))
        assert not torch.equal(changed, first)
    fresh = bias(*args)  # with gradients: built anew and differentiable
    assert fresh.requires_grad and fresh is not changed
