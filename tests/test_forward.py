"""Torch PSF convolution: 'same' linear convolution, no wrap-around, gradients, OTF cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import signal

from ctirf_live.config import Optics
from ctirf_live.optics import forward
from ctirf_live.optics.forward import PSFConvolution, fft_convolve
from ctirf_live.optics.psf import psf_2d


def _rng(seed: int = 0) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@pytest.mark.parametrize("k", [(5, 5), (4, 6), (7, 3)])
def test_delta_returns_the_psf_centred_on_the_impulse(k: tuple[int, int]) -> None:
    psf = _rng().random(k)
    x = torch.zeros(2, 1, 16, 17, dtype=torch.float64)
    x[1, 0, 8, 9] = 1.0
    y = fft_convolve(x, psf)
    assert y.shape == x.shape
    cy, cx = k[0] // 2, k[1] // 2
    np.testing.assert_allclose(
        y[1, 0, 8 - cy : 8 - cy + k[0], 9 - cx : 9 - cx + k[1]].numpy(), psf, atol=1e-12
    )
    assert y[1, 0].sum().item() == pytest.approx(psf.sum())
    assert torch.all(y[0].abs() < 1e-12)


@pytest.mark.parametrize(("image", "kernel"), [((20, 23), (7, 5)), ((9, 8), (15, 13))])
def test_matches_scipy_same_convolution(image: tuple[int, int], kernel: tuple[int, int]) -> None:
    rng = _rng(1)
    x = rng.standard_normal(image)
    psf = rng.random(kernel)  # not symmetric: catches correlation-vs-convolution mix-ups
    y = fft_convolve(torch.from_numpy(x), torch.from_numpy(psf))
    np.testing.assert_allclose(y.numpy(), signal.convolve(x, psf, mode="same"), atol=1e-10)


def test_even_kernel_is_centred_at_half_size() -> None:
    rng = _rng(2)
    x, psf = rng.standard_normal((12, 14)), rng.random((6, 4))
    full = signal.convolve(x, psf, mode="full")
    y = fft_convolve(torch.from_numpy(x), psf).numpy()
    np.testing.assert_allclose(y, full[3 : 3 + 12, 2 : 2 + 14], atol=1e-10)


def test_impulse_at_edge_does_not_wrap_around() -> None:
    psf = np.ones((9, 9))
    x = torch.zeros(32, 32)
    x[0, 0] = 1.0
    x[16, 31] = 1.0
    y = fft_convolve(x, psf)
    assert y[:5, :5].min().item() == pytest.approx(1.0, abs=1e-5)
    assert y[-10:, :].abs().max().item() < 1e-6  # no light reaches the opposite edges
    assert y[:10, 10:27].abs().max().item() < 1e-6
    assert y[16, :5].abs().max().item() < 1e-6
    assert y.sum().item() == pytest.approx(25 + 45, abs=1e-3)  # the rest left the frame


def test_gradients_flow() -> None:
    rng = _rng(3)
    x = torch.from_numpy(rng.standard_normal((1, 1, 5, 6))).requires_grad_()
    psf = torch.from_numpy(rng.random((3, 2))).requires_grad_()
    assert torch.autograd.gradcheck(fft_convolve, (x, psf), eps=1e-6, atol=1e-6)
    conv = PSFConvolution(rng.random((3, 3)))
    assert torch.autograd.gradcheck(conv, (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_3d_psf_matches_scipy_and_2d_psf_acts_per_plane() -> None:
    rng = _rng(4)
    x = rng.standard_normal((6, 12, 11))
    psf3 = rng.random((3, 5, 5))
    y = fft_convolve(torch.from_numpy(x)[None, None], psf3)
    assert y.shape == (1, 1, 6, 12, 11)
    np.testing.assert_allclose(y[0, 0].numpy(), signal.convolve(x, psf3, mode="same"), atol=1e-10)
    psf2 = rng.random((5, 5))
    y2 = fft_convolve(torch.from_numpy(x)[None, None], psf2)[0, 0].numpy()
    for z in range(6):
        np.testing.assert_allclose(y2[z], signal.convolve(x[z], psf2, mode="same"), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype) -> None:
    _rng(5)
    x = torch.rand(1, 1, 33, 33)
    psf = psf_2d(Optics(), 9)
    y = fft_convolve(x.to(dtype), psf)
    assert y.dtype == dtype
    ref = fft_convolve(x, psf)
    assert torch.allclose(y.float(), ref, atol=2e-2, rtol=1e-2)


def test_wrong_dimensions_are_rejected() -> None:
    with pytest.raises(ValueError, match="2D"):
        fft_convolve(torch.zeros(8, 8), np.ones(3))
    with pytest.raises(ValueError, match="3D PSF"):
        fft_convolve(torch.zeros(8, 8), np.ones((3, 3, 3)))


def test_psf_convolution_reuses_its_otf(monkeypatch: pytest.MonkeyPatch) -> None:
    psf = psf_2d(Optics(), 9)  # read-only cached array
    conv = PSFConvolution(psf)
    assert "psf" not in conv.state_dict()
    x = torch.rand(2, 1, 40, 40)
    y = conv(x)
    torch.testing.assert_close(y, fft_convolve(x, psf))
    calls = []
    real_rfftn = torch.fft.rfftn

    def counting_rfftn(*args, **kwargs):
        calls.append(args[0].shape)
        return real_rfftn(*args, **kwargs)

    monkeypatch.setattr(forward.torch.fft, "rfftn", counting_rfftn)
    torch.testing.assert_close(conv(x), y)
    assert len(calls) == 1 and tuple(calls[0]) == (2, 1, 40, 40)  # the image only
    assert len(conv._otf_cache) == 1
    conv(torch.rand(1, 1, 24, 24))
    assert len(calls) == 3 and len(conv._otf_cache) == 2  # a new size: image + OTF
    conv.double()
    assert len(conv._otf_cache) == 0 and conv.psf.dtype == torch.float64


def test_psf_convolution_set_psf_drops_the_cache() -> None:
    conv = PSFConvolution(torch.ones(3, 3))
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    assert conv(x).sum().item() == pytest.approx(9.0)
    conv.set_psf(np.full((3, 3), 2.0))
    assert conv(x).sum().item() == pytest.approx(18.0)


def test_otf_cached_under_inference_mode_still_trains() -> None:
    _rng(7)
    conv = PSFConvolution(torch.rand(3, 3))
    with torch.inference_mode():
        conv(torch.rand(1, 1, 16, 16))
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None and torch.all(x.grad > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    _rng(6)
    x = torch.rand(2, 1, 64, 64)
    conv = PSFConvolution(psf_2d(Optics(), 15))
    cpu = conv(x)
    gpu = conv.to("cuda")(x.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fft_convolve(x.cuda(), conv.psf).cpu(), cpu, atol=1e-5, rtol=1e-4)
