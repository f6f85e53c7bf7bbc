"""Probe: can the shipped ET2dNet learn 0.2 um sectioning at all when shown exactly that task?

Every data and loss ablation so far left the shipped model keeping ~0.5 of a filament 0.2 um
above the coverslip (TIRF: 0.15). This separates "the network cannot represent it" from "the
data never asked for it" by fine-tuning v6 on the sectioning test's own geometry (the straight
filaments of `ctirf_live.evaluation.sectioning` at 0-2 um, bright and dim) for a fixed budget:

- `memorize`: noisy snaps of the test field itself (slide seed 11) at 10-100 ms exposures;
  the upper bound: if this does not reach TIRF's survival, capacity (or the loss) is the limit;
- `geometry`: the same filament layout in the cells of other slides (seeds 100, 101, ...),
  never the test cell: can it learn the cue for this layout from other backgrounds?

Then score with `benchmarks.bench_sectioning --model OUT/best.safetensors --fields 1`
(its noise realisation of seed 11 is not among the `memorize` snaps). Results in RESULTS.md,
"Probe: can the network learn 0.2 um at all".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.ablate_line_ladder import FAMILIES, SHIPPED
from benchmarks.train_shipped import warm_start
from ctirf_live.config import LossWeights, TrainSettings
from ctirf_live.data.loaders import FramePair, PairSource, snap_pair
from ctirf_live.evaluation.sectioning import scene_specimen
from ctirf_live.models.etnet import ET2dNet
from ctirf_live.sim.scope import SAMPLE_PLANES_UM
from ctirf_live.training.trainer import train

TEST_SEED = 11


def scene_pairs(
    seeds: list[int], snaps_per_seed: int, rng_seed: int = 0
) -> tuple[list[FramePair], object]:
    """Snaps of the sectioning test's filament layout in the cells of slides `seeds`,
    with the microscope's optics."""
    rng = np.random.default_rng([rng_seed, 0x5C3E])
    pairs, optics = [], None
    for seed in seeds:
        spec = scene_specimen(seed=seed)
        scope = spec.scope
        optics = scope.optics
        scope.set_specimen_override(spec.lines, SAMPLE_PLANES_UM)
        scope.frames_rendered = 1000  # past the test's noise realisation (frames 0-1)
        for i in range(snaps_per_seed):
            scope.exposure_ms = float(np.exp(rng.uniform(np.log(10), np.log(100))))
            pairs.append(snap_pair(scope, f"scene:{seed}:{i}"))
        scope.set_specimen_override(None)
        scope.clear_cache()
    return pairs, optics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arm", choices=("memorize", "geometry"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.arm == "memorize":
        pairs, optics = scene_pairs([TEST_SEED], args.pairs)
    else:
        pairs, optics = scene_pairs(list(range(100, 100 + args.pairs)), 1)
    train_src = PairSource(pairs, optics, f"sectioning capacity probe, {args.arm}")
    val_src = PairSource.synthetic(4, "60X", seed=2, roi=256, families=FAMILIES, progress=False)
    print(f"rendered {len(pairs)} pairs in {time.time() - t0:.0f} s", flush=True)
    settings = TrainSettings(
        epochs=args.epochs,
        warmup_epochs=1,
        lr=2e-4,
        crop=256,
        batch_size=4,
        seed=0,
        loss=LossWeights(self_supervised=0.3),
    )
    torch.manual_seed(0)
    model = ET2dNet(train_src.optics, "S0", attn_up_eighth=False)
    warm_start(model, SHIPPED)
    result = train(
        model, train_src, val_src, settings, args.out, samples_per_epoch=48, log_every=100
    )
    print(f"best checkpoint {result.best_path} after {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
