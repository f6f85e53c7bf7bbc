"""Calibrate a checkpoint's consistency monitor on held-out simulated frames.

    python -m benchmarks.calibrate_monitor --model et2dnet_s0_60x_sim --ship
    python -m benchmarks.calibrate_monitor --model et3dnet_s0_60x_sim --frames 12 --ship

The shipped models' calibrations are made this way: `--frames` simulated EPI frames
(ET3dNet: 6-plane stacks, every plane scored) of every specimen family they were trained
on, from a slide (`--seed`) that neither training nor the benchmarks use, through the
model's own objective. `--ship` writes it into the checkpoint (weights unchanged,
metadata and JSON sidecar rewritten atomically); without it the calibration is only
printed.
"""

from __future__ import annotations

import argparse
import json

import torch

from ctirf_live.data.loaders import PairSource
from ctirf_live.data.stacks import synthetic_stacks
from ctirf_live.inference.consistency import calibrate, record_calibration
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.checkpoint import resolve_checkpoint

FAMILIES = ("factin", "membrane", "tissue")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="et2dnet_s0_60x_sim")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--roi", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ship", action="store_true", help="write it into the checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.model)
    restorer = Restorer(path, device="cpu")
    objective = restorer.optics.objective
    if restorer.dims == 3:
        stacks = synthetic_stacks(
            args.frames, objective, seed=args.seed, size=args.roi, families=FAMILIES
        )
        images = [s.epi for s in stacks.stacks]
        kind = f"{stacks.planes}-plane stacks"
    else:
        source = PairSource.synthetic(
            args.frames,
            objective,
            seed=args.seed,
            roi=args.roi,
            progress=False,
            families=FAMILIES,
        )
        images, kind = [p.epi for p in source.pairs], "frames"
    what = (
        f"{args.frames} held-out simulated {objective} {kind} (slide seed {args.seed}, "
        f"{args.roi} px), {'/'.join(FAMILIES)}"
    )
    calibration = calibrate(restorer, images, what)
    print(json.dumps({k: calibration[k] for k in ("version", "frames", "source")}))
    print("spectrum:", json.dumps(calibration.get("spectrum", {})))
    if args.ship:
        print(f"written to {record_calibration(path, calibration)}")


if __name__ == "__main__":
    main()
