"""ET3dNet against slice-wise ET2dNet and 3D Richardson-Lucy on simulated stacks.

    python -m benchmarks.bench_et3d --model3d runs/et3d/best.safetensors --stacks 6

Held-out simulated 6-plane EPI stacks (200 nm apart, starting 0-2 um into dense F-actin
cells, so emitters above and below the stack give strong out-of-volume background) are
restored by ET3dNet, by the ET2dNet teacher plane by plane, and by Richardson-Lucy with
the 3D PSF; each is scored per plane against the sectioned ground truth (what lies at
each focal plane, in-focus PSF) with MS-SSIM, and for axial consistency: the correlation
of neighbouring planes' outputs against that of the truth (a method that hallucinates
independently per plane decorrelates them). Also the time per stack on this machine.
Writes the "ET3dNet" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from benchmarks.results import update_section
from ctirf_live.data.stacks import synthetic_stacks
from ctirf_live.evaluation.baselines import richardson_lucy_3d
from ctirf_live.evaluation.metrics import ms_ssim
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import make_psf

SECTION = "ET3dNet: volumetric cTIRF on simulated stacks"
HELD_OUT_SEED = 31
AXIAL_UNBLUR = 5  # RL iterations of ETNet.unblur_view for the per-plane row (validation best)
Z_DECONV_LAMBDA = 1.0  # best of 0, 0.3, 1 on three stacks (exact inversion: MS-SSIM ~0.14)


def axial_consistency(stack: np.ndarray) -> float:
    """Mean correlation between neighbouring planes."""
    s = np.asarray(stack, np.float64)
    return float(
        np.mean([np.corrcoef(s[k].ravel(), s[k + 1].ravel())[0, 1] for k in range(len(s) - 1)])
    )


def axial_fidelity(stack: np.ndarray, truth: np.ndarray, top: float = 0.2) -> float:
    """Mean correlation, along Z, of the output's and the truth's intensity at each pixel
    where the truth has structure (its brightest `top` fraction of the max projection):
    1 when every pixel's rise and fall through the stack follows the sectioned truth."""
    s = np.asarray(stack, np.float64).reshape(stack.shape[0], -1)
    t = np.asarray(truth, np.float64).reshape(truth.shape[0], -1)
    mip = t.max(axis=0)
    keep = mip >= np.quantile(mip, 1 - top)
    s, t = s[:, keep], t[:, keep]
    s = s - s.mean(axis=0)
    t = t - t.mean(axis=0)
    denom = np.sqrt((s * s).sum(axis=0) * (t * t).sum(axis=0))
    valid = denom > 0
    return float(np.mean((s * t).sum(axis=0)[valid] / denom[valid])) if valid.any() else 0.0


def z_deconvolve(
    stack: np.ndarray, profile: np.ndarray, lam: float = Z_DECONV_LAMBDA
) -> np.ndarray:
    """Tikhonov-regularised inverse of the slice-wise view's Z blur (edges continued, as
    `ETNet.slicewise_view`), applied to a per-plane output: the best a student matching
    the teacher through that view could do by a linear Z step alone (non-negative)."""
    nz, half = stack.shape[0], len(profile) // 2
    blur = np.zeros((nz, nz))
    for k in range(nz):
        for d in range(-half, half + 1):
            blur[k, min(max(k + d, 0), nz - 1)] += profile[d + half]
    inverse = np.linalg.solve(blur.T @ blur + lam * np.eye(nz), blur.T)
    return np.einsum("kz,zyx->kyx", inverse, stack).clip(0.0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model3d", required=True)
    parser.add_argument("--model2d", default="et2dnet_s0_60x_sim")
    parser.add_argument("--stacks", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rl-iterations", type=int, default=20)
    parser.add_argument(
        "--time-size", type=int, default=512, help="also time one 6 x N x N stack (0: skip)"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    data = synthetic_stacks(args.stacks, "60X", seed=HELD_OUT_SEED, size=args.size)
    r3 = Restorer(args.model3d, device="cpu")
    r2 = Restorer(args.model2d, device="cpu")
    # RL gets the student's own 3D PSF (same model, planes and z step)
    psf3 = make_psf(r3.optics, dims=3, model=r3.model.psf_model, planes=11)
    profile = r3.model.z_profile().cpu().numpy()

    def per_plane(s: np.ndarray) -> np.ndarray:
        return np.stack([r2.restore(p) for p in s])

    unblur = r3.model.axial_unblur or AXIAL_UNBLUR

    def per_plane_unblurred(s: np.ndarray) -> np.ndarray:
        stack = torch.from_numpy(per_plane(s))[None, None]
        return r3.model.unblur_view(stack, unblur)[0, 0].numpy()

    methods = {
        "epi": lambda s: s,
        "et2dnet_per_plane": per_plane,
        "et2dnet_z_deconvolved": lambda s: z_deconvolve(per_plane(s), profile),
        f"et2dnet_per_plane_rl_z{unblur}": per_plane_unblurred,
        "rl_3d": lambda s: richardson_lucy_3d(s, psf3, args.rl_iterations),
        "et3dnet": r3.restore,
    }
    scores: dict[str, dict[str, list[float]]] = {
        m: {"ms_ssim": [], "axial": [], "fidelity": []} for m in methods
    }
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    truth_axial = []
    for fn in methods.values():  # warm-up: first-call costs (ONNX export, OTF caches)
        fn(data.stacks[0].epi)
    for stack in data.stacks:
        truth_axial.append(axial_consistency(stack.truth))
        for name, fn in methods.items():
            t0 = time.perf_counter()
            out = fn(stack.epi)
            seconds[name].append(time.perf_counter() - t0)
            scores[name]["ms_ssim"].append(ms_ssim(out, stack.truth))
            scores[name]["axial"].append(axial_consistency(out))
            scores[name]["fidelity"].append(axial_fidelity(out, stack.truth))
    summary = {
        name: {
            "ms_ssim": float(np.mean(v["ms_ssim"])),
            "ms_ssim_sd": float(np.std(v["ms_ssim"])),
            "axial": float(np.mean(v["axial"])),
            "axial_fidelity": float(np.mean(v["fidelity"])),
            "ms_per_stack": 1000 * float(np.median(seconds[name])),
        }
        for name, v in scores.items()
    }
    if args.time_size:
        big = synthetic_stacks(1, "60X", seed=HELD_OUT_SEED + 1, size=args.time_size).stacks[0].epi
        for name, fn in methods.items():
            fn(big)  # warm-up
            t0 = time.perf_counter()
            fn(big)
            summary[name][f"ms_per_stack_{args.time_size}"] = 1000 * (time.perf_counter() - t0)
    record = {
        "model3d": args.model3d,
        "model2d": args.model2d,
        "stacks": args.stacks,
        "size": args.size,
        "truth_axial": float(np.mean(truth_axial)),
        "summary": summary,
    }
    print(json.dumps(record, indent=2))
    big_key = f"ms_per_stack_{args.time_size}"
    rows = "\n".join(
        f"| {m} | {s['ms_ssim']:.3f} +- {s['ms_ssim_sd']:.3f} | {s['axial_fidelity']:.3f} | "
        f"{s['axial']:.3f} | {s['ms_per_stack']:.0f} | {s.get(big_key, float('nan')):.0f} |"
        for m, s in summary.items()
    )
    command = f"python -m benchmarks.bench_et3d --model3d {args.model3d} --stacks {args.stacks}"
    threads = torch.get_num_threads()
    text = f"""Command: `{command}`
({date.today().isoformat()}, CPU).

{args.stacks} held-out simulated stacks (6 x {args.size} x {args.size}, 200 nm, slide seed
{HELD_OUT_SEED}) against the sectioned ground truth. Axial consistency = mean correlation of
neighbouring planes (truth: {record["truth_axial"]:.3f}; closer is better, not higher).
Axial fidelity = mean correlation along Z of each structured pixel's intensity with the
truth's (1 = every pixel rises and falls through the stack as the sectioned truth does).
Times: median per stack of {args.size} px, and one 6 x {args.time_size} x {args.time_size} stack
({threads} CPU threads, machine shared with other work).

| method | MS-SSIM per plane | axial fidelity | neighbour corr. | ms/stack | ms/big stack |
|---|---|---|---|---|---|
{rows}
"""
    if not args.no_write:
        update_section(SECTION, text)
    out = Path("runs") / "bench_et3d.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
