"""Export a ctirf-live model as a bioimage.io model package (model format 0.5).

The zip holds `rdf.yaml`, the weights twice over (PyTorch state dict with the
`ctirf_live.export.bioimageio_arch.CTIRFNet` architecture, and TorchScript traced from
it by bioimageio.core's converter), a test input frame and the output our `Restorer`
makes of it (`.npy`), a cover (EPI | cTIRF), a model card (`README.md`: optics, PSF,
training, validation) with a picture of the PSF, and our own checkpoint
(`ctirf.safetensors`, named in `config.ctirf`) so `ctirf process -m MODEL.zip` runs the
very same model. The package is tested with bioimageio.core's model test before it is
moved into place; a package that fails is not written.

Tensors have a fixed Y/X size (`size`, default 256 px): the TorchScript trace bakes the
sizes of the attention windows in. Consumers tile larger images with the declared halo;
each tile is then normalised on its own (`ctirf process` normalises whole frames).
"""

from __future__ import annotations

import getpass
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctirf_live import __version__
from ctirf_live.atomic import atomic_write
from ctirf_live.export.bioimageio_arch import EDGE_PAD, arch_kwargs, from_etnet
from ctirf_live.models.checkpoint import (
    BIOIMAGEIO_CHECKPOINT,
    BIOIMAGEIO_FORMAT,
    BIOIMAGEIO_FORMAT_VERSION,
)
from ctirf_live.models.etnet import ETNet, load_model

INPUT_ID, OUTPUT_ID = "epi", "ctirf"
HALO = 32  # px a tiling consumer should discard at each tile border (Restorer overlap / 2)
DEFAULT_SIZE = 256
LICENSE = "BSD-3-Clause"
PAPER = (
    "Li Q, Lou C, Cheng Y, et al. Computational TIRF enables optical sectioning beyond the "
    "evanescent field for widefield fluorescence microscopy (EPI-TIRF training data)"
)
PAPER_DATA_DOI = "10.6084/m9.figshare.30436504.v1"
INSTALL_HINT = "bioimage.io export needs bioimageio.core: pip install 'ctirf-live[bioimageio]'"


class ExportError(ValueError):
    """A model cannot be exported as asked; the message says why and what to do."""


def _normalisation_formula(percentile: float, ceiling: float | None) -> str:
    """Eq. 1 as this model applies it (its input clip, if any)."""
    if ceiling is None:
        return f"max(0, I / p{percentile:g}) (no upper clip)"
    return f"min({ceiling:g}, I / p{percentile:g})"


def _bioimageio() -> Any:
    try:
        import bioimageio.core
        import bioimageio.spec
    except ImportError:
        raise ExportError(INSTALL_HINT) from None
    return bioimageio


def export_bioimageio(
    model: str | Path,
    out: str | Path,
    *,
    sample: str | Path | None = None,
    size: int = DEFAULT_SIZE,
    authors: Sequence[str] = (),
    overwrite: bool = False,
    test: bool = True,
) -> Path:
    """Write `model` (a shipped name, run folder or checkpoint) as a bioimage.io zip at
    `out`, tested with bioimageio.core unless `test` is False. The test frame is the centre
    of `sample` (an EPI OME-TIFF) or, without one, a simulated EPI frame; returns the path."""
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ExportError(f"a bioimage.io package is a .zip file, got {out}; use -o MODEL.zip")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another output or pass --overwrite")
    if size % 32 or size < 64:
        raise ExportError(f"--size must be a multiple of 32 and >= 64, got {size}")
    _bioimageio()
    net, meta = load_model(model)
    percentile = float((meta.get("normalization") or {}).get("percentile", 98.0))
    planes = int(meta.get("planes") or 6) if net.dims == 3 else None
    epi = _test_frame(net, sample, size, planes)
    from ctirf_live.inference.restorer import Restorer

    restorer = Restorer(net, device="cpu", tile=size + 2 * EDGE_PAD, metadata=meta)
    ctirf = restorer.restore(epi).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ctirf-export-", dir=out.parent) as tmp:
        work = Path(tmp)
        files = _write_files(work, net, meta, epi, ctirf, percentile, sample)
        descr = _describe(net, meta, files, percentile, size, planes, list(authors))
        _add_torchscript(descr, work)
        atomic_write(out, lambda path: _package_and_test(descr, path, test))
    return out


def _test_frame(net: ETNet, sample: str | Path | None, size: int, planes: int | None) -> np.ndarray:
    """A `size` x `size` EPI frame (or `planes`-plane stack) for the test tensors."""
    if sample is None:
        return _simulated_frame(net, size, planes)
    from ctirf_live.data.tiff import read_ome_tiff

    data, info = read_ome_tiff(sample)
    if "C" in info.axes:
        names = [n.upper() for n in info.channel_names]
        c = names.index("EPI") if "EPI" in names else 0
        data = np.take(data, c, axis=info.axes.index("C"))
    data = np.asarray(data, np.float32)
    need = (planes or 1, size, size)
    if planes:
        if data.ndim < 3 or data.shape[-3] < planes:
            raise ExportError(f"{sample} is not a stack of >= {planes} planes; pass an EPI stack")
        data = data.reshape(-1, *data.shape[-3:])[0]
    else:
        data = data.reshape(-1, *data.shape[-2:])[0][None]
    if min(data.shape[-2:]) < size:
        raise ExportError(
            f"{sample} frames are {data.shape[-2]}x{data.shape[-1]} px, smaller than the "
            f"package's {size} px input; pass a larger frame or a smaller --size"
        )
    z0 = (data.shape[0] - need[0]) // 2
    y0, x0 = ((n - size) // 2 for n in data.shape[-2:])
    crop = data[z0 : z0 + need[0], y0 : y0 + size, x0 : x0 + size]
    return np.ascontiguousarray(crop if planes else crop[0])


def _simulated_frame(net: ETNet, size: int, planes: int | None) -> np.ndarray:
    from ctirf_live.sim.scope import DEFAULT_OBJECTIVES

    objective = net.optics.objective if net.optics.objective in DEFAULT_OBJECTIVES else "60X"
    if planes:
        from ctirf_live.data.stacks import synthetic_stacks

        stacks = synthetic_stacks(
            1, objective, seed=0, size=size, planes=planes, z_step_um=net.optics.z_step_um
        )
        return stacks.stacks[0].epi
    from ctirf_live.data.loaders import PairSource

    pairs = PairSource.synthetic(1, objective, seed=0, roi=size, exposure_ms=50.0, progress=False)
    return pairs[0].epi


def _write_files(
    work: Path,
    net: ETNet,
    meta: dict[str, Any],
    epi: np.ndarray,
    ctirf: np.ndarray,
    percentile: float,
    sample: str | Path | None,
) -> dict[str, Path]:
    """Every file the package holds besides rdf.yaml and the TorchScript weights."""
    from ctirf_live.export.card import cover_image, model_card, psf_image

    files = {
        "test_input": work / "test_input.npy",
        "test_output": work / "test_output.npy",
        "weights": work / "weights.pt",
        "checkpoint": work / BIOIMAGEIO_CHECKPOINT,
        "cover": work / "cover.png",
        "psf": work / "psf.png",
        "card": work / "README.md",
    }
    np.save(files["test_input"], epi[None, None].astype(np.float32))
    np.save(files["test_output"], ctirf[None, None].astype(np.float32))
    torch.save(from_etnet(net, percentile).state_dict(), files["weights"])
    shutil.copyfile(meta["path"], files["checkpoint"])
    cover_image(files["cover"], epi, ctirf)
    psf_image(files["psf"], net)
    source = f"`{Path(sample).name}` (centre crop)" if sample else "ctirf-live's simulator"
    card = model_card(net, meta, percentile, epi.shape, source, files["psf"].name)
    files["card"].write_text(card)
    return files


def _describe(
    net: ETNet,
    meta: dict[str, Any],
    files: dict[str, Path],
    percentile: float,
    size: int,
    planes: int | None,
    authors: list[str],
) -> Any:
    """The bioimage.io ModelDescr (format 0.5) of the package."""
    from bioimageio.spec.model import v0_5 as bio

    optics = net.optics
    um = "micrometer"
    space: list[Any] = []
    if planes:
        space.append(
            bio.SpaceInputAxis(id=bio.AxisId("z"), size=planes, unit=um, scale=optics.z_step_um)
        )
    space += [
        bio.SpaceInputAxis(id=bio.AxisId(a), size=size, unit=um, scale=optics.pixel_size_um)
        for a in "yx"
    ]
    out_space: list[Any] = []
    if planes:
        out_space.append(
            bio.SpaceOutputAxis(
                id=bio.AxisId("z"),
                size=bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId("z")),
                unit=um,
                scale=optics.z_step_um,
            )
        )
    out_space += [
        bio.SpaceOutputAxisWithHalo(
            id=bio.AxisId(a),
            size=bio.SizeReference(tensor_id=bio.TensorId(INPUT_ID), axis_id=bio.AxisId(a)),
            halo=min(HALO, size // 4),
            unit=um,
            scale=optics.pixel_size_um,
        )
        for a in "yx"
    ]
    inputs = [
        bio.InputTensorDescr(
            id=bio.TensorId(INPUT_ID),
            description=(
                "raw EPI in camera units; the model applies "
                + _normalisation_formula(percentile, net.input_ceiling)
            ),
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=["EPI"]), *space],
            test_tensor=bio.FileDescr(source=files["test_input"]),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
        )
    ]
    outputs = [
        bio.OutputTensorDescr(
            id=bio.TensorId(OUTPUT_ID),
            description="computational TIRF (cTIRF) in the input's intensity scale",
            axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=["cTIRF"]), *out_space],
            test_tensor=bio.FileDescr(source=files["test_output"]),
            data=bio.IntervalOrRatioDataDescr(type="float32"),
        )
    ]
    weights = bio.WeightsDescr(
        pytorch_state_dict=bio.PytorchStateDictWeightsDescr(
            source=files["weights"],
            architecture=bio.ArchitectureFromLibraryDescr(
                callable=bio.Identifier("CTIRFNet"),
                import_from="ctirf_live.export.bioimageio_arch",
                kwargs=arch_kwargs(net, percentile),
            ),
            pytorch_version=bio.Version(torch.__version__.split("+")[0]),
        )
    )
    name = f"cTIRF {net.name} {net.arch_config()['kwargs']['variant']} {optics.objective}"
    ctirf_config = {
        "format": BIOIMAGEIO_FORMAT,
        "format_version": BIOIMAGEIO_FORMAT_VERSION,
        "checkpoint": BIOIMAGEIO_CHECKPOINT,
        "ctirf_live": __version__,
        "architecture": meta.get("architecture"),
        "optics": optics.model_dump(mode="json"),
        "psf": meta.get("psf"),
        "normalization": {"percentile": percentile, "input_ceiling": net.input_ceiling},
    }
    return bio.ModelDescr(
        name="".join(c if c.isalnum() or c in "_+- ()" else "-" for c in name),
        description=(
            f"Computational TIRF: optically sectioned, TIRF-like images from widefield EPI "
            f"{'z-stacks' if planes else 'frames'} ({net.name}, physics-informed EViT-UNet). "
            f"Trained for {optics.objective} NA {optics.na:g}, "
            f"{optics.emission_wavelength_nm:g} nm emission, "
            f"{optics.pixel_size_um * 1000:g} nm pixels."
        ),
        authors=[bio.Author(name=a) for a in (authors or [getpass.getuser()])],
        cite=[bio.CiteEntry(text=PAPER, doi=bio.Doi(PAPER_DATA_DOI))],
        license=bio.LicenseId(LICENSE),
        documentation=bio.FileDescr(source=files["card"]),
        covers=[bio.FileDescr(source=files["cover"])],
        attachments=[bio.FileDescr(source=files["checkpoint"]), bio.FileDescr(source=files["psf"])],
        tags=[
            "tirf",
            "computational-tirf",
            "optical-sectioning",
            "background-removal",
            "fluorescence-light-microscopy",
            "widefield",
            "pytorch",
            "3d" if planes else "2d",
        ],
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        config=bio.Config(
            bioimageio=bio.BioimageioConfig(
                architecture_type="EViT-UNet",
                modality="widefield fluorescence microscopy",
            ),
            ctirf=ctirf_config,
        ),
    )


def _add_torchscript(descr: Any, work: Path) -> None:
    """TorchScript weights traced by bioimageio.core's converter from the state dict."""
    from bioimageio.core.weight_converters.pytorch_to_torchscript import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        descr.weights.torchscript = convert(descr, work / "weights_torchscript.pt")


def _package_and_test(descr: Any, path: Path, test: bool) -> None:
    """Write the zip to `path` and run bioimageio.core's model test on it."""
    from bioimageio.core import test_description
    from bioimageio.spec import save_bioimageio_package

    save_bioimageio_package(descr, output_path=path)
    if not test:
        return
    summary = test_description(path)
    if summary.status != "passed":
        failed = next((d for d in summary.details if d.status == "failed"), None)
        why = failed.errors[0].msg if failed and failed.errors else summary.status
        raise ExportError(f"the bioimage.io model test failed ({' '.join(str(why).split())})")
