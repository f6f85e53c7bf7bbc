"""EViT-UNet backbone (2D and 3D) that runs at any input size with the same weights.

Structure (paper Methods 4.4; EViT-UNet = EfficientFormerV2 blocks in a U-Net):

* encoder: conv stem to 1/4 (two stride-2 conv-BN-GELU), stages at 1/4, 1/8, 1/16, 1/32
  made of FFN blocks (1x1 expand, depthwise 3x3, 1x1 project; layer scale, DropPath);
  the last ``num_vit`` blocks of the 1/16 and 1/32 stages also have a multi-head
  self-attention token mixer with talking heads, a relative position bias and a
  depthwise "local" term on the values (at 1/16 the attention runs on a stride-2 copy
  and is upsampled back, as in EfficientFormerV2). 1/16 -> 1/32 is an attention
  downsample (queries from a strided path, keys/values from the full-resolution map)
  added to a strided conv; the other downsamples are strided convs.
* decoder: the mirror image; 1/32 -> 1/16 (and, with ``attn_up_eighth``, 1/16 -> 1/8
  as in the EViT-UNet reference) is an attention upsample (queries from an upsampled
  path, keys/values from the coarse map) added to a transposed conv, the other
  upsamples are transposed convs; skips are fused with CCA-style channel gates computed
  from the globally pooled skip and decoder features.
* head: two stride-2 transposed conv-BN-GELU back to full resolution, then a 1x1 conv to
  ``out_channels`` (no final activation; the caller applies softplus/ReLU).

Differences from the public reference, on purpose:

* **Size-independent position bias.** The reference learns a bias table indexed for one
  input size, so checkpoints only run at that size. Here the per-head bias is a small MLP
  of the signed, log-scaled relative offset ``(dz, dy, dx)`` in key-grid units
  (continuous position bias as in Swin-v2): the same offset gets the same bias at any
  input size and no parameter depends on the size.
* **Bounded attention cost.** All attention runs on a grid at 1/32 of the input (the 1/16
  attention is strided, the resample attentions have 1/32 on one side). When that grid
  is larger than ``attn_window`` tokens per side (default 16, i.e. 512 input pixels,
  the paper's training crop), attention is computed in non-overlapping windows of
  ``attn_window`` x ``attn_window`` tokens (all Z planes in 3D), with every other block
  shifted by half a window so information crosses window borders; windows are padded
  and padded keys masked. At the training size attention is therefore global and exact;
  at 2048 x 2048 each query sees a 512 x 512 px neighbourhood and the cost grows
  linearly with the area instead of quadratically (full attention there would be
  4096^2 logits per head and block).
* Inputs of any Y/X size are padded (reflect) to a multiple of 32 and cropped back.
* 3D (``dims=3``): kernels 3x3x3, strides (1, 2, 2): Z is never downsampled and the
  attention tokens are Z*Y*X.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctirf_live.models.layers import (
    ConvNorm,
    ConvTransposeNorm,
    DropPath,
    LayerScale,
    conv_cls,
    init_linear_trunc_normal,
)

__all__ = ["VARIANTS", "EViTUNet", "count_parameters", "estimate_flops"]

_S0_R = ((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4))
_S1_R = ((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4))
_S2_R = ((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4))
_L_R = (
    (4,) * 5,
    (4,) * 5,
    (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4),
    (4, 4, 4, 3, 3, 3, 3, 4, 4, 4),
)
_EFV2_ATTN = {"heads": 8, "key_dim": 32, "attn_ratio": 4, "resample_key_dim": 16}

VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "widths": (8, 16, 24, 32),
        "depths": (1, 1, 1, 1),
        "mlp_ratios": ((2,), (2,), (2,), (2,)),
        "num_vit": 1,
        "heads": 2,
        "key_dim": 8,
        "attn_ratio": 2,
        "resample_key_dim": 8,
    },
    "S0": {
        "widths": (32, 48, 96, 176),
        "depths": (2, 2, 6, 4),
        "mlp_ratios": _S0_R,
        "num_vit": 2,
        **_EFV2_ATTN,
    },
    "S1": {
        "widths": (32, 48, 120, 224),
        "depths": (3, 3, 9, 6),
        "mlp_ratios": _S1_R,
        "num_vit": 2,
        **_EFV2_ATTN,
    },
    "S2": {
        "widths": (32, 64, 144, 288),
        "depths": (4, 4, 12, 8),
        "mlp_ratios": _S2_R,
        "num_vit": 4,
        **_EFV2_ATTN,
    },
    "L": {
        "widths": (40, 80, 192, 384),
        "depths": (5, 5, 15, 10),
        "mlp_ratios": _L_R,
        "num_vit": 6,
        **_EFV2_ATTN,
    },
}
"""Widths, depths, per-block FFN expansion ratios and attention settings per variant
(EfficientFormerV2 S0/S1/S2/L values; ``tiny`` is for tests)."""

_MULTIPLE = 32
_SCALES = {"same": (1, 1), "down": (1, 2), "up": (2, 1)}


def _grid_coords(shape: tuple[int, ...]) -> torch.Tensor:
    axes = [torch.arange(n) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


@functools.lru_cache(maxsize=64)
def _relative_index(
    q_win: tuple[int, int, int], k_win: tuple[int, int, int], mode: str, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (nq, nk) into a table of the distinct offsets (T, 3), in key-grid units.

    Query positions are mapped to key units: ``down`` queries sit at every second key
    position, ``up`` queries at their parent coarse position. Built outside inference
    mode: a cached tensor made during inference could not be used by training later.
    """
    with torch.inference_mode(False):
        return _build_relative_index(q_win, k_win, mode, device)


def _build_relative_index(
    q_win: tuple[int, int, int], k_win: tuple[int, int, int], mode: str, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    qc = _grid_coords(q_win)
    if mode == "down":
        qc[:, 1:] *= 2
    elif mode == "up":
        qc[:, 1:] //= 2
    kc = _grid_coords(k_win)
    rel = qc[:, None, :] - kc[None, :, :]
    lo = rel.amin(dim=(0, 1))
    span = rel.amax(dim=(0, 1)) - lo + 1
    r = rel - lo
    index = (r[..., 0] * span[1] + r[..., 1]) * span[2] + r[..., 2]
    offsets = _grid_coords(tuple(span.tolist())) + lo
    return index.to(device), offsets.float().to(device)


class RelativePositionBias(nn.Module):
    """Per-head attention bias f(dz, dy, dx) from an MLP over log-scaled offsets.

    Depends only on offsets, never on the input size, so one set of weights serves
    every size (unlike a bias table built for a fixed resolution).
    """

    def __init__(self, heads: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, heads))
        init_linear_trunc_normal(self)
        nn.init.zeros_(self.mlp[2].weight)

    def forward(
        self, q_win: tuple[int, int, int], k_win: tuple[int, int, int], mode: str, device: Any
    ) -> torch.Tensor:
        """Bias of shape (heads, nq, nk) for one window pair.

        Without gradients (inference, not while tracing for export) the bias of each window
        pair is kept until the MLP's weights change: building it gathered a (heads, nq, nk)
        tensor per attention call, ~9% of an ET3dNet forward on the CPU.
        """
        keep = not (self.training or torch.is_grad_enabled() or torch.jit.is_tracing())
        version = self._weights_version() if keep else None
        cache = None if version is None else _bias_cache(self)
        if cache is not None:
            autocast = torch.is_autocast_enabled(torch.device(device).type)
            key = (q_win, k_win, mode, str(device), autocast, version)
            hit = cache.get(key)
            if hit is not None:
                return hit
        index, offsets = _relative_index(q_win, k_win, mode, str(device))
        feats = torch.sign(offsets) * torch.log1p(offsets.abs())
        table = self.mlp(feats.to(self.mlp[0].weight.dtype)).t()
        bias = table[:, index]
        if cache is not None:
            with _BIAS_LOCK:  # the live worker and the caller's thread may share a model
                while len(cache) >= BIAS_CACHE_SIZE:
                    cache.pop(next(iter(cache)))
                cache[key] = bias
        return bias

    def _weights_version(self) -> tuple[tuple[int, int], ...] | None:
        """Changes whenever a weight is replaced or changed in place (None: untracked,
        as for weights made inside inference mode, e.g. a copy made for export)."""
        params = list(self.parameters())
        if any(p.is_inference() for p in params):
            return None
        return tuple((p.data_ptr(), p._version) for p in params)


BIAS_CACHE_SIZE = 8  # window pairs kept per bias module (sizes seen in a row of frames)
# outside the modules, so deep copies (BatchNorm folding, ONNX export) do not copy it
_BIAS_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_BIAS_LOCK = threading.Lock()


def _bias_cache(module: RelativePositionBias) -> dict:
    with _BIAS_LOCK:
        cache = _BIAS_CACHES.get(module)
        if cache is None:
            cache = _BIAS_CACHES[module] = {}
        return cache


# a window may stretch to this many times the trained size rather than add a window of
# mostly masked padding: a 576 px frame (512 + edge pad, rounded to 32) has 18-token
# grids at 1/32 and 36 at 1/16, which windows of 16 pad to 32 and 48 (3.2x and 1.8x
# the tokens); one window of 18 and two of 18 cover them exactly
WINDOW_STRETCH = 1.25


@functools.lru_cache(maxsize=256)
def window_count(size: int, window: int) -> int:
    """How many windows cover `size` tokens: the fewest padded tokens, windows of at most
    `WINDOW_STRETCH` x `window`, ties to the window size closest to the trained one."""
    if size <= window:
        return 1
    lo = max(1, -(-size // int(window * WINDOW_STRETCH)))
    hi = -(-size // window)

    def cost(n: int) -> tuple[int, int]:
        w = -(-size // n)
        return n * w, abs(w - window)

    return min(range(lo, hi + 1), key=cost)


def _window_plan(size: int, window: int, shift: bool) -> tuple[int, int, int]:
    """(window, pad_before, pad_after) along one axis of the coarse attention grid."""
    n = window_count(size, window)
    if n == 1:
        return size, 0, 0
    w = -(-size // n)
    before = w // 2 if shift else 0
    return w, before, (-(size + before)) % w


def _partition(
    t: torch.Tensor, wy: int, wx: int, pads: tuple[int, int, int, int]
) -> tuple[torch.Tensor, int, int]:
    """(B, C, Z, Y, X) -> (B*nWy*nWx, C, Z*wy*wx), zero-padding Y/X by ``pads``."""
    py0, py1, px0, px1 = pads
    if any(pads):
        t = F.pad(t, (px0, px1, py0, py1))
    b, c, z, y, x = t.shape
    ny, nx = y // wy, x // wx
    t = t.reshape(b, c, z, ny, wy, nx, wx).permute(0, 3, 5, 1, 2, 4, 6)
    return t.reshape(b * ny * nx, c, z * wy * wx), ny, nx


def _unpartition(
    t: torch.Tensor, b: int, z: int, ny: int, nx: int, wy: int, wx: int, pads: tuple[int, ...]
) -> torch.Tensor:
    """Inverse of ``_partition`` (crops the padding)."""
    c = t.shape[1]
    t = t.reshape(b, ny, nx, c, z, wy, wx).permute(0, 3, 4, 1, 5, 2, 6)
    t = t.reshape(b, c, z, ny * wy, nx * wx)
    py0, py1, px0, px1 = pads
    return t[..., py0 : ny * wy - py1, px0 : nx * wx - px1]


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    bias: RelativePositionBias,
    window: int,
    shift: bool = False,
    mode: str = "same",
    talking_heads: tuple[nn.Module, nn.Module] | None = None,
) -> torch.Tensor:
    """Multi-head attention of q (B, h*dk, Z, Yq, Xq) over k, v (B, h*d, Z, Yk, Xk).

    ``mode`` is ``same`` (Yq = Yk), ``down`` (Yk = 2 Yq) or ``up`` (Yq = 2 Yk). The
    coarser grid is cut into windows of at most ``window`` tokens per side (global
    attention when it fits); the finer grid uses the matching doubled windows.
    Talking heads mix the logits across heads before and after the softmax.
    """
    qs, ks = _SCALES[mode]
    b, _, z, yq, xq = q.shape
    base_y, base_x = yq // qs, xq // qs
    if (base_y * qs, base_x * qs) != (yq, xq) or (base_y * ks, base_x * ks) != k.shape[-2:]:
        raise ValueError(
            f"query grid {(yq, xq)} and key grid {tuple(k.shape[-2:])} do not match mode {mode!r}"
        )
    wy, py0, py1 = _window_plan(base_y, window, shift)
    wx, px0, px1 = _window_plan(base_x, window, shift)
    pads = (py0, py1, px0, px1)
    q_pads = tuple(p * qs for p in pads)
    k_pads = tuple(p * ks for p in pads)
    qw, ny, nx = _partition(q, wy * qs, wx * qs, q_pads)
    kw, _, _ = _partition(k, wy * ks, wx * ks, k_pads)
    vw, _, _ = _partition(v, wy * ks, wx * ks, k_pads)
    bw, nq, nk = qw.shape[0], qw.shape[-1], kw.shape[-1]
    qh = qw.reshape(bw, heads, -1, nq).transpose(-2, -1)
    kh = kw.reshape(bw, heads, -1, nk)
    # scale the queries, not the (nq, nk) logits; add the bias in place: in 3D the logits
    # are the largest tensors of the network and each pass over them costs
    logits = (qh * qh.shape[-1] ** -0.5) @ kh
    logits += bias((z, wy * qs, wx * qs), (z, wy * ks, wx * ks), mode, q.device)
    if talking_heads is not None:
        logits = talking_heads[0](logits)
    if any(pads):
        valid = q.new_ones((1, 1, z, *k.shape[-2:]))
        valid = _partition(valid, wy * ks, wx * ks, k_pads)[0] > 0
        valid = valid.repeat(b, 1, 1).reshape(bw, 1, 1, nk)
        logits = logits.masked_fill_(~valid, float("-inf"))
    attn = logits.softmax(dim=-1)
    if talking_heads is not None:
        attn = talking_heads[1](attn)
    # (v @ attn^T) lands in channel-first order: no transpose of the output to copy
    out = (vw.reshape(bw, heads, -1, nk) @ attn.transpose(-2, -1)).reshape(bw, -1, nq)
    return _unpartition(out, b, z, ny, nx, wy * qs, wx * qs, q_pads)


def _to5d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if x.ndim == 4 else x


def _from5d(x: torch.Tensor, dims: int) -> torch.Tensor:
    return x.squeeze(2) if dims == 2 else x


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class Attention(nn.Module):
    """EfficientFormerV2 MHSA token mixer: talking heads, position bias, local values.

    With ``strided`` the attention runs on a stride-2 depthwise-conv copy of the map and
    is upsampled back (used at 1/16 so that its tokens live on the 1/32 grid).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        key_dim: int,
        attn_ratio: int,
        dims: int = 2,
        strided: bool = False,
        window: int = 16,
        shift: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.dims, self.window, self.shift = heads, dims, window, shift
        dh = heads * key_dim * attn_ratio
        self.stride_conv = (
            ConvNorm(dim, dim, 3, stride=2, groups=dim, dims=dims) if strided else None
        )
        self.q = ConvNorm(dim, heads * key_dim, dims=dims)
        self.k = ConvNorm(dim, heads * key_dim, dims=dims)
        self.v = ConvNorm(dim, dh, dims=dims)
        self.v_local = ConvNorm(dh, dh, 3, groups=dh, dims=dims)
        self.talking_head1 = nn.Conv2d(heads, heads, 1)
        self.talking_head2 = nn.Conv2d(heads, heads, 1)
        self.bias = RelativePositionBias(heads)
        self.act = nn.GELU()
        self.proj = ConvNorm(dh, dim, dims=dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        v = self.v(x)
        out = windowed_attention(
            _to5d(self.q(x)),
            _to5d(self.k(x)),
            _to5d(v),
            self.heads,
            self.bias,
            self.window,
            shift=self.shift,
            talking_heads=(self.talking_head1, self.talking_head2),
        )
        out = _from5d(out, self.dims) + self.v_local(v)
        if self.stride_conv is not None:
            out = _resize(out, size)
        return self.proj(self.act(out))


class AttentionResample(nn.Module):
    """Attention that halves (``down``) or doubles (``up``) Y and X.

    Queries come from a resampled path (strided depthwise conv + subsampling, or
    transposed depthwise conv + bilinear upsampling), keys and values from the input
    map; a resampled depthwise conv of the values adds the local term (as
    EfficientFormerV2's Attention4DDownsample and its decoder mirror in EViT-UNet).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int,
        key_dim: int,
        attn_ratio: int,
        dims: int = 2,
        mode: str = "down",
        window: int = 16,
    ) -> None:
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"mode must be 'down' or 'up', got {mode!r}")
        self.heads, self.dims, self.mode, self.window = heads, dims, mode, window
        dh = heads * key_dim * attn_ratio
        if mode == "down":
            self.q_local = ConvNorm(in_dim, in_dim, 3, stride=2, groups=in_dim, dims=dims)
            self.v_local = ConvNorm(dh, dh, 3, stride=2, groups=dh, dims=dims)
        else:
            self.q_local = ConvTransposeNorm(in_dim, in_dim, groups=in_dim, dims=dims)
            self.v_local = ConvTransposeNorm(dh, dh, groups=dh, dims=dims)
        self.q = ConvNorm(in_dim, heads * key_dim, dims=dims)
        self.k = ConvNorm(in_dim, heads * key_dim, dims=dims)
        self.v = ConvNorm(in_dim, dh, dims=dims)
        self.bias = RelativePositionBias(heads)
        self.act = nn.GELU()
        self.proj = ConvNorm(dh, out_dim, dims=dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.q_local(x)
        if self.mode == "down":
            pooled = x[..., ::2, ::2]
        else:
            pooled = _resize(x, tuple(local.shape[2:]))
        v = self.v(x)
        out = windowed_attention(
            _to5d(self.q(local + pooled)),
            _to5d(self.k(x)),
            _to5d(v),
            self.heads,
            self.bias,
            self.window,
            mode=self.mode,
        )
        out = _from5d(out, self.dims) + self.v_local(v)
        return self.proj(self.act(out))


class FFN(nn.Module):
    """1x1 expand, depthwise 3x3, 1x1 project (BN after each, GELU after the first two)."""

    def __init__(self, dim: int, hidden: int, dims: int = 2) -> None:
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden, dims=dims, act=True)
        self.mid = ConvNorm(hidden, hidden, 3, groups=hidden, dims=dims, act=True)
        self.fc2 = ConvNorm(hidden, dim, dims=dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.mid(self.fc1(x)))


class Block(nn.Module):
    """Residual block: optional attention mixer, then FFN; layer scale and DropPath."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        dims: int = 2,
        drop_path: float = 0.0,
        mixer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.mixer = mixer
        self.ls1 = LayerScale(dim) if mixer is not None else None
        self.ffn = FFN(dim, int(dim * mlp_ratio), dims)
        self.ls2 = LayerScale(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:
            x = x + self.drop_path(self.ls1(self.mixer(x)))
        return x + self.drop_path(self.ls2(self.ffn(x)))


class Resample(nn.Module):
    """Strided conv (``down``) or transposed conv (``up``), plus optional attention path."""

    def __init__(
        self, in_dim: int, out_dim: int, mode: str, dims: int, attn: nn.Module | None = None
    ) -> None:
        super().__init__()
        if mode == "down":
            self.conv = ConvNorm(in_dim, out_dim, 3, stride=2, dims=dims)
        else:
            self.conv = ConvTransposeNorm(in_dim, out_dim, dims=dims)
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out if self.attn is None else out + self.attn(x)


class ChannelAttentionFusion(nn.Module):
    """CCA skip fusion: channel gates from pooled skip and decoder features, then concat.

    gate = sigmoid((W_s gap(skip) + W_d gap(dec)) / 2); out = conv3x3([dec, relu(skip*gate)]).
    """

    def __init__(self, dim: int, dims: int = 2) -> None:
        super().__init__()
        self.gate_skip = nn.Linear(dim, dim)
        self.gate_dec = nn.Linear(dim, dim)
        self.fuse = ConvNorm(2 * dim, dim, 3, dims=dims)
        init_linear_trunc_normal(self)

    def forward(self, dec: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, skip.ndim))
        logits = self.gate_skip(skip.mean(spatial)) + self.gate_dec(dec.mean(spatial))
        gate = torch.sigmoid(0.5 * logits).reshape(*logits.shape, *(1,) * len(spatial))
        return self.fuse(torch.cat([dec, F.relu(skip * gate)], dim=1))


class EViTUNet(nn.Module):
    """EViT-UNet backbone; input (B, C, Y, X) or (B, C, Z, Y, X), output same size.

    Any Y/X works (padded to a multiple of 32 internally, cropped back); any Z in 3D.
    """

    def __init__(
        self,
        variant: str = "S0",
        in_channels: int = 1,
        out_channels: int = 2,
        dims: int = 2,
        drop_path: float = 0.0,
        attn_window: int = 16,
        attn_up_eighth: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if attn_window < 1:
            raise ValueError(f"attn_window must be >= 1, got {attn_window}")
        self._config = {
            "variant": variant,
            "in_channels": int(in_channels),
            "out_channels": int(out_channels),
            "dims": int(dims),
            "drop_path": float(drop_path),
            "attn_window": int(attn_window),
            "attn_up_eighth": bool(attn_up_eighth),
        }
        cfg = VARIANTS[variant]
        self.cfg, self.dims, self.in_channels = cfg, dims, in_channels
        self.attn_window = attn_window
        self.attn_up_eighth = bool(attn_up_eighth)
        widths, depths = cfg["widths"], cfg["depths"]
        rates = torch.linspace(0.0, drop_path, sum(depths)).tolist()
        dpr = [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(4)]

        w0 = widths[0]
        self.stem = nn.Sequential(
            ConvNorm(in_channels, w0 // 2, 3, stride=2, dims=dims, act=True),
            ConvNorm(w0 // 2, w0, 3, stride=2, dims=dims, act=True),
        )
        self.encoder = nn.ModuleList(self._stage(i, dpr[i]) for i in range(4))
        self.downs = nn.ModuleList(
            Resample(widths[i], widths[i + 1], "down", dims, self._resample_attn(i, "down"))
            for i in range(3)
        )
        self.decoder = nn.ModuleList(self._stage(i, dpr[i]) for i in range(4))
        self.ups = nn.ModuleList(
            Resample(widths[i + 1], widths[i], "up", dims, self._resample_attn(i, "up"))
            for i in range(3)
        )
        self.fusions = nn.ModuleList(ChannelAttentionFusion(widths[i], dims) for i in range(3))
        self.head = nn.Sequential(
            ConvTransposeNorm(w0, w0 // 2, dims=dims, act=True),
            ConvTransposeNorm(w0 // 2, w0 // 2, dims=dims, act=True),
            conv_cls(dims)(w0 // 2, out_channels, 1),
        )

    def _stage(self, level: int, rates: list[float]) -> nn.Sequential:
        cfg, depth = self.cfg, self.cfg["depths"][level]
        first_attn = depth - cfg["num_vit"] if level >= 2 else depth
        blocks = []
        for j in range(depth):
            mixer = None
            if j >= first_attn:
                mixer = Attention(
                    cfg["widths"][level],
                    cfg["heads"],
                    cfg["key_dim"],
                    cfg["attn_ratio"],
                    dims=self.dims,
                    strided=level == 2,
                    window=self.attn_window,
                    shift=(j - first_attn) % 2 == 1,
                )
            blocks.append(
                Block(cfg["widths"][level], cfg["mlp_ratios"][level][j], self.dims, rates[j], mixer)
            )
        return nn.Sequential(*blocks)

    def _resample_attn(self, level: int, mode: str) -> AttentionResample | None:
        """Attention path for the resampling between 1/16 (level 2) and 1/32, and, with
        `attn_up_eighth`, for the 1/16 -> 1/8 upsample too (as the EViT-UNet reference)."""
        if not (level == 2 or (level == 1 and mode == "up" and self.attn_up_eighth)):
            return None
        cfg, widths = self.cfg, self.cfg["widths"]
        lo, hi = widths[level], widths[level + 1]
        in_dim, out_dim = (lo, hi) if mode == "down" else (hi, lo)
        return AttentionResample(
            in_dim,
            out_dim,
            cfg["heads"],
            cfg["resample_key_dim"],
            cfg["attn_ratio"],
            dims=self.dims,
            mode=mode,
            window=self.attn_window,
        )

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable) to rebuild this model from a checkpoint."""
        return dict(self._config)

    @classmethod
    def from_arch_config(cls, config: dict[str, Any]) -> EViTUNet:
        """Build a model from ``arch_config()`` output."""
        return cls(**config)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.dims + 2:
            axes = "(B, C, Y, X)" if self.dims == 2 else "(B, C, Z, Y, X)"
            raise ValueError(f"expected a {self.dims + 2}-D input {axes}, got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")

    @staticmethod
    def _pad(x: torch.Tensor) -> torch.Tensor:
        """Pad Y and X at the end to a multiple of 32 (reflect, or replicate if too small)."""
        py = (-x.shape[-2]) % _MULTIPLE
        px = (-x.shape[-1]) % _MULTIPLE
        if py == 0 and px == 0:
            return x
        mode = "reflect" if py < x.shape[-2] and px < x.shape[-1] else "replicate"
        pad = (0, px, 0, py) if x.ndim == 4 else (0, px, 0, py, 0, 0)
        return F.pad(x, pad, mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        ny, nx = x.shape[-2:]
        x = self.stem(self._pad(x))
        skips = []
        for level in range(4):
            if level > 0:
                x = self.downs[level - 1](x)
            x = self.encoder[level](x)
            skips.append(x)
        x = self.decoder[3](x)
        for level in (2, 1, 0):
            x = self.fusions[level](self.ups[level](x), skips[level])
            x = self.decoder[level](x)
        return self.head(x)[..., :ny, :nx]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def estimate_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward FLOPs (2 x multiply-accumulates of convs, linears and matmuls) for one input.

    Uses ``torch.utils.flop_counter.FlopCounterMode`` on a zero input in eval mode.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(input_shape, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
