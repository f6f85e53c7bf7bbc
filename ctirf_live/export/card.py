"""What people see of an exported model: the cover (EPI | cTIRF), the PSF, the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.models.etnet import ETNet

GAP_PX = 4  # white bar between EPI and cTIRF on the cover


def _display(image: np.ndarray) -> np.ndarray:
    """0-1 display image: 0.1-99.9th percentile contrast, as a viewer's auto-contrast."""
    lo, hi = np.percentile(image, (0.1, 99.9))
    return np.clip((image - lo) / max(float(hi - lo), 1e-12), 0.0, 1.0)


def _plane(image: np.ndarray) -> np.ndarray:
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def cover_image(path: Path, epi: np.ndarray, ctirf: np.ndarray) -> None:
    """PNG of EPI | cTIRF side by side (the middle plane of a stack), each auto-contrasted."""
    from matplotlib.image import imsave

    left, right = _display(_plane(epi)), _display(_plane(ctirf))
    gap = np.ones((left.shape[0], GAP_PX))
    imsave(path, np.hstack([left, gap, right]), cmap="gray", vmin=0.0, vmax=1.0)


def psf_image(path: Path, net: ETNet) -> None:
    """PNG of the PSF the model convolves with (in focus; XZ beside it for a 3D PSF)."""
    from matplotlib.image import imsave

    psf = net.forward_model.psf.detach().cpu().numpy()
    if psf.ndim == 3:
        xy = psf[psf.shape[0] // 2]
        xz = np.repeat(psf[:, psf.shape[1] // 2, :], max(1, xy.shape[0] // psf.shape[0]), axis=0)
        view = np.hstack([xy / xy.max(), np.ones((xy.shape[0], 1)), _pad_rows(xz / xz.max(), xy)])
    else:
        view = psf / psf.max()
    big = np.kron(view, np.ones((8, 8)))  # nearest-neighbour zoom: a 25 px PSF is tiny
    imsave(path, big, cmap="magma", vmin=0.0, vmax=1.0)


def _pad_rows(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    out = np.zeros((like.shape[0], a.shape[1]))
    n = min(a.shape[0], like.shape[0])
    out[:n] = a[:n]
    return out


def _fwhm_um(net: ETNet) -> float:
    """Lateral FWHM of the in-focus PSF (linear interpolation of the central profile)."""
    psf = net.forward_model.psf.detach().cpu().numpy()
    plane = psf[psf.shape[0] // 2] if psf.ndim == 3 else psf
    profile = plane[plane.shape[0] // 2].astype(np.float64)
    profile /= profile.max()
    above = np.flatnonzero(profile >= 0.5)
    lo, hi = above[0], above[-1]
    left = lo - (profile[lo] - 0.5) / (profile[lo] - profile[lo - 1]) if lo > 0 else lo
    end = len(profile) - 1
    right = hi + (profile[hi] - 0.5) / (profile[hi] - profile[hi + 1]) if hi < end else hi
    return float(right - left) * net.optics.pixel_size_um


def model_card(
    net: ETNet,
    meta: dict[str, Any],
    percentile: float,
    test_shape: tuple[int, ...],
    test_source: str,
    psf_file: str,
) -> str:
    """The package's README.md: what the model does, for which optics, how it was made."""
    o = net.optics
    arch = net.arch_config()
    prov = meta.get("provenance") or {}
    metrics = meta.get("metrics") or {}
    psf = meta.get("psf") or {}
    shape = "x".join(str(n) for n in net.forward_model.psf.shape)
    kind = "z-stacks" if net.dims == 3 else "frames"
    lines = [
        f"# cTIRF {net.name} ({arch['kwargs']['variant']}, {o.objective})",
        "",
        f"Computational TIRF: turns widefield (EPI) fluorescence {kind} into TIRF-like, "
        "optically sectioned images. The network (an EViT-UNet backbone) predicts a pseudo "
        "ground truth `g` and a background `b`; the output is `g` convolved with the "
        "microscope's PSF, so the physics of the objective is part of the model. Exported "
        f"by ctirf-live {meta.get('versions', {}).get('ctirf_live', '')} from "
        f"`{Path(str(meta.get('path', ''))).name}`.",
        "",
        "## Input and output",
        "",
        f"- input `epi`: raw EPI in camera units, float32, (batch, channel, "
        f"{'z, ' if net.dims == 3 else ''}y, x). Do not normalise it: the model divides it by "
        f"its {percentile:g}th percentile and clips at 1 (min(1, I / p{percentile:g}), the "
        "paper's Eq. 1), as ctirf-live does. bioimage.io's `scale_range` would also subtract "
        "the lower percentile, which this network was not trained with.",
        "- output `ctirf`: cTIRF in the input's intensity scale.",
        "- Tiling: each tile is normalised on its own; discard the declared halo. "
        "`ctirf process` normalises whole frames and blends overlapping tiles.",
        "",
        "## Optics",
        "",
        "| objective | NA | emission (nm) | excitation (nm) | immersion n | sample n "
        "| pixel (nm) | z step (nm) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {o.objective} | {o.na:g} | {o.emission_wavelength_nm:g} | "
        f"{o.excitation_wavelength_nm:g} | {o.immersion_index:g} | {o.sample_index:g} | "
        f"{o.pixel_size_um * 1000:g} | {o.z_step_um * 1000:g} |",
        "",
        "Use it on data from the same objective and pixel size; otherwise fine-tune it with "
        "about 20 EPI/TIRF pairs (`ctirf calibrate`, then `ctirf finetune`).",
        "",
        "## PSF",
        "",
        f"{psf.get('model', net.psf_model)} model, {shape} px "
        f"({'3D, planes at the z step' if net.dims == 3 else 'in focus'}), "
        f"lateral FWHM {_fwhm_um(net) * 1000:.0f} nm.",
        "",
        f"![PSF]({psf_file})",
        "",
        "## Training",
        "",
        f"- kind: {prov.get('kind', 'unknown')}; data: {prov.get('data', 'not recorded')}",
        f"- epochs: {prov.get('epochs', '?')}; pairs: {prov.get('train_pairs', '?')} train, "
        f"{prov.get('val_pairs', '?')} validation; seed {prov.get('seed', '?')}",
        f"- started from: {prov.get('init_from', 'scratch')}",
        "",
        "## Validation",
        "",
        f"The test tensors are a {'x'.join(map(str, test_shape))} EPI "
        f"{'stack' if net.dims == 3 else 'frame'} from {test_source} and the cTIRF that "
        "ctirf-live's `Restorer` makes of it; bioimageio.core's model test reproduces them "
        "with both weight formats. Metrics recorded at training (validation set):",
        "",
        "```json",
        json.dumps(metrics, indent=2, default=str),
        "```",
        "",
        "Check a new rig with `ctirf evaluate --data PAIRS -m MODEL.zip` (MS-SSIM and PSNR "
        "against TIRF).",
        "",
        "## Use",
        "",
        "- ctirf-live: `ctirf process EPI.ome.tiff -m MODEL.zip -o ctirf.ome.tiff` "
        "(runs the packaged ctirf checkpoint).",
        "- bioimage.io tools: `bioimageio predict MODEL.zip` or any consumer of the model "
        "format 0.5 (the PyTorch state dict needs `pip install ctirf-live`; the TorchScript "
        "weights need only PyTorch).",
        "",
    ]
    return "\n".join(lines)
