"""Export an ETNet's backbone to ONNX for one static tile shape.

The graph is the EViT-UNet backbone plus the two softplus heads: input `epi`, the
normalised EPI tile `(B, 1, Y, X)` (ET2dNet) or `(B, 1, Z, Y, X)` (ET3dNet), output
`maps`, the non-negative pseudo-GT `g` (channel 0) and background `b` (channel 1) of the
same size. The PSF convolution (the forward model, an FFT) stays out of the graph: the
caller computes `ctirf = g * psf` (e.g. with `ETNet.forward_model`).

The shape is static (the attention windows are planned from it), so one file serves one
tile shape; the model's architecture, optics and tile shape are written into the file's
metadata. Needs the `onnx` extra: pip install 'ctirf-live[onnx]'.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctirf_live import __version__
from ctirf_live.atomic import atomic_write_bytes
from ctirf_live.models.etnet import ETNet

OPSET = 17
INPUT_NAME = "epi"
OUTPUT_NAME = "maps"
INSTALL_HINT = "pip install 'ctirf-live[onnx]'"


class BackboneMaps(nn.Module):
    """The backbone with its softplus heads: normalised EPI -> (g, b) stacked on axis 1."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.backbone(x))


def input_shape(model: ETNet, tile_shape: tuple[int, ...], batch: int = 1) -> tuple[int, ...]:
    """The full `(B, 1, [Z,] Y, X)` input shape for a tile shape, checked against the model."""
    shape = tuple(int(s) for s in tile_shape)
    if len(shape) != model.dims or min(shape, default=0) < 1:
        kind = "(Y, X)" if model.dims == 2 else "(Z, Y, X)"
        raise ValueError(
            f"{model.name} needs a tile shape {kind} of positive sizes, got {tuple(tile_shape)}"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return (int(batch), 1, *shape)


def export_backbone_onnx(
    model: ETNet, path: Path, tile_shape: tuple[int, ...], *, batch: int = 1
) -> Path:
    """Write `model`'s backbone (+ softplus) as ONNX for `tile_shape`; returns the path.

    `tile_shape` is `(Y, X)` for ET2dNet or `(Z, Y, X)` for ET3dNet (`batch` tiles at a
    time). The caller's model is not changed (a CPU copy in eval mode is traced). The file
    is checked with `onnx.checker` and written atomically.
    """
    try:
        import onnx
    except ImportError:
        raise ValueError(f"exporting to ONNX needs the onnx package: {INSTALL_HINT}") from None
    shape = input_shape(model, tile_shape, batch)
    module = BackboneMaps(copy.deepcopy(model.backbone).float().cpu()).eval()
    example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # static shapes are the point of this export: the tracer's notes about Python
        # values frozen into the graph, and the legacy exporter's deprecation, are expected
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    facts = {
        "ctirf_live_version": __version__,
        "torch_version": torch.__version__,
        "network": model.name,
        "architecture": json.dumps(model.arch_config()),
        "optics": model.optics.model_dump_json(),
        "psf_model": model.psf_model,
        "input_shape": json.dumps(list(shape)),
        "outputs": "g (channel 0), background (channel 1); normalised intensity",
    }
    for key, value in facts.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
