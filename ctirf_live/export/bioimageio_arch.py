"""The architecture entry of ctirf-live's bioimage.io packages: raw EPI in, cTIRF out.

bioimage.io's `scale_range` subtracts the lower percentile before dividing, while cTIRF's
normalisation (paper Eq. 1, `ctirf_live.data.normalize`) divides by the 98th percentile
alone: the network was trained with the camera offset and the out-of-focus haze left in,
and its background branch models them. So the package's model does what the `Restorer`
does for one frame: normalise (Eq. 1), reflect-pad the edges, run the ETNet, crop, and
put the result back into the input's intensity scale.

bioimage.io's loader calls `CTIRFNet(**kwargs)` and then `load_state_dict(weights)`;
every argument is plain YAML (the optics as a mapping), so the entry needs no file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctirf_live.config import Optics
from ctirf_live.data.normalize import EPS
from ctirf_live.models.etnet import ETNet

EDGE_PAD = 16  # as the Restorer: the network's own zero padding leaves a rim otherwise


def percentile_scale(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per-sample divisor of Eq. 1 for `(B, ...)`: the `percentile`-th percentile (linear
    interpolation, as numpy), or the maximum when that is ~0, never below `EPS`."""
    flat = x.flatten(1).sort(dim=1).values
    pos = (flat.shape[1] - 1) * percentile / 100.0
    lo = int(pos)
    hi = min(lo + 1, flat.shape[1] - 1)
    scale = torch.lerp(flat[:, lo], flat[:, hi], pos - lo)
    scale = torch.where(scale <= EPS, flat[:, -1], scale)
    return scale.clamp_min(EPS).reshape(-1, *([1] * (x.ndim - 1)))


class CTIRFNet(nn.Module):
    """An ETNet that takes raw EPI `(B, 1, [Z,] Y, X)` and returns cTIRF in its scale."""

    def __init__(
        self,
        optics: Mapping[str, Any],
        variant: str = "S0",
        dims: int = 2,
        psf_model: str = "born_wolf",
        attn_up_eighth: bool = False,
        psf_shape: Sequence[int] | None = None,
        percentile: float = 98.0,
        input_ceiling: float | None = 1.0,
    ) -> None:
        super().__init__()
        measured = psf_model == "measured"
        if measured and not psf_shape:
            raise ValueError("a measured PSF needs psf_shape (its tensor comes with the weights)")
        self.percentile = float(percentile)
        self.net = ETNet(
            Optics(**optics),
            variant,
            dims=dims,
            psf_model="born_wolf" if measured else psf_model,
            psf=torch.zeros(tuple(psf_shape)).numpy() if measured else None,
            attn_up_eighth=attn_up_eighth,
        )
        self.net.input_ceiling = None if input_ceiling is None else float(input_ceiling)
        if measured:
            # the measured PSF travels in the state dict; set it into the forward model on load
            self.register_buffer("psf", self.net.forward_model.psf.clone())
            self.register_load_state_dict_post_hook(_adopt_psf)
        # built for inference: bioimage.io's TorchScript converter traces the module as
        # constructed, and a BatchNorm in training mode would be traced with batch statistics
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        scale = percentile_scale(x, self.percentile)
        norm = (x / scale).clamp(0.0, self.net.input_ceiling)
        pads = (EDGE_PAD,) * 4 + ((0, 0) if self.net.dims == 3 else ())
        padded = F.pad(norm, pads, mode="reflect")
        ctirf = self.net(padded).ctirf
        return ctirf[..., EDGE_PAD:-EDGE_PAD, EDGE_PAD:-EDGE_PAD] * scale


def _adopt_psf(module: nn.Module, incompatible: Any) -> None:
    assert isinstance(module, CTIRFNet)
    module.net.forward_model.set_psf(module.psf)


def arch_kwargs(model: ETNet, percentile: float) -> dict[str, Any]:
    """The YAML arguments that rebuild `model` as a `CTIRFNet`."""
    kwargs = dict(model.arch_config()["kwargs"])
    kwargs["optics"] = model.optics.model_dump(mode="json")
    kwargs["percentile"] = float(percentile)
    if model.input_ceiling != 1.0:
        kwargs["input_ceiling"] = model.input_ceiling
    if model.psf_model == "measured":
        kwargs["psf_shape"] = list(model.forward_model.psf.shape)
    return kwargs


def from_etnet(model: ETNet, percentile: float = 98.0) -> CTIRFNet:
    """A `CTIRFNet` carrying `model`'s weights (and its measured PSF, if any)."""
    wrapped = CTIRFNet(**arch_kwargs(model, percentile))
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    if model.psf_model == "measured":
        state["psf"] = model.forward_model.psf
    wrapped.load_state_dict(state, strict=True)
    return wrapped.eval()
