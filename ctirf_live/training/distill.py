"""ET3dNet by distillation from a frozen ET2dNet (paper Section 2.3, Eq. 9-10).

The teacher restores each plane of an EPI stack; its pseudo ground truth `g` becomes the
student's target. A frame's `g` holds whatever still looks in focus in it, so neighbouring
planes 200 nm apart share content; the student's volume `g3d` is compared with the teacher
through `ETNet.slicewise_view` (g3d blurred along Z by the PSF's relative peak), so that
`g3d` itself is a sectioned volume that `g3d * psf3d + b3d` can explain (used as is, the
teacher's stack counts each emitter about three times and contradicts the physics term).
Both work on one normalisation scale: the whole stack divided by its
98th percentile, as the 3D restorer normalises (a plane normalised on its own would put
a dim out-of-focus plane on the scale of a bright one). The student, a 3D EViT-UNet
(Z never strided), outputs g3d and b3d; the loss is

    L(V g3d, g_teacher) + L(g3d * psf3d + b3d, x3d) + b1 TV(g3d) + b2 TV(b3d) + b3 |g3d|_1

with MS-SSIM per plane, batch 2 and otherwise the 2D recipe. Training, resume,
progress and best-by-validation are the 2D trainer's (`ctirf_live.training.trainer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctirf_live.config import TrainSettings
from ctirf_live.data.loaders import FramePair, PairSource
from ctirf_live.data.normalize import normalize
from ctirf_live.data.stacks import StackSet
from ctirf_live.models.etnet import ET3dNet, ETNet, load_model
from ctirf_live.training.trainer import TrainError, TrainResult, _Run

DISTILL_BATCH = 2


def distill_settings(**changes: Any) -> TrainSettings:
    """The 2D recipe with the paper's 3D batch of 2, the teacher's maps clipped at 1 as the
    shipped ET3dNet was distilled (unclipped 2D targets are measured, unclipped 3D ones not)."""
    return TrainSettings(**{"batch_size": DISTILL_BATCH, "target_ceiling": 1.0, **changes})


@torch.no_grad()
def teacher_targets(
    teacher: ETNet, stack: np.ndarray, percentile: float = 98.0, device: str = "cpu"
) -> np.ndarray:
    """The teacher's `g` for every plane, on the stack's scale: (Z, Y, X) float32 in the
    stack's raw units (divide by the stack's percentile scale for the normalised map)."""
    if teacher.dims != 2:
        raise TrainError("the teacher must be an ET2dNet (2D) checkpoint")
    norm, scale = normalize(stack, percentile, ceiling=teacher.input_ceiling)
    teacher = teacher.to(device).eval()
    out = np.empty_like(norm)
    for k, plane in enumerate(norm):
        g = teacher(torch.from_numpy(plane)[None, None].to(device)).g
        out[k] = g[0, 0].float().cpu().numpy()
    return out * np.float32(scale)


def distillation_source(
    teacher: ETNet, stacks: StackSet, percentile: float = 98.0, device: str = "cpu"
) -> PairSource:
    """Stacks paired with their teacher targets, as the trainer's (stack) pairs."""
    pairs = [
        FramePair(s.epi, teacher_targets(teacher, s.epi, percentile, device), s.field, s.truth)
        for s in stacks.stacks
    ]
    return PairSource(pairs, stacks.optics, stacks.description)


START_G = 0.1  # normalised units: a 3D g this high explains a stack at ~0.6 through psf3d
START_B = 0.3


def start_near_the_stack(student: ETNet) -> None:
    """Start the student's maps near g = START_G, b = START_B instead of softplus(0) = 0.69.

    Through the 3D PSF every plane of g adds to every plane of the reconstruction, so
    the default start reconstructs the stack ~5x too bright and the physics term (~28)
    swamps the first epochs; the head's output bias is set to these values and its
    weights shrunk tenfold so the first reconstruction is near the measured stack.
    """
    last = student.backbone.head[-1]
    with torch.no_grad():
        last.weight.mul_(0.1)
        for channel, value in ((0, START_G), (1, START_B)):
            last.bias[channel] = float(np.log(np.expm1(value)))


def inflate_teacher(student: ETNet, teacher: ETNet) -> None:
    """Start the 3D student as its 2D teacher run plane by plane (I3D-style inflation).

    Every 2D kernel goes to the centre Z slice of the matching 3D kernel (zeros in the
    others), so the convolutions act on each plane alone; 1x1 layers, norms and the
    attention's tables are copied. Only the windowed attention then mixes planes. The
    teacher's g holds each plane's in-focus light plus ~0.6 of its neighbours', which the
    volume g must not count again, so g's head bias is lowered by log(sum of the Z
    profile) (~g / 2.9 where g is small, softplus being ~exp there).
    """
    if teacher.dims != 2 or student.dims != 3:
        raise TrainError("inflation maps a 2D (ET2dNet) teacher into a 3D (ET3dNet) student")
    mine, theirs = student.backbone.state_dict(), teacher.backbone.state_dict()
    if set(mine) != set(theirs):
        raise TrainError(
            "the teacher's backbone differs from the student's (variant or attention "
            "upsampling); distil with the teacher's --variant"
        )
    out = {}
    for key, w3 in mine.items():
        w2 = theirs[key]
        if w2.shape == w3.shape:
            out[key] = w2.clone()
        elif w3.ndim == w2.ndim + 1 and (*w3.shape[:2], *w3.shape[3:]) == tuple(w2.shape):
            w = torch.zeros_like(w3)
            w[:, :, w3.shape[2] // 2] = w2
            out[key] = w
        else:
            raise TrainError(f"cannot inflate {key}: {tuple(w2.shape)} -> {tuple(w3.shape)}")
    student.backbone.load_state_dict(out)
    total = float(student.z_profile().sum())
    with torch.no_grad():
        student.backbone.head[-1].bias[0] -= math.log(total)


def _continue_student(student: ETNet, checkpoint: str | Path) -> None:
    """Load an ET3dNet checkpoint's weights into `student`, refusing another network."""
    previous, _ = load_model(checkpoint)
    if previous.dims != 3:
        raise TrainError(f"{checkpoint} is a 2D model; --init-student needs an ET3dNet")
    if previous.backbone.arch_config() != student.backbone.arch_config():
        raise TrainError(
            f"{checkpoint} has another backbone ({previous.arch_config()['kwargs']}) than "
            f"the {student.arch_config()['kwargs']} asked for; match --variant"
        )
    student.backbone.load_state_dict(previous.backbone.state_dict())


def distill(
    teacher: str | Path | ETNet,
    train_stacks: StackSet,
    val_stacks: StackSet | None,
    settings: TrainSettings,
    out: str | Path,
    *,
    variant: str = "S0",
    psf_model: str = "gibson_lanni",
    device: str | torch.device = "auto",
    resume: bool = True,
    progress: bool = True,
    samples_per_epoch: int | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    keep_resume: bool = False,
    init_student: str | Path | None = None,
    inflate: bool = False,
) -> TrainResult:
    """Train an ET3dNet student on `train_stacks` from a frozen ET2dNet `teacher`.

    The student's PSF is the 3D PSF of the stacks' optics (z step included): by default
    Gibson-Lanni (psfmodels), an oil objective focusing into water, whose axial fall-off
    (relative peak 0.67 at 0.2 um for NA 1.5) follows what the simulated and real stacks
    show, where Born & Wolf in one medium (0.85) keeps defocused planes too sharp.
    Its checkpoints record the plane count and z step they were trained on.
    `init_student` continues an ET3dNet checkpoint (same variant and PSF model) instead
    of starting near the stack, e.g. the shipped model on a new rig's stacks; `inflate`
    starts it as the teacher run plane by plane (`inflate_teacher`).
    """
    if inflate and init_student is not None:
        raise TrainError("give --inflate or --init-student, not both")
    if len(train_stacks) == 0:
        raise TrainError(f"{train_stacks.description}: no stacks to distil from")
    teacher_name = str(teacher) if not isinstance(teacher, ETNet) else "in-memory teacher"
    if not isinstance(teacher, ETNet):
        teacher, _ = load_model(teacher)  # file, run folder or shipped name
    for p in teacher.parameters():
        p.requires_grad_(False)
    dev = "cpu" if str(device) == "auto" and not torch.cuda.is_available() else str(device)
    dev = "cuda" if dev == "auto" else dev
    train_source = distillation_source(teacher, train_stacks, settings.percentile, dev)
    val_source = (
        distillation_source(teacher, val_stacks, settings.percentile, dev)
        if val_stacks is not None and len(val_stacks)
        else None
    )
    if not train_stacks.optics_recorded:
        # files that give only pixel size and z step (pymmcore-plus raw stores): the rest of
        # the optics (NA, wavelength, indices) are the teacher's rig
        train_stacks = train_stacks.with_optics(teacher.optics)
    optics = train_stacks.optics.model_copy(update={"z_step_um": train_stacks.z_step_um})
    if inflate:
        student = ET3dNet(
            optics, variant, psf_model=psf_model, attn_up_eighth=teacher.backbone.attn_up_eighth
        )
        inflate_teacher(student, teacher)
    else:
        student = ET3dNet(optics, variant, psf_model=psf_model)
        if init_student is None:
            start_near_the_stack(student)
        else:
            _continue_student(student, init_student)
    stack = {"planes": train_stacks.planes, "z_step_um": train_stacks.z_step_um}
    run = _Run(
        student,
        train_source,
        val_source,
        settings,
        Path(out),
        device,
        False,
        samples_per_epoch,
        kind="distill",
        init_from=teacher_name,
        supervise="g_slicewise",
        stack=stack,
        keep_resume=keep_resume,
    )
    return run.fit(resume, progress, 0, None, on_epoch)
