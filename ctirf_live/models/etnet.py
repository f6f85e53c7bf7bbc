"""ET2dNet / ET3dNet: the physics-informed cTIRF networks (paper Methods 4.4).

The backbone maps the normalised EPI input `x` to two non-negative maps, the pseudo-GT
`g` and the background `b`. The cTIRF image is `y^ = g * psf` (in-focus 2D PSF, or the
3D PSF for z-stacks) and the reconstructed EPI is `x^ = y^ + b`. The supervised loss
compares `y^` with TIRF, the self-supervised one `x^` with the input EPI.

The PSF is not a trained weight: it is rebuilt from the optics recorded in the
checkpoint (or given explicitly, e.g. a measured PSF, which is then stored in the
checkpoint as the tensor `psf`), so fine-tuning to another objective swaps the PSF.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ctirf_live import __version__
from ctirf_live.config import Optics, validation_message
from ctirf_live.models.checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from ctirf_live.models.evit_unet import EViTUNet
from ctirf_live.optics.forward import PSFConvolution
from ctirf_live.optics.psf import (
    default_psf_size,
    depth_psf,
    focal_shift_factor,
    psf_2d,
    psf_3d,
)

ARCHITECTURES = ("ET2dNet", "ET3dNet")
PSF_KEY = "psf"
DEFAULT_3D_PSF_PLANES = 11
DEFAULT_STACK_PLANES = 6  # the paper's ET3dNet input: 6 planes, 200 nm apart
WATER_PSF_MODEL = "gibson_lanni_water"
WATER_PSF_DEPTH_UM = 1.0
"""Emitter depth of the "gibson_lanni_water" PSF: a 6-plane stack spans ~1 um of cell."""


@dataclass
class ETOutput:
    """Network outputs, all (B, 1, [Z,] Y, X) in normalised intensity."""

    g: torch.Tensor
    b: torch.Tensor
    ctirf: torch.Tensor
    recon: torch.Tensor


def make_psf(
    optics: Optics,
    dims: int = 2,
    model: str = "born_wolf",
    size: int | None = None,
    planes: int = DEFAULT_3D_PSF_PLANES,
) -> np.ndarray:
    """The PSF an ETNet convolves with: in focus (2D) or `planes` planes at the z step (3D).

    `model` is a `ctirf_live.optics.psf` model (an emitter on the coverslip, stepped in
    defocus) or "gibson_lanni_water": an emitter `WATER_PSF_DEPTH_UM` deep in the sample,
    the stage stepped around its best focus. That is what a stack into a cell sees: an oil
    objective focusing into water has focal shift (~0.84) and depth aberration, so a
    stage step of 200 nm defocuses such an emitter less and asymmetrically (neighbour
    planes 0.73 / 0.95 of the peak, against 0.67 / 0.67 for an emitter on the glass).
    """
    size = size or default_psf_size(optics)
    if model == WATER_PSF_MODEL:
        return _water_psf(optics, dims, size, planes).copy()
    if dims == 2:
        return np.asarray(psf_2d(optics, size, model=model))
    half = (planes - 1) / 2
    offsets = tuple(float((k - half) * optics.z_step_um) for k in range(planes))
    return np.asarray(psf_3d(optics, offsets, size, model=model))


@functools.lru_cache(maxsize=8)
def _water_psf(optics: Optics, dims: int, size: int, planes: int) -> np.ndarray:
    """The "gibson_lanni_water" PSF, in-focus plane summing to 1 (read-only, cached)."""
    depth = WATER_PSF_DEPTH_UM
    best = depth / focal_shift_factor(optics)
    half = (planes - 1) / 2 if dims == 3 else 0.0
    count = planes if dims == 3 else 1
    stages = [best + (k - half) * optics.z_step_um for k in range(count)]
    psf = depth_psf(optics, size, depth, stages)
    psf = (psf / psf[count // 2].sum()).astype(np.float32)
    out = psf if dims == 3 else psf[0]
    out.setflags(write=False)
    return out


def _central_plane(kernel: np.ndarray | torch.Tensor) -> np.ndarray:
    """The in-focus plane of a 3D PSF as a one-plane 3D kernel (per-plane 2D blur)."""
    arr = np.asarray(kernel.detach().cpu() if isinstance(kernel, torch.Tensor) else kernel)
    return np.ascontiguousarray(arr[arr.shape[0] // 2][None], np.float32)


class ETNet(nn.Module):
    """EViT-UNet backbone + PSF forward model; `dims=2` is ET2dNet, `dims=3` ET3dNet."""

    def __init__(
        self,
        optics: Optics,
        variant: str = "S0",
        dims: int = 2,
        psf_model: str = "born_wolf",
        psf: np.ndarray | None = None,
        drop_path: float = 0.0,
        attn_up_eighth: bool = False,
        axial_unblur: int = 0,
    ) -> None:
        super().__init__()
        if axial_unblur and dims != 3:
            raise ValueError("axial_unblur inverts a Z blur: it is for 3D (ET3dNet) models")
        if axial_unblur < 0:
            raise ValueError(f"axial_unblur is an iteration count >= 0, got {axial_unblur}")
        self.optics = optics
        self.dims = dims
        self.axial_unblur = int(axial_unblur)
        self.input_ceiling: float | None = 1.0  # where inputs are clipped (Eq. 1: 1)
        self.psf_model = "measured" if psf is not None else psf_model
        self.backbone = EViTUNet(
            variant,
            in_channels=1,
            out_channels=2,
            dims=dims,
            drop_path=drop_path,
            attn_up_eighth=attn_up_eighth,
        )
        kernel = psf if psf is not None else make_psf(optics, dims, psf_model)
        if kernel.ndim != dims:
            raise ValueError(f"a {dims}D network needs a {dims}D PSF, got shape {kernel.shape}")
        self.forward_model = PSFConvolution(kernel)
        # 3D: the widefield PSF makes the reconstructed EPI stack, but the cTIRF stack is
        # each plane's content imaged with the in-focus PSF alone (the central plane),
        # as cTIRF of a frame is g * in-focus psf; else it would carry the blur back in
        self.section_model = PSFConvolution(_central_plane(kernel)) if dims == 3 else None

    @property
    def name(self) -> str:
        return "ET2dNet" if self.dims == 2 else "ET3dNet"

    def set_optics(self, optics: Optics, psf: np.ndarray | None = None) -> None:
        """Adopt another objective's optics (fine-tuning): rebuild the PSF from them."""
        self.optics = optics
        model = "born_wolf" if self.psf_model == "measured" else self.psf_model
        if psf is not None:
            self.psf_model = "measured"
        else:
            self.psf_model = model
        kernel = psf if psf is not None else make_psf(optics, self.dims, model)
        self.forward_model.set_psf(kernel)
        if self.section_model is not None:
            self.section_model.set_psf(_central_plane(kernel))

    def forward(self, x: torch.Tensor) -> ETOutput:
        raw = self.backbone(x)
        return self.outputs(F.softplus(raw[:, 0:1]), F.softplus(raw[:, 1:2]))

    def outputs(self, g: torch.Tensor, b: torch.Tensor) -> ETOutput:
        """All outputs from the backbone's maps `g` and `b` (the PSF forward model in torch;
        used when the backbone ran elsewhere, e.g. in ONNX Runtime)."""
        blurred = self.forward_model(g)
        ctirf = blurred if self.section_model is None else self.section_model(g)
        if self.axial_unblur:
            ctirf = self.unblur_view(ctirf, self.axial_unblur)
        return ETOutput(g=g, b=b, ctirf=ctirf, recon=blurred + b)

    def z_profile(self) -> torch.Tensor:
        """The 3D PSF's peak per plane relative to the in-focus one, (planes,): how much of
        an emitter a frame that far away still shows as in focus."""
        if self.dims != 3:
            raise ValueError("the Z profile is for 3D (ET3dNet) models")
        peaks = self.forward_model.psf.amax(dim=(-2, -1))
        return peaks / peaks[peaks.numel() // 2]

    def slicewise_view(self, g: torch.Tensor) -> torch.Tensor:
        """What a 2D model run plane by plane reports of the volume `g` (B, 1, Z, Y, X).

        A frame's pseudo-GT holds everything that still looks in focus there: an emitter
        a distance d off the plane enters it with the relative peak of its defocused image,
        psf(d).max() / psf(0).max() (0.6 at 0.2 um for NA 1.5 into water, 0.25 at 0.5 um;
        the shipped ET2dNet's measured filament survival follows it). So an ET2dNet
        teacher's slice-wise stack is `g` blurred along Z by that profile, and ET3dNet
        learns the volume `g` that, viewed this way, matches it (distillation), while
        `g * psf3d + b` must explain the measured stack.

        The edge planes are extended by replication: the teacher's first and last frames
        also see emitters just beyond the stack, which `g` cannot hold; with zeros there
        the only `g` matching a uniform teacher rings from plane to plane (the Z blur
        passes period-3 patterns at ~0.15, so their inverse is amplified ~7x).
        """
        profile = self.z_profile().to(g.dtype)
        half = profile.numel() // 2
        weight = profile.reshape(1, 1, -1, 1, 1)
        padded = F.pad(g, (0, 0, 0, 0, half, half), mode="replicate")
        return F.conv3d(padded, weight)

    def view_matrix(self, planes: int) -> torch.Tensor:
        """`slicewise_view` along Z as a (planes, planes) matrix: row k holds the weights
        plane k of the view takes from each plane of `g` (edges continued, rows sum to the
        profile's sum)."""
        profile = self.z_profile().double().cpu()
        half = profile.numel() // 2
        matrix = torch.zeros(planes, planes, dtype=torch.float64)
        for k in range(planes):
            for d in range(-half, half + 1):
                matrix[k, min(max(k + d, 0), planes - 1)] += profile[d + half]
        return matrix

    def unblur_view(self, stack: torch.Tensor, iterations: int) -> torch.Tensor:
        """Invert `slicewise_view` along Z by Richardson-Lucy (non-negative, no ringing).

        For a student whose `g` still is the teacher's slice-wise response scaled by
        1 / sum(profile) (inflated from ET2dNet: the teacher's kernels in the centre Z
        slice, `training.distill.inflate_teacher`), this gives the volume whose slice-wise
        view is that response, on the teacher's intensity scale: an emitter is given back
        to its own plane instead of the ~3 planes 200 nm apart that each show it in focus.
        `stack` is (B, C, Z, Y, X).
        """
        matrix = self.view_matrix(stack.shape[2]).to(stack.device, torch.float32)
        target = stack.float().clamp_min(0.0) * matrix[0].sum() + 1e-6
        norm = matrix.sum(0).reshape(1, 1, -1, 1, 1)
        estimate = target.clone()
        for _ in range(iterations):
            view = torch.einsum("kz,bczyx->bckyx", matrix, estimate)
            ratio = torch.einsum("kz,bckyx->bczyx", matrix, target / view.clamp_min(1e-12))
            estimate = estimate * ratio / norm
        return estimate.to(stack.dtype)

    def arch_config(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this network."""
        kwargs: dict[str, Any] = {
            "variant": self.backbone.arch_config()["variant"],
            "dims": self.dims,
            "psf_model": self.psf_model,
        }
        if self.backbone.attn_up_eighth:
            kwargs["attn_up_eighth"] = True
        if self.axial_unblur:
            kwargs["axial_unblur"] = self.axial_unblur
        return {"name": self.name, "kwargs": kwargs, "backbone": self.backbone.arch_config()}


def ET2dNet(optics: Optics, variant: str = "S0", **kwargs: Any) -> ETNet:
    """The 2D network for single EPI frames."""
    return ETNet(optics, variant, dims=2, **kwargs)


def ET3dNet(optics: Optics, variant: str = "S0", **kwargs: Any) -> ETNet:
    """The 3D network for short EPI z-stacks (6 planes at 200 nm in the paper)."""
    return ETNet(optics, variant, dims=3, **kwargs)


def save_model(
    model: ETNet,
    path: str | Path,
    *,
    percentile: float = 98.0,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    stack: dict[str, Any] | None = None,
) -> Path:
    """Write an ETNet checkpoint (safetensors + JSON metadata).

    A 3D network records the stacks it expects (`stack`: planes, z_step_um; by default
    the PSF's plane count and the optics' z step) so a mismatched stack is refused.
    """
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if model.psf_model == "measured":
        state[PSF_KEY] = model.forward_model.psf
    psf = model.forward_model.psf
    metadata = {
        "architecture": model.arch_config(),
        "optics": model.optics.model_dump(),
        "psf": {"model": model.psf_model, "shape": list(psf.shape)},
        "normalization": {
            "percentile": float(percentile),
            "input_ceiling": model.input_ceiling,
        },
        "provenance": provenance or {},
        "metrics": metrics or {},
    }
    if model.dims == 3:
        facts = {"planes": DEFAULT_STACK_PLANES, "z_step_um": model.optics.z_step_um}
        metadata["stack"] = {**facts, **(stack or {})}
        metadata["planes"] = metadata["stack"]["planes"]
    return save_checkpoint(path, state, metadata)


def build_model(metadata: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> ETNet:
    """Rebuild an ETNet from checkpoint metadata (and a measured PSF if stored)."""
    arch = metadata.get("architecture") or {}
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise CheckpointError(
            f"checkpoint architecture {name!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    kwargs = dict(arch.get("kwargs") or {})
    _check_arch_kwargs(name, kwargs, metadata)
    optics_meta = metadata.get("optics")
    if not optics_meta:
        raise CheckpointError("checkpoint has no optics; it cannot rebuild its PSF")
    try:
        optics = Optics(**optics_meta)
    except ValidationError as exc:
        raise CheckpointError(f"checkpoint optics are {validation_message(exc)}") from None
    psf = None
    if kwargs.get("psf_model") == "measured":
        if state is None or PSF_KEY not in state:
            raise CheckpointError("checkpoint uses a measured PSF but does not contain it")
        psf = state[PSF_KEY].float().cpu().numpy()
        kwargs.pop("psf_model")
    try:
        return ETNet(optics, psf=psf, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint architecture {name} cannot be rebuilt: {exc}") from None


def _check_arch_kwargs(name: str, kwargs: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Refuse architecture arguments this version does not know, naming them and the fix."""
    params = inspect.signature(ETNet.__init__).parameters
    known = {k for k in params if k not in ("self", "optics", "psf")}
    unknown = sorted(set(kwargs) - known)
    if not unknown:
        return
    written = (metadata.get("versions") or {}).get("ctirf_live", "an unknown version")
    raise CheckpointError(
        f"checkpoint architecture {name} has argument{'s' if len(unknown) > 1 else ''} "
        f"{', '.join(unknown)} that ctirf-live {__version__} does not know (written by "
        f"ctirf-live {written}); upgrade ctirf-live to load it"
    )


def input_ceiling_of(metadata: dict[str, Any]) -> float | None:
    """The input clip a checkpoint's model was trained with (Eq. 1's 1 when unrecorded)."""
    value = (metadata.get("normalization") or {}).get("input_ceiling", 1.0)
    return None if value is None else float(value)


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    extra_dirs: Sequence[Path] = (),
) -> tuple[ETNet, dict[str, Any]]:
    """Load an ETNet checkpoint (a path or a shipped model name): (model in eval mode, metadata)."""
    path = resolve_checkpoint(name_or_path, extra_dirs)
    state, metadata = load_checkpoint(path)
    try:
        model = build_model(metadata, state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    check_state_dict(model, weights)
    model.load_state_dict(weights)
    model.input_ceiling = input_ceiling_of(metadata)
    metadata["path"] = str(path)
    return model.to(device).eval(), metadata
