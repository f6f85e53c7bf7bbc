"""The hybrid loss of ET2dNet / ET3dNet (paper Methods 4.4, Eq. 2-10).

`L(a, b) = a1*L1 + a2*L2 + a3*(1 - MS-SSIM)` compares two images;
`R = b1*TV(g) + b2*TV(b) + b3*|g|_1` regularises the network's two output maps.
L1, L2 and TV are means rather than the paper's sums so each term keeps the same scale
whatever the crop size, and the `LossWeights` defaults stay meaningful.

MS-SSIM needs images large enough to survive its 4 downsamplings with a Gaussian window
at the coarsest scale; `msssim_regime` picks the number of scales and the window from
the smaller spatial side so any crop or tile (>= 7 px) gets a structural term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim
from torch import Tensor, nn

from ctirf_live.config import LossWeights

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents of the standard 5-scale MS-SSIM (Wang et al. 2003)."""

_WIN_SIGMA = 1.5


def msssim_regime(side: int) -> tuple[int, int]:
    """Return `(scales, win_size)` for images whose smaller spatial side is `side` px.

    The rule generalises pytorch_msssim's own limit (`side > (win - 1) * 2**(scales - 1)`,
    i.e. the coarsest scale is still wider than the window):

    - side > 160: standard MS-SSIM, 5 scales, 11-px window;
    - 96 < side <= 160: 5 scales, 7-px window;
    - 7 <= side <= 96: 7-px window and as many scales as fit: 4 (> 48 px), 3 (> 24),
      2 (> 12); at 7-12 px a single scale, i.e. plain SSIM.

    Fewer scales use the first k standard weights, renormalised to sum to 1.
    """
    if side > 160:
        return 5, 11
    if side < 7:
        raise ValueError(f"images must be at least 7 px on each side for SSIM, got {side} px")
    scales = 1
    while scales < 5 and side > 6 * 2**scales:
        scales += 1
    return scales, 7


def _multiscale(x: Tensor, y: Tensor, scales: int, win_size: int) -> Tensor:
    """MS-SSIM with `scales` levels, per sample (N,), mirroring `pytorch_msssim.ms_ssim`.

    Needed because the library refuses images smaller than what 5 scales require even
    when fewer weights are passed.
    """
    w = torch.tensor(MSSSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    w = w / w.sum()
    win = _fspecial_gauss_1d(win_size, _WIN_SIGMA).repeat([x.shape[1], 1, 1, 1])
    factors = []
    for level in range(scales):
        ssim_val, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False)
        if level < scales - 1:
            factors.append(torch.relu(cs))
            padding = [s % 2 for s in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    factors.append(torch.relu(ssim_val))
    stacked = torch.stack(factors, dim=0)
    return torch.prod(stacked ** w.view(-1, 1, 1), dim=0).mean(1)


def structural_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample MS-SSIM (B,) of (B,1,Y,X) or (B,1,Z,Y,X) images in [0, ~1].

    Stacks are compared slice by slice (Z folded into the batch) and averaged over Z, as
    the PSF's axial extent makes 3D windows over 6 planes meaningless.
    """
    if a.ndim == 5:
        bsz, ch, nz, ny, nx = a.shape
        fold = (bsz * nz, ch, ny, nx)
        per_slice = structural_similarity(
            a.transpose(1, 2).reshape(fold), b.transpose(1, 2).reshape(fold)
        )
        return per_slice.view(bsz, nz).mean(1)
    scales, win_size = msssim_regime(min(a.shape[-2:]))
    if scales == 5:
        return ms_ssim(a, b, data_range=1.0, win_size=win_size, size_average=False)
    if scales == 1:
        return ssim(
            a, b, data_range=1.0, win_size=win_size, size_average=False, nonnegative_ssim=True
        )
    return _multiscale(a, b, scales, win_size)


def _per_sample_loss(
    a: Tensor, b: Tensor, weights: LossWeights, pixel_weight: Tensor | None = None
) -> Tensor:
    """`a1*L1 + a2*L2 + a3*(1 - MS-SSIM)` for each sample, shape (B,); `pixel_weight`
    (broadcastable to `a`) weights the L1 and L2 means, not the structural term."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare images of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim not in (4, 5) or a.shape[1] != 1:
        raise ValueError(f"expected (B,1,Y,X) or (B,1,Z,Y,X) images, got {tuple(a.shape)}")
    # float32 even under autocast: SSIM's variances (E[x^2] - E[x]^2) cancel badly in fp16
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float(), b.float()
        diff = a - b
        pixelwise = weights.a1 * diff.abs() + weights.a2 * diff.square()
        if pixel_weight is not None:
            pixelwise = pixelwise * pixel_weight.float()
        loss = pixelwise.flatten(1).mean(1)
        if weights.a3:
            loss = loss + weights.a3 * (1.0 - structural_similarity(a, b))
    return loss


def image_loss(
    a: Tensor,
    b: Tensor,
    weights: LossWeights,
    weight: Tensor | None = None,
    pixel_weight: Tensor | None = None,
) -> Tensor:
    """Image-pair loss `L(a, b)` (Eq. 4), a scalar averaged over the batch.

    `weight` (B,) multiplies each sample's loss before averaging (mean of `weight * L`,
    not normalised by the weights' sum): the paper weights TIRF targets by their variance
    to damp out-of-focus pairs, and the caller decides that scale (e.g. variance divided
    by the dataset's mean variance keeps the loss near its unweighted size).
    `pixel_weight` weights the pixelwise terms (see `leak_weight`).
    """
    per_sample = _per_sample_loss(a, b, weights, pixel_weight)
    if weight is not None:
        weight = weight.to(per_sample).reshape(-1)
        if weight.numel() != per_sample.numel():
            raise ValueError(
                f"sample weight has {weight.numel()} values for a batch of {per_sample.numel()}"
            )
        per_sample = per_sample * weight
    return per_sample.mean()


def tv_loss(x: Tensor) -> Tensor:
    """Total variation (Eq. 7): mean squared neighbour difference, summed over the axes.

    Y and X for (B,C,Y,X); Z, Y and X for (B,C,Z,Y,X). A constant map gives 0.
    """
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a 4D or 5D tensor, got {tuple(x.shape)}")
    x = x.float()
    return torch.stack([x.diff(dim=d).square().mean() for d in range(2, x.ndim)]).sum()


AXIAL_POOL_PX = 8
"""Lateral pooling of the missing-cone prior: ~0.8 um at 60X, where the widefield OTF
passes almost no axial frequency."""


def leak_weight(epi: Tensor, target: Tensor, strength: float) -> Tensor:
    """Per-pixel weight `1 + strength * max(epi - target, 0)`, renormalised to mean 1 per
    sample, with the gradient stopped.

    Where the normalised input is bright and the target dark, the light came from outside
    the layer the target keeps (EPI haze, filaments a few hundred nm up); weighting those
    pixels makes keeping that light cost more than its small share of the frame, so the
    network is pushed to section rather than only to deblur. Mean 1 keeps the loss's
    scale: the weight moves emphasis, it does not add it.
    """
    with torch.no_grad():
        w = 1.0 + strength * (epi.float() - target.float()).clamp_min(0.0)
        dims = tuple(range(1, w.ndim))
        return w / w.mean(dim=dims, keepdim=True)


DARK_FLOOR = 0.05
"""Added to the normalised target before `dark_weight`'s power, so empty background
(target ~ 0, mostly noise) is not weighted without bound."""


def dark_weight(reference: Tensor, exponent: float) -> Tensor:
    """Per-pixel weight `(max(reference, 0) + DARK_FLOOR) ** -exponent`, renormalised to
    mean 1 per sample, with the gradient stopped.

    An absolute L1/L2 lets dim structure cost little: a dim filament above the TIRF layer
    leaves a residual of a few hundredths of the frame's range where a bright one leaves
    tenths. With the target as reference (`LossWeights.dark`) errors where TIRF is dark
    (all out-of-layer light) weigh more than those on bright in-layer structure; with the
    input (`LossWeights.dim`) a filament dim in the EPI frame weighs more than a bright
    one. Exponent 0.5 is close to an L1 on the square root of the image, the
    variance-stabilised scale of photon counts; mean 1 keeps the loss's scale.
    """
    with torch.no_grad():
        w = (reference.float().clamp_min(0.0) + DARK_FLOOR).pow(-float(exponent))
        dims = tuple(range(1, w.ndim))
        return w / w.mean(dim=dims, keepdim=True)


def axial_coarse_tv(g: Tensor, pool: int = AXIAL_POOL_PX) -> Tensor:
    """Mean squared Z difference of `g` (B,C,Z,Y,X) average-pooled `pool` px laterally.

    The missing-cone prior: a widefield stack carries no axial information at low lateral
    frequencies, so the physics term cannot stop whole planes alternating in brightness;
    this penalises exactly that component and leaves fine lateral structure free to
    change from plane to plane.
    """
    if g.ndim != 5:
        raise ValueError(f"the axial prior needs a (B,C,Z,Y,X) stack, got {tuple(g.shape)}")
    if g.shape[2] < 2:
        return g.new_zeros(())
    b, c, z, y, x = g.shape
    k = max(1, min(pool, y, x))
    coarse = F.avg_pool2d(g.float().reshape(b * c * z, 1, y, x), k).reshape(b, c, z, -1)
    return coarse.diff(dim=2).square().mean()


def l1_reg(x: Tensor) -> Tensor:
    """Sparsity prior on the pseudo-GT: mean |x| (Eq. 3, `L_l1(g, 0)`)."""
    return x.float().abs().mean()


class HybridLoss(nn.Module):
    """Supervised + self-supervised + regularisation loss (Eq. 2-3 and 9-10).

    `total = L(ctirf, target) + self_supervised * L(recon, epi)
             + b1*TV(g) + b2*TV(b) + b3*|g|_1`.

    ET2dNet: `ctirf = g * psf`, `target` = measured TIRF, `recon = ctirf + b`,
    `epi` = input EPI. ET3dNet distillation (Eq. 9): pass the student's volumetric
    pseudo-GT `g3d` as `ctirf` and the frozen teacher's slice-wise pseudo-GT as `target`;
    `recon`/`epi` are the reconstructed and input EPI stacks.

    `baseline=True` is the ablation without the self-supervised branch: the
    `L(recon, epi)` and `TV(b)` terms are dropped, so `recon`, `epi` and `b` are ignored
    (and may be None). `sample_weight` (B,) weights the supervised term only, since it is
    the TIRF target that is unreliable for out-of-focus pairs.
    """

    def __init__(self, weights: LossWeights, baseline: bool = False) -> None:
        super().__init__()
        self.weights = weights
        self.baseline = baseline

    def forward(
        self,
        ctirf: Tensor,
        target: Tensor,
        recon: Tensor | None,
        epi: Tensor | None,
        g: Tensor,
        b: Tensor | None,
        sample_weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Return the total loss and each unweighted term's value (for logging)."""
        w = self.weights
        pixel_weight = None
        if w.leak:
            if epi is None:
                raise ValueError("the leak weighting needs the input image (epi)")
            pixel_weight = leak_weight(epi, target, w.leak)
        for reference, exponent in ((target, w.dark), (epi, w.dim)):
            if not exponent:
                continue
            if reference is None:
                raise ValueError("the dim-input weighting needs the input image (epi)")
            extra = dark_weight(reference, exponent)
            pixel_weight = extra if pixel_weight is None else pixel_weight * extra
        terms: dict[str, Tensor] = {
            "supervised": image_loss(ctirf, target, w, sample_weight, pixel_weight),
            "tv_g": tv_loss(g),
            "l1_g": l1_reg(g),
        }
        total = terms["supervised"] + w.b1 * terms["tv_g"] + w.b3 * terms["l1_g"]
        if w.axial_coarse and g.ndim == 5:
            terms["axial_coarse"] = axial_coarse_tv(g)
            total = total + w.axial_coarse * terms["axial_coarse"]
        if not self.baseline:
            if recon is None or epi is None or b is None:
                raise ValueError("the hybrid loss needs recon, epi and b (or baseline=True)")
            terms["self_supervised"] = image_loss(recon, epi, w)
            terms["tv_b"] = tv_loss(b)
            total = total + w.self_supervised * terms["self_supervised"] + w.b2 * terms["tv_b"]
        terms["total"] = total
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
        return total, dict(zip(terms, values, strict=True))
