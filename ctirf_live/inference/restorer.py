"""`Restorer`: EPI frames or stacks in, cTIRF out, in the input's intensity scale.

Pipeline per frame: percentile normalisation of the whole frame (Eq. 1, so every tile
shares one scale) -> reflect padding of the edges -> overlapping tiles -> batched network
-> blended -> cropped -> rescaled.
ET2dNet handles frames `(Y, X)` and series `(N, Y, X)` slice by slice; ET3dNet takes
stacks `(Z, Y, X)` with the planes it was trained on, or `(T, Z, Y, X)`.

A frame no larger than the tile runs in one forward pass (the edge padding never splits
it into tiles); on CUDA the whole frame does (e.g. 2048x2048), as long as memory allows.

Inference runs a copy of the network with BatchNorm folded into the convolutions
(`models/fold.py`). Backends: `torch`, or `onnx` (ONNX Runtime for the backbone, the PSF
convolution in torch; `inference/onnx_backend.py`), which `auto` picks on the CPU when
onnxruntime is installed (`CTIRF_BACKEND=torch` turns that off), for 2D models only: on
ET3dNet's 3D graph ONNX Runtime aborted with heap corruption in 1 of 3 runs here, so 3D
models run in torch and an explicit `onnx` for one is refused. On CUDA it runs in half
precision (autocast) with cuDNN autotuning; `compile=True` adds `torch.compile` with
static shapes (CUDA graphs on a GPU). When the GPU runs out of memory it falls back to
tiles, then smaller tiles and, as a last resort, moves to the CPU.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctirf_live.config import Optics
from ctirf_live.data.normalize import normalize
from ctirf_live.inference.onnx_backend import OnnxBackbone, onnxruntime_available
from ctirf_live.inference.tiling import Blender, Tile, iter_batches, plan_tiles
from ctirf_live.models.device import select_device
from ctirf_live.models.etnet import ETNet, ETOutput, load_model
from ctirf_live.models.fold import fold_batchnorm
from ctirf_live.models.onnx_export import INSTALL_HINT

log = logging.getLogger(__name__)

MIN_SIDE = 32
# frames are reflect-padded by this much before the network and cropped after: the
# network's own zero padding otherwise leaves a visible rim in the outermost pixels
EDGE_PAD = 16
OUTPUTS = ("ctirf", "g", "background", "recon", "ctirf+recon")
# "recon" is the network's reconstructed EPI x^ = g * psf + b; "ctirf+recon" returns both
# from one forward pass, stacked on a new leading axis (for the consistency monitor)
BACKENDS = ("auto", "torch", "onnx")
BACKEND_ENV = "CTIRF_BACKEND"  # what `auto` means when set: torch or onnx
ONNX_3D_REFUSED = (
    "the onnx backend runs 2D models only: ONNX Runtime corrupted the heap on ET3dNet's 3D "
    "graph (1 abort in 3 runs here); use --backend torch for 3D models"
)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`torch` or `onnx` for a requested backend on a device (see the module docstring)."""
    choice = str(backend).lower()
    if choice not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if choice == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip().lower()
        if env in ("torch", "onnx"):
            choice = env
        else:
            return "onnx" if device.type == "cpu" and onnxruntime_available() else "torch"
    if choice == "onnx":
        if device.type != "cpu":
            raise ValueError(
                f"the onnx backend runs on the CPU, not {device}; use --device cpu "
                "or --backend torch"
            )
        if not onnxruntime_available():
            raise ValueError(f"the onnx backend needs ONNX Runtime: {INSTALL_HINT}")
    return choice


def pixel_size_warning(model_optics: Optics, pixel_size_um: float | None) -> str | None:
    """A one-line warning when data and model pixel sizes differ by more than 5%."""
    if not pixel_size_um:
        return None
    ratio = pixel_size_um / model_optics.pixel_size_um
    if abs(ratio - 1) <= 0.05:
        return None
    return (
        f"model was trained at {model_optics.pixel_size_um * 1000:.1f} nm pixels "
        f"({model_optics.objective}) but the data has {pixel_size_um * 1000:.1f} nm; "
        "results may be wrong: fine-tune with `ctirf finetune --data PAIRS --from MODEL`"
    )


class Restorer:
    """Restore EPI frames/stacks to cTIRF with an ETNet checkpoint."""

    def __init__(
        self,
        model: ETNet | str | Path,
        *,
        device: str | torch.device = "auto",
        half: bool | None = None,
        tile: int = 512,
        overlap: int = 64,
        batch_size: int = 4,
        percentile: float | None = None,
        metadata: dict[str, Any] | None = None,
        backend: str = "auto",
        whole_frame: bool | None = None,
        compile: bool = False,
        fold: bool = True,
    ) -> None:
        self.device = select_device(device)
        self.backend = resolve_backend(backend, self.device)
        if isinstance(model, ETNet):
            self.model, self.metadata = model, dict(metadata or {})
        else:
            self.model, self.metadata = load_model(model, "cpu")
        self.model = self.model.to(self.device).eval()
        if self.backend == "onnx" and self.model.dims == 3:
            if str(backend).lower() == "onnx":
                raise ValueError(ONNX_3D_REFUSED)
            self.backend = "torch"  # auto: 3D graphs stay in torch (ONNX_3D_REFUSED)
        # `model` stays as given (it may be saved or trained on); inference runs a copy
        self.inference_model = fold_batchnorm(self.model) if fold else self.model
        self.half = (self.device.type == "cuda") if half is None else bool(half)
        self.whole_frame = (self.device.type == "cuda") if whole_frame is None else whole_frame
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned kernels pay off
        self._onnx = OnnxBackbone(self.inference_model) if self.backend == "onnx" else None
        self._compiled: Any = None
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs
            self._compiled = torch.compile(
                self.inference_model.backbone, dynamic=False, mode=mode
            )
        if tile % 32 or tile < 64:
            raise ValueError(f"tile must be a multiple of 32 and >= 64, got {tile}")
        self.tile, self.overlap, self.batch_size = tile, overlap, max(1, batch_size)
        norm = self.metadata.get("normalization") or {}
        self.percentile = float(percentile or norm.get("percentile", 98.0))
        self.input_ceiling = self.model.input_ceiling
        self.warmed_up = False

    @property
    def optics(self) -> Optics:
        return self.model.optics

    @property
    def dims(self) -> int:
        return self.model.dims

    def describe(self) -> dict[str, Any]:
        """Model facts for output metadata."""
        return {
            "model": self.metadata.get("path", type(self.model).__name__),
            "architecture": self.model.arch_config(),
            "optics": self.optics.model_dump(),
            "psf": {"model": self.model.psf_model},
            "percentile": self.percentile,
            "input_ceiling": self.input_ceiling,
            "device": str(self.device),
            "half_precision": self.half,
            "backend": self.backend,
        }

    # -- public API -------------------------------------------------------------------

    def warmup(self, shape: Sequence[int] = (512, 512)) -> None:
        """Run once on a blank input so the first real frame is not slowed by set-up."""
        planes = self._planes() if self.dims == 3 else None
        shape = tuple(shape[-2:])
        dummy = np.zeros(((planes,) if planes else ()) + shape, np.float32)
        dummy[..., shape[0] // 2, shape[1] // 2] = 1.0
        self._restore_one(dummy, "ctirf")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed_up = True

    def restore(self, image: np.ndarray, output: str = "ctirf") -> np.ndarray:
        """Restore a frame `(Y, X)`, a series `(N, Y, X)` (2D net) or stacks (3D net)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}")
        arr = self._check(image)
        item_ndim = 2 if self.dims == 2 else 3
        if arr.ndim == item_ndim:
            return self._restore_one(arr, output)
        if arr.ndim == item_ndim + 1:
            return np.stack([self._restore_one(a, output) for a in arr])
        kind = "(Y, X) or (N, Y, X)" if self.dims == 2 else "(Z, Y, X) or (T, Z, Y, X)"
        raise ValueError(f"{self.model.name} expects {kind}, got shape {arr.shape}")

    __call__ = restore

    def restore_normalised(self, norm: np.ndarray, output: str = "ctirf") -> np.ndarray:
        """The network on an item already normalised (and edge-padded) by the caller,
        tiled, windowed and blended as `restore` does; the result stays normalised.
        For chunk-wise processing, where a block's scale is its whole frame's."""
        if self.dims == 3:
            return self._run_windows(np.asarray(norm, np.float32), output)
        return self._run_tiled(np.asarray(norm, np.float32), output)

    # -- internals --------------------------------------------------------------------

    def _planes(self) -> int:
        return int(self.metadata.get("planes") or 6)

    def _check(self, image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image)
        if arr.ndim < 2 or min(arr.shape[-2:]) < MIN_SIDE:
            raise ValueError(
                f"frame of shape {arr.shape} is too small; cTIRF needs at least "
                f"{MIN_SIDE}x{MIN_SIDE} pixels"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError("image contains NaN or infinite values; check the input file")
        if arr.dtype.kind not in "uif":
            raise ValueError(f"unsupported image dtype {arr.dtype}; use integer or float pixels")
        return arr

    def _restore_one(self, item: np.ndarray, output: str) -> np.ndarray:
        norm, scale = normalize(item, self.percentile, ceiling=self.input_ceiling)
        pad = [(0, 0)] * (norm.ndim - 2) + [(EDGE_PAD, EDGE_PAD)] * 2
        padded = np.pad(norm, pad, mode="reflect")
        if self.dims == 3:
            out = self._run_windows(padded, output)
        else:
            out = self._run_tiled(padded, output)
        return out[..., EDGE_PAD:-EDGE_PAD, EDGE_PAD:-EDGE_PAD] * np.float32(scale)

    @property
    def z_step_um(self) -> float:
        """Plane spacing a 3D model was trained on (its optics' z step otherwise)."""
        stack = self.metadata.get("stack") or {}
        return float(stack.get("z_step_um") or self.optics.z_step_um)

    def check_stack(self, planes: int, z_step_um: float | None = None) -> None:
        """Refuse a stack a 3D model cannot restore, naming the stack's and the model's
        plane count or z step (stacks longer than the model's run in sliding windows)."""
        if self.dims != 3:
            return
        need = self._planes()
        if planes < need:
            raise ValueError(
                f"the stack has {planes} planes but {self.model.name} was trained on {need}: "
                f"record stacks of at least {need} planes or use an ET2dNet model"
            )
        if z_step_um is not None and abs(z_step_um - self.z_step_um) > 0.1 * self.z_step_um:
            raise ValueError(
                f"the stack's z step is {z_step_um * 1000:.0f} nm but {self.model.name} was "
                f"trained on {self.z_step_um * 1000:.0f} nm: record with that step or distil "
                "a model for this one (ctirf distill)"
            )

    def _run_windows(self, norm: np.ndarray, output: str) -> np.ndarray:
        """A 3D model on its trained plane count: longer stacks in windows that overlap
        by half, blended with triangular weights along Z (one normalisation for all)."""
        need = self._planes()
        nz = norm.shape[0]
        self.check_stack(nz)
        if nz == need:
            return self._run_tiled(norm, output)
        starts = list(range(0, nz - need + 1, max(1, need // 2)))
        if starts[-1] != nz - need:
            starts.append(nz - need)
        weight = (1.0 - np.abs(np.arange(need) - (need - 1) / 2) / (need / 2)).astype(np.float32)
        acc: np.ndarray | None = None
        total = np.zeros(nz, np.float32)
        for z0 in starts:
            res = self._run_tiled(norm[z0 : z0 + need], output)  # (..., Z, Y, X)
            if acc is None:
                acc = np.zeros((*res.shape[:-3], *norm.shape), np.float32)
            acc[..., z0 : z0 + need, :, :] += res * weight[:, None, None]
            total[z0 : z0 + need] += weight
        assert acc is not None
        return acc / total[:, None, None]

    def _run_tiled(self, norm: np.ndarray, output: str) -> np.ndarray:
        tile = self.tile
        while True:
            try:
                return self._tiled_pass(norm, output, tile)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if self.whole_frame:
                    self.whole_frame = False
                    log.warning("CUDA out of memory for the whole frame: using %d px tiles", tile)
                    continue
                if tile > 128:
                    tile //= 2
                    log.warning("CUDA out of memory: retrying with %d px tiles", tile)
                    self.tile = tile
                    continue
                warnings.warn(
                    "CUDA out of memory even with small tiles; moving to CPU", stacklevel=2
                )
                self.device = torch.device("cpu")
                self.model = self.model.to(self.device)
                self.inference_model = self.inference_model.to(self.device)
                self._compiled = None
                self.half = False

    def plan(self, shape: Sequence[int], tile: int | None = None) -> list[Tile]:
        """Tiles of an edge-padded frame `(Y, X)`: one tile for the whole frame when the
        frame fits the tile before its padding, or always with `whole_frame` (CUDA)."""
        tile = self.tile if tile is None else tile
        ny, nx = int(shape[-2]), int(shape[-1])
        if self.whole_frame or max(ny, nx) <= tile + 2 * EDGE_PAD:
            return [Tile(0, ny, 0, nx)]
        return plan_tiles((ny, nx), tile, min(self.overlap, tile // 2))

    def _tiled_pass(self, norm: np.ndarray, output: str, tile: int) -> np.ndarray:
        tiles = self.plan(norm.shape[-2:], tile)
        if len(tiles) == 1:
            return self._forward(norm[None], output)[0]
        shape = (2, *norm.shape) if output == "ctirf+recon" else norm.shape
        blender = Blender(shape, self.overlap)
        shapes: dict[tuple[int, int], list] = {}
        for t in tiles:  # tiles of one size batch together; edge tiles may be smaller
            shapes.setdefault((t.y1 - t.y0, t.x1 - t.x0), []).append(t)
        for group in shapes.values():
            for batch in iter_batches(group, self.batch_size):
                crops = np.stack([norm[(..., *t.slices)] for t in batch])
                for t, res in zip(batch, self._forward(crops, output), strict=True):
                    blender.add(t, res)
        return blender.result()

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray, output: str) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))[:, None]
        out = self.forward(x.to(self.device, non_blocking=True))
        if output == "ctirf+recon":
            return torch.cat([out.ctirf, out.recon], 1).float().cpu().numpy()
        result = {"ctirf": out.ctirf, "g": out.g, "background": out.b, "recon": out.recon}[output]
        return result[:, 0].float().cpu().numpy()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> ETOutput:
        """The network on a normalised batch `(B, 1, [Z,] Y, X)` already on `self.device`,
        through the chosen backend (folded torch, ONNX Runtime, or compiled).

        On the CPU the calling thread flushes denormal floats to zero (and keeps doing so):
        peaked attention on noisy frames underflows into denormals, which made the same
        512 px forward 1.4-1.6x slower than on smooth content in both backends."""
        if x.device.type == "cpu":
            torch.set_flush_denormal(True)
        if self._onnx is not None and x.device.type == "cpu":
            maps = self._onnx.maps(x.float())
            if maps is not None:
                return self.inference_model.outputs(maps[:, 0:1], maps[:, 1:2])
        if self.half and x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self._torch_forward(x)
        return self._torch_forward(x)

    def _torch_forward(self, x: torch.Tensor) -> ETOutput:
        if self._compiled is None:
            return self.inference_model(x)
        raw = self._compiled(x)
        return self.inference_model.outputs(F.softplus(raw[:, 0:1]), F.softplus(raw[:, 1:2]))
