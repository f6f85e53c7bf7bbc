"""Torch forward model: linear convolution with the PSF, without wrap-around.

Used by the training loss (cTIRF = g * psf) and by the simulator. The image is
zero-padded to an FFT-friendly size of at least n + k - 1 per axis, so the circular
FFT product equals the linear convolution; the output is cropped back to the input's
size with the kernel centre at `k // 2` (for odd kernels the same as
`scipy.signal.convolve(..., mode="same")`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from scipy.fft import next_fast_len

_OTF_CACHE_SIZE = 8


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_kernel(psf: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The PSF as a real floating-point tensor (numpy input is copied: it may be read-only)."""
    kernel = torch.from_numpy(np.array(psf)) if isinstance(psf, np.ndarray) else psf
    if kernel.ndim not in (2, 3):
        raise ValueError(f"PSF must be 2D (Y, X) or 3D (Z, Y, X), got shape {tuple(kernel.shape)}")
    if kernel.is_complex():
        raise ValueError("PSF must be real-valued")
    return kernel if kernel.is_floating_point() else kernel.to(torch.float32)


def _fft_shape(spatial: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(next_fast_len(n + k - 1, real=True) for n, k in zip(spatial, kernel, strict=True))


def _otf(kernel: torch.Tensor, fft_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.fft.rfftn(kernel, s=fft_shape)


def _apply_otf(
    x: torch.Tensor, otf: torch.Tensor, fft_shape: tuple[int, ...], kernel: tuple[int, ...]
) -> torch.Tensor:
    nd = len(kernel)
    dims = tuple(range(-nd, 0))
    spatial = x.shape[-nd:]
    full = torch.fft.irfftn(torch.fft.rfftn(x, s=fft_shape, dim=dims) * otf, s=fft_shape, dim=dims)
    for dim, n, k in zip(dims, spatial, kernel, strict=True):
        full = full.narrow(dim, k // 2, n)
    return full


def _check_input(x: torch.Tensor, nd: int) -> None:
    if x.ndim < nd:
        raise ValueError(
            f"image has {x.ndim} dims but the PSF is {nd}D; "
            "expected (..., Y, X) for a 2D PSF or (..., Z, Y, X) for a 3D PSF"
        )
    if x.is_complex():
        raise ValueError("fft_convolve expects a real-valued image")


def fft_convolve(x: torch.Tensor, psf: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Linear 'same'-size convolution of `x` with `psf` over the last `psf.ndim` dims.

    Leading (batch, channel, ...) dims of `x` broadcast. Differentiable; runs on the
    device of `x`. Half/bfloat16 inputs are computed in float32 and returned in their
    own dtype; float64 is computed in float64.
    """
    kernel = _as_kernel(psf)
    nd = kernel.ndim
    _check_input(x, nd)
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    shape = _fft_shape(tuple(x.shape[-nd:]), tuple(kernel.shape))
    otf = _otf(kernel.to(device=x.device, dtype=dtype), shape)
    out = _apply_otf(xc, otf, shape, tuple(kernel.shape))
    return out.to(x.dtype) if x.is_floating_point() else out


class PSFConvolution(torch.nn.Module):
    """Convolution with a fixed PSF that caches the OTF per (spatial shape, device, dtype).

    The PSF is a non-persistent buffer: `.to(device)` moves it, but it is not written to
    checkpoints (the checkpoint records the optics and PSF model instead). Repeated calls
    at one image size transform only the image.
    """

    psf: torch.Tensor

    def __init__(self, psf: torch.Tensor | np.ndarray) -> None:
        super().__init__()
        self.register_buffer("psf", _as_kernel(psf).detach().clone(), persistent=False)
        self._otf_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def set_psf(self, psf: torch.Tensor | np.ndarray) -> None:
        """Replace the PSF (keeping device) and drop the cached OTFs."""
        self.psf = _as_kernel(psf).detach().clone().to(self.psf.device)
        self._otf_cache.clear()

    def _apply(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._otf_cache.clear()
        return super()._apply(*args, **kwargs)

    def otf(
        self, spatial: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The (cached) OTF for images of spatial shape `spatial`."""
        key = (tuple(spatial), device, dtype)
        cached = self._otf_cache.get(key)
        if cached is not None:
            self._otf_cache.move_to_end(key)
            return cached
        shape = _fft_shape(tuple(spatial), tuple(self.psf.shape))
        with torch.inference_mode(False):  # a cache filled at inference must serve training
            otf = _otf(self.psf.detach().to(device=device, dtype=dtype), shape)
        self._otf_cache[key] = otf
        if len(self._otf_cache) > _OTF_CACHE_SIZE:
            self._otf_cache.popitem(last=False)
        return otf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve `x` (..., Y, X) or (..., Z, Y, X) with the PSF; same shape and dtype."""
        nd = self.psf.ndim
        _check_input(x, nd)
        dtype = _compute_dtype(x)
        spatial = tuple(x.shape[-nd:])
        shape = _fft_shape(spatial, tuple(self.psf.shape))
        otf = self.otf(spatial, x.device, dtype)
        out = _apply_otf(x.to(dtype), otf, shape, tuple(self.psf.shape))
        return out.to(x.dtype) if x.is_floating_point() else out

    def extra_repr(self) -> str:
        return f"psf_shape={tuple(self.psf.shape)}"
