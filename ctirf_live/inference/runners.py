"""How the live worker runs the model: on the CPU, or streamed through a CUDA GPU.

Both runners split one restoration into `stage` (get the pixels to the device),
`launch` (start the model) and `finish` (wait, return a numpy result), so the worker
can stage frame n+1 while frame n computes.

`CudaRunner` is the GPU path: each frame is copied into a reused page-locked (pinned)
host buffer and sent to the GPU on a dedicated copy stream, so the transfer of the next
frame overlaps the current frame's compute on a second stream. Camera frames travel as
they come (uint16: half the bytes of float32) and are converted on the GPU. Normalisation
(Eq. 1, the percentile from a histogram for integer frames), tiling (one pass for the
whole frame by default, `Restorer.plan`), blending (windows cached on the device) and
rescaling happen on the GPU as `Restorer` does them on the host; half precision follows
`Restorer.half` (autocast). NaN/inf checks of input and output run on the GPU too and
come back with the result through pinned buffers. `CpuRunner` calls `Restorer.restore`.

With a `scorer` set (the consistency monitor's `restore_scored`), both runners restore
through it on the model's device, and `finish` returns (cTIRF, scores, residual map).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctirf_live.data.normalize import EPS
from ctirf_live.inference.restorer import EDGE_PAD, Restorer
from ctirf_live.inference.tiling import MIN_WEIGHT, blend_window


class CpuRunner:
    """Synchronous restoration with `Restorer.restore` (any device, no pipelining)."""

    pipelined = False

    def __init__(self, restorer: Restorer) -> None:
        self.restorer = restorer
        self.scorer: Scorer | None = None

    def stage(self, data: np.ndarray) -> np.ndarray:
        return data

    def launch(self, staged: np.ndarray) -> Any:
        if self.scorer is None:
            return self.restorer.restore(staged)
        x = torch.from_numpy(np.ascontiguousarray(staged, np.float32)).to(self.restorer.device)
        return tuple(t.cpu().numpy() for t in self.scorer(self.restorer, x))

    def finish(self, launched: Any) -> Any:
        return launched

    def warmup(self, shape: tuple[int, ...]) -> None:
        """Run the model once at the frame size so the first real frame is not slowed."""
        self.restorer.warmup(shape[-2:])


Scorer = Callable[[Restorer, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(restorer, frame tensor) -> (cTIRF, per-plane scores, residual map), on the device."""


HISTOGRAM_DTYPES = (torch.uint8, torch.uint16)


def _percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """np.percentile's linear interpolation, on the tensor's device, without a sync.

    Camera frames (uint8/uint16) use a histogram of all 2^8 / 2^16 values: the order
    statistics come from its cumulative sum (exact, one pass, no sort); other dtypes
    use `kthvalue`. Returns a float32 0-d tensor.
    """
    flat = x.reshape(-1)
    pos = q / 100.0 * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if flat.dtype in HISTOGRAM_DTYPES:
        cumulative = torch.bincount(flat.int()).cumsum(0)
        ranks = torch.tensor([lo + 1, hi + 1], device=flat.device, dtype=cumulative.dtype)
        v_lo, v_hi = torch.searchsorted(cumulative, ranks).float()
    else:
        flat = flat.float()
        v_lo = flat.kthvalue(lo + 1).values
        if hi == lo:
            return v_lo
        v_hi = flat.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


@functools.lru_cache(maxsize=32)
def _window(size: tuple[int, int], overlap: int, device: torch.device) -> torch.Tensor:
    """A tile's blend window, made once per size and device (not per frame)."""
    with torch.inference_mode(False):
        return torch.from_numpy(blend_window(size, overlap)).to(device)


@torch.inference_mode()
def restore_tensor(restorer: Restorer, x: torch.Tensor) -> torch.Tensor:
    """`Restorer.restore` on a float tensor already on the model's device.

    `x` is a frame `(Y, X)`, a series `(N, Y, X)` for a 2D net (each slice normalised on
    its own) or a stack `(Z, Y, X)` for a 3D net. Returns cTIRF in the input's scale.
    """
    if restorer.dims == 2 and x.ndim == 3:
        return torch.stack([restore_tensor(restorer, s) for s in x])
    _, out, scale = forward_parts(restorer, x, ("ctirf",))
    return out[0] * scale


@torch.inference_mode()
def forward_parts(
    restorer: Restorer, x: torch.Tensor, parts: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One frame `(Y, X)` (2D net) or stack `(Z, Y, X)` (3D net) through the tiled network.

    Returns the normalised input, the network outputs named in `parts` (fields of
    `ETOutput`: ctirf, recon, g, b) stacked on a new leading axis on the normalised
    scale, and the normalisation scale (a 0-d tensor), all on `x`'s device. `x` may be
    a camera dtype (uint16), converted here after its percentile is taken.
    """
    scale = _percentile(x, restorer.percentile)
    x = x.float()
    scale = torch.where(scale <= EPS, x.max(), scale).clamp_min(EPS)
    norm = (x / scale).clamp(0.0, 1.0)
    out = _tiled(restorer, _pad_edges(norm), parts)
    return norm, out[..., EDGE_PAD:-EDGE_PAD, EDGE_PAD:-EDGE_PAD], scale


def _pad_edges(norm: torch.Tensor) -> torch.Tensor:
    """Reflect-pad Y and X by `EDGE_PAD`, as `Restorer` does (no rim at the frame edge)."""
    flat = norm.reshape(1, -1, *norm.shape[-2:])
    padded = F.pad(flat, (EDGE_PAD,) * 4, mode="reflect")[0]
    return padded.reshape(*norm.shape[:-2], *padded.shape[-2:])


def _tiled(restorer: Restorer, norm: torch.Tensor, parts: tuple[str, ...]) -> torch.Tensor:
    """Overlapping tiles through the network, blended (normalised input and output):
    `(len(parts), *norm.shape)`."""
    tiles = restorer.plan(tuple(norm.shape[-2:]))
    if len(tiles) == 1:
        return _forward(restorer, norm[None], parts)[0]
    acc = norm.new_zeros((len(parts), *norm.shape))
    weight = torch.zeros(norm.shape[-2:], dtype=norm.dtype, device=norm.device)
    groups: dict[tuple[int, int], list] = {}
    for t in tiles:
        groups.setdefault((t.y1 - t.y0, t.x1 - t.x0), []).append(t)
    for size, group in groups.items():
        w = _window(size, restorer.overlap, norm.device)
        for i in range(0, len(group), restorer.batch_size):
            batch = group[i : i + restorer.batch_size]
            crops = torch.stack([norm[(..., *t.slices)] for t in batch])
            for t, res in zip(batch, _forward(restorer, crops, parts), strict=True):
                ys, xs = t.slices
                acc[..., ys, xs] += res * w
                weight[ys, xs] += w
    return acc / weight.clamp_min(MIN_WEIGHT * MIN_WEIGHT)


def _forward(restorer: Restorer, batch: torch.Tensor, parts: tuple[str, ...]) -> torch.Tensor:
    out = restorer.forward(batch[:, None].float())
    return torch.cat([getattr(out, p) for p in parts], 1).float()


@dataclass
class _Staged:
    tensor: torch.Tensor
    ready: Any


@dataclass
class _Launched:
    host: torch.Tensor
    done: Any
    extras: tuple[torch.Tensor, ...] = ()
    flags: torch.Tensor | None = None  # pinned [input finite, output finite]


UPLOAD_DTYPES = {  # frames sent to the GPU in their own dtype; others as float32
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.float32): torch.float32,
}


class CudaRunner:
    """Pinned host buffers + a copy stream and a compute stream on one CUDA device."""

    pipelined = True
    checks_finite = True  # `finish` raises on NaN/inf input or output (checked on the GPU)

    def __init__(self, restorer: Restorer) -> None:
        if restorer.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("CudaRunner needs a Restorer on an available CUDA device")
        self.restorer = restorer
        self.device = restorer.device
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self._in: dict[tuple[Any, ...], list] = {}
        self._out: dict[tuple[Any, ...], list] = {}
        self._flags: dict[tuple[Any, ...], list] = {}
        self.scorer: Scorer | None = None

    @staticmethod
    def _slot(
        pool: dict, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The next of two pinned buffers for `shape` (one in flight, one being filled)."""
        key = (*shape, dtype)
        entry = pool.get(key)
        if entry is None:
            buffers = [torch.empty(shape, dtype=dtype).pin_memory() for _ in range(2)]
            entry = pool[key] = [buffers, 0]
        entry[1] ^= 1
        return entry[0][entry[1]]

    def stage(self, data: np.ndarray) -> _Staged:
        """Copy into pinned memory and start the host-to-device transfer (non-blocking);
        uint8/uint16/float32 frames travel as they are, other dtypes as float32."""
        dtype = UPLOAD_DTYPES.get(data.dtype, torch.float32)
        host = self._slot(self._in, tuple(data.shape), dtype)
        np.copyto(host.numpy(), data, casting="unsafe")
        with torch.cuda.stream(self.copy_stream):
            dev = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return _Staged(dev, ready)

    def launch(self, staged: _Staged) -> _Launched:
        """Queue normalisation, the tiled model and the copy back on the compute stream."""
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(staged.ready)
            staged.tensor.record_stream(self.compute_stream)
            x = staged.tensor
            extras: tuple[torch.Tensor, ...] = ()
            if self.scorer is None:
                out = restore_tensor(self.restorer, x)
            else:
                out, *rest = self.scorer(self.restorer, x)
                extras = tuple(rest)
            host = self._slot(self._out, tuple(out.shape))
            host.copy_(out, non_blocking=True)
            finite_in = torch.isfinite(x).all() if x.is_floating_point() else out.new_ones(())
            checks = torch.stack([finite_in.bool(), torch.isfinite(out).all()])
            flags = self._slot(self._flags, (2,), torch.bool)
            flags.copy_(checks, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.compute_stream)
        return _Launched(host, done, extras, flags)

    def finish(self, launched: _Launched) -> Any:
        """Wait for the result and hand back a copy the caller may keep (with a scorer:
        the tuple (cTIRF, scores, residual map)); raises on NaN/inf input or output."""
        launched.done.synchronize()
        if launched.flags is not None:
            finite_in, finite_out = (bool(v) for v in launched.flags.tolist())
            if not finite_in:
                raise ValueError("frame contains NaN or infinite values; check the camera")
            if not finite_out:
                raise FloatingPointError("model output contains NaN or infinite values")
        result = launched.host.numpy().copy()
        if not launched.extras:
            return result
        return (result, *(t.cpu().numpy() for t in launched.extras))

    def warmup(self, shape: tuple[int, ...]) -> None:
        """Warm up both paths (cuDNN autotuning, allocator) at the frame size."""
        self.restorer.warmup(shape[-2:])
        r = self.restorer
        planes = (int(r.metadata.get("planes") or 6),) if r.dims == 3 else ()
        dummy = np.zeros((*planes, *shape[-2:]), np.float32)
        dummy[..., shape[-2] // 2, shape[-1] // 2] = 1.0
        self.finish(self.launch(self.stage(dummy)))


def make_runner(restorer: Restorer) -> CpuRunner | CudaRunner:
    """The CUDA streaming runner on a CUDA restorer, the plain one otherwise."""
    if restorer.device.type == "cuda" and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            return CudaRunner(restorer)
    return CpuRunner(restorer)
