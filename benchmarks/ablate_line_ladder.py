"""Ablation: does fine-tuning on fields with straight filaments at known heights teach 0.2 um?

The shipped ET2dNet keeps ~0.5 of a filament 0.2 um above the coverslip where TIRF keeps
0.15. One suspicion is that the simulated specimens rarely show the network an isolated,
in-focus-looking filament just above the layer. This script fine-tunes the shipped model
for a fixed budget on two arms with the same number of pairs, seeds and steps:

- `control`: ordinary simulated pairs (factin, factin, membrane, tissue);
- `lines`: half of those pairs replaced by F-actin fields with 6-14 extra straight
  filaments laid on the simulator's sample planes at heights 0-2 um (a third on the glass).

Then score each with `benchmarks.bench_sectioning` (its test scene uses another seed and
other filament geometry). Results are in RESULTS.md, "Ablation: straight filaments at
known heights".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.train_shipped import add_ceiling_options, warm_start
from ctirf_live.config import LossWeights, TrainSettings
from ctirf_live.data.loaders import FramePair, PairSource, simulated_fields, snap_pair
from ctirf_live.models.etnet import ET2dNet
from ctirf_live.sim.sample import SpecimenRenderer
from ctirf_live.sim.scope import PSF_MARGIN_UM, SAMPLE_PLANES_UM
from ctirf_live.training.trainer import train

SHIPPED = Path(__file__).resolve().parents[1] / "ctirf_live/weights/et2dnet_s0_60x_sim.safetensors"
HEIGHTS_UM = np.array(
    [0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0, 1.4, 2.0]
)
FAMILIES = ("factin", "factin", "membrane", "tissue")


def splat_line(
    plane: np.ndarray, start: tuple[float, float], end: tuple[float, float], density: float
) -> None:
    """Add a straight filament of `density` (per pixel of length) to `plane`, bilinearly.

    Samples every half pixel including both ends (as the recorded pilots ran), so the
    total is density * length plus about half a pixel's worth.
    """
    (x0, y0), (x1, y1) = start, end
    length = float(np.hypot(x1 - x0, y1 - y0))
    n = int(length * 2) + 1
    t = np.linspace(0.0, 1.0, n)
    x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
    step = length / max(n - 1, 1)
    ix, iy = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - ix, y - iy
    h, w = plane.shape
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        xx, yy = ix + dx, iy + dy
        ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        np.add.at(plane, (yy[ok], xx[ok]), (weight[ok] * density * step).astype(plane.dtype))


def line_pairs(n: int, seed: int, roi: int) -> list[FramePair]:
    """`n` F-actin pairs, each with 6-14 straight filaments at heights from HEIGHTS_UM."""
    rng = np.random.default_rng([seed, 77])
    pairs = []
    for i, (scope, (x, y)) in enumerate(simulated_fields(n, ("factin",), "60X", seed, roi)):
        p = scope.optics.pixel_size_um
        side = roi + 2 * int(np.ceil(PSF_MARGIN_UM / p)) + 2
        vol = SpecimenRenderer(seed, (x, y), (side, side), p, SAMPLE_PLANES_UM, "factin").render(
            lateral_profile=False
        )
        off = (side - roi) // 2
        for _ in range(int(rng.integers(6, 14))):
            k = int(np.argmin(np.abs(SAMPLE_PLANES_UM - rng.choice(HEIGHTS_UM))))
            density = float(np.exp(rng.uniform(0.0, np.log(8.0)))) * p
            half = rng.uniform(40, 250) / 2
            cx, cy, a = off + rng.uniform(0, roi), off + rng.uniform(0, roi), rng.uniform(0, np.pi)
            dx, dy = half * np.cos(a), half * np.sin(a)
            splat_line(vol[k], (cx - dx, cy - dy), (cx + dx, cy + dy), density)
        scope.set_specimen_override(vol, SAMPLE_PLANES_UM)
        scope.exposure_ms = float(np.exp(rng.uniform(np.log(10), np.log(100))))
        pairs.append(snap_pair(scope, f"lines:{i}"))
        scope.set_specimen_override(None)
        scope.clear_cache()
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arm", choices=("lines", "control"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--roi", type=int, default=384)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--crop", type=int, default=256, help="training crop side (px)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--samples-per-epoch", type=int, default=48)
    add_ceiling_options(ap)
    ap.add_argument(
        "--self-supervised", type=float, default=0.3, help="weight of the physics term"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    n_lines = args.pairs // 2 if args.arm == "lines" else 0
    normal = PairSource.synthetic(
        args.pairs - n_lines, "60X", seed=1, roi=args.roi, families=FAMILIES, progress=False
    )
    pairs = list(normal.pairs) + (line_pairs(n_lines, 21, args.roi) if n_lines else [])
    train_src = PairSource(pairs, normal.optics, f"line ladder ablation, {args.arm}")
    val_roi = max(256, args.crop)
    val_src = PairSource.synthetic(
        4, "60X", seed=2, roi=val_roi, families=FAMILIES, progress=False
    )
    print(f"rendered {len(pairs)} pairs in {time.time() - t0:.0f} s", flush=True)
    settings = TrainSettings(
        epochs=args.epochs,
        warmup_epochs=1,
        lr=2e-4,
        crop=args.crop,
        batch_size=args.batch,
        seed=0,
        loss=LossWeights(self_supervised=args.self_supervised),
        target_ceiling=args.target_ceiling,
        input_ceiling=args.input_ceiling,
    )
    torch.manual_seed(0)
    model = ET2dNet(train_src.optics, "S0", attn_up_eighth=False)
    warm_start(model, SHIPPED)
    result = train(
        model,
        train_src,
        val_src,
        settings,
        args.out,
        samples_per_epoch=args.samples_per_epoch,
        log_every=100,
    )
    print(f"best checkpoint {result.best_path} after {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
