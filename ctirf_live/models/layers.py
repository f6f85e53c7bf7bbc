"""Small generic layers (torch only) shared by the backbones.

timm/torchvision are unusable with the CPU torch build here, so the few pieces we need
(stochastic depth, truncated-normal init, layer scale, conv-BN-act) live in this module.
Every conv helper takes ``dims`` (2 or 3) and picks the matching ``Conv``/``BatchNorm``
class; an integer ``stride`` is a stride in Y and X only, so in 3D the Z axis is never
downsampled (stride ``(1, s, s)``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ConvNorm",
    "ConvTransposeNorm",
    "DropPath",
    "LayerScale",
    "batchnorm_cls",
    "conv_cls",
    "conv_transpose_cls",
    "init_linear_trunc_normal",
    "spatial_stride",
    "trunc_normal_",
]


def _check_dims(dims: int) -> None:
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")


def conv_cls(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    _check_dims(dims)
    return nn.Conv2d if dims == 2 else nn.Conv3d


def conv_transpose_cls(dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    _check_dims(dims)
    return nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d


def batchnorm_cls(dims: int) -> type[nn.Module]:
    """``nn.BatchNorm2d`` or ``nn.BatchNorm3d``."""
    _check_dims(dims)
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d


def spatial_stride(dims: int, stride: int) -> int | tuple[int, int, int]:
    """Stride ``stride`` in Y and X; Z (3D) keeps stride 1."""
    _check_dims(dims)
    return stride if dims == 2 else (1, stride, stride)


def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Fill ``tensor`` in place from N(0, std) truncated at +-2 std."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero bias for every ``nn.Linear`` in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (channels-first, any spatial dims).

    A small initial value (1e-5) makes each block start close to the identity, which
    keeps deep hybrid conv/attention stacks stable early in training.
    """

    def __init__(self, channels: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view((1, -1) + (1,) * (x.ndim - 2))


class ConvNorm(nn.Module):
    """Conv (kernel ``k`` in every axis, 'same' padding) + BatchNorm (+ GELU if ``act``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        dims: int = 2,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv_cls(dims)(
            in_channels,
            out_channels,
            kernel_size,
            stride=spatial_stride(dims, stride),
            padding=kernel_size // 2,
            groups=groups,
        )
        self.bn = batchnorm_cls(dims)(out_channels)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvTransposeNorm(nn.Module):
    """3x3 transposed conv that exactly doubles Y and X (Z unchanged) + BatchNorm (+ GELU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 1,
        dims: int = 2,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv_transpose_cls(dims)(
            in_channels,
            out_channels,
            3,
            stride=spatial_stride(dims, 2),
            padding=1,
            output_padding=1 if dims == 2 else (0, 1, 1),
            groups=groups,
        )
        self.bn = batchnorm_cls(dims)(out_channels)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))
