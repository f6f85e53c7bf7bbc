"""Probe: what axial kc ratio could a perfect sectioning method reach in this simulator?

The issue asks cTIRF / EPI kc >= 2.5 on XZ and YZ re-slices (the paper: ~3x on real cells).
The shipped model gets ~1.8. This separates "the model sections too little" from "the
measurement cannot show more here" by scoring, on the same stack as `bench_quality`
(`evaluation.axial.simulated_stack`: 201 planes, 100 nm, 256 px, 60X, seed 0):

- `epi`: the EPI stack itself (camera noise);
- `ctirf`: the shipped model, plane by plane (as `ctirf evaluate`);
- `truth`: the ideal answer, `SimulatedMicroscope.in_focus_section` of every plane (the
  specimen's 100 nm section where the objective actually focuses, in-focus PSF), noise-free;
- `truth+noise`: the same section with the camera's shot and read noise at that plane's
  exposure (a perfect optical sectioning microscope with this camera);
- `truth+epi noise`: the section plus the EPI frame's own noise (its haze's shot noise),
  which a method working from the EPI frame alone cannot remove exactly.

Prints a markdown table; `--json` keeps the numbers. Results in RESULTS.md,
"Probe: the axial kc ratio a perfect section reaches".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ctirf_live.evaluation.axial import (
    AXIAL_SECTOR,
    DEFAULT_Z_START_UM,
    MAX_SECTIONS,
    N_SECTORS,
    STACK_PLANE_STEP_UM,
    restore_stack,
    stack_scope,
)
from ctirf_live.evaluation.metrics import axial_cutoff
from ctirf_live.inference.restorer import Restorer
from ctirf_live.sim.scope import MAX_ADU, uniform_planes_um


def stacks(
    n_planes: int,
    step_um: float,
    size: int,
    seed: int,
    exposure_ms: float,
    plane_step_um: float | None = STACK_PLANE_STEP_UM,
) -> dict[str, np.ndarray]:
    """EPI, noise-free section and noisy section stacks (Z, size, size) in camera ADU."""
    planes = None if plane_step_um is None else uniform_planes_um(plane_step_um)
    scope = stack_scope(size, seed, "60X", exposure_ms, planes)
    rng = np.random.default_rng([seed, 0xA71A])
    out = {
        k: np.empty((n_planes, size, size), np.float32)
        for k in ("epi", "truth", "truth+noise", "truth+epi noise")
    }
    offset, _, read = scope._camera_maps()
    for k in range(n_planes):
        scope.z_um = float(DEFAULT_Z_START_UM + k * step_um)
        out["epi"][k] = scope.snap()
        epi_mean = scope._to_adu(scope.noise_free())
        section = scope.in_focus_section()
        out["truth"][k] = scope._to_adu(section)
        electrons = rng.poisson(section).astype(np.float32)
        electrons += rng.standard_normal(section.shape, np.float32) * read
        out["truth+noise"][k] = np.clip(np.rint(scope._to_adu(electrons)), 0, MAX_ADU)
        out["truth+epi noise"][k] = out["truth"][k] + (out["epi"][k] - epi_mean)
    for name in ("truth", "truth+noise", "truth+epi noise"):
        out[name] -= offset  # keep the camera offset out of the sections' contrast
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="et2dnet_s0_60x_sim")
    parser.add_argument("--planes", type=int, default=201)
    parser.add_argument("--step", type=float, default=0.1, help="z step (um)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exposure", type=float, default=100.0, help="ms")
    parser.add_argument(
        "--plane-step",
        type=float,
        default=STACK_PLANE_STEP_UM,
        help="specimen plane spacing (um); 0: the training frames' planes (coarse above 1.6 um)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = stacks(
        args.planes, args.step, args.size, args.seed, args.exposure, args.plane_step or None
    )
    data["ctirf"] = restore_stack(Restorer(args.model, backend="torch"), data["epi"])
    kc = {
        name: {
            axis: axial_cutoff(
                arr, axis, n_sectors=N_SECTORS, sector=AXIAL_SECTOR, max_sections=MAX_SECTIONS
            )
            for axis in ("xz", "yz")
        }
        for name, arr in data.items()
    }
    print(
        f"{args.planes} planes x {args.size} px, {args.step} um step, seed {args.seed}, "
        f"{args.exposure:g} ms, specimen planes every {args.plane_step or 'default'} um, "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print("| stack | kc XZ | kc YZ | / EPI XZ | / EPI YZ |\n|---|---|---|---|---|")
    for name, row in kc.items():
        print(
            f"| {name} | {row['xz']:.3f} | {row['yz']:.3f} | "
            f"{row['xz'] / kc['epi']['xz']:.2f} | {row['yz'] / kc['epi']['yz']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "kc": kc}, indent=2)
        )


if __name__ == "__main__":
    main()
