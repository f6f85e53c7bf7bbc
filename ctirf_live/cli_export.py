"""`ctirf export`: share a model as a bioimage.io package or its backbone as ONNX.

The body of the command; `ctirf_live.cli` registers it (with its one-line errors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

FORMATS = ("bioimageio", "onnx")

console = Console(soft_wrap=True)


def export_command(
    model: Annotated[
        str, typer.Argument(help="Shipped model name, training run folder or checkpoint file")
    ],
    out: Annotated[
        Path, typer.Option("--out", "--output", "-o", help="MODEL.zip (bioimageio) or .onnx")
    ],
    fmt: Annotated[
        str,
        typer.Option("--format", metavar="bioimageio|onnx", help="Package format (any case)"),
    ] = "bioimageio",
    size: Annotated[
        int, typer.Option(help="Tile side (px, multiple of 32) of the package's tensors")
    ] = 256,
    sample: Annotated[
        Path | None,
        typer.Option(help="EPI OME-TIFF for the test tensors and cover (default: simulated)"),
    ] = None,
    author: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Author of the model (repeat for several)"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output")
    ] = False,
) -> None:
    """Export a model: a tested bioimage.io model package (format 0.5: weights as PyTorch
    state dict and TorchScript, test tensors, cover, model card) that `ctirf process -m`
    also reads, or the backbone alone as ONNX for one tile shape."""
    kind = fmt.lower()
    if kind not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if kind == "bioimageio":
        from ctirf_live.export.bioimageio import export_bioimageio

        with console.status("exporting and testing the bioimage.io package"):
            path = export_bioimageio(
                model, out, sample=sample, size=size, authors=author or (), overwrite=overwrite
            )
        console.print(f"saved {path} (bioimage.io model, tested with bioimageio.core)")
        return
    path = _export_onnx(model, out, size, overwrite)
    console.print(f"saved {path} (ONNX backbone; the PSF convolution stays outside the graph)")


def _export_onnx(model: str, out: Path, size: int, overwrite: bool) -> Path:
    from ctirf_live.models.etnet import load_model
    from ctirf_live.models.onnx_export import export_backbone_onnx

    if out.suffix.lower() != ".onnx":
        raise ValueError(f"an ONNX export is a .onnx file, got {out}; use -o MODEL.onnx")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite")
    if size % 32 or size < 64:
        raise ValueError(f"--size must be a multiple of 32 and >= 64, got {size}")
    net, meta = load_model(model)
    tile = (size, size) if net.dims == 2 else (int(meta.get("planes") or 6), size, size)
    return export_backbone_onnx(net, out, tile)
