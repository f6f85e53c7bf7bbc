"""Train the shipped ET2dNet on simulated 60X pairs and record that the recipe learns.

    python -m benchmarks.train_shipped --epochs 30 --out runs/shipped_s0

Renders training pairs and 20 held-out pairs (another slide seed) with the simulator,
trains S0 with the paper's recipe (AdamW 5e-4, warm-up cosine, hybrid loss, batch 4)
on random crops, then scores the best checkpoint on the held-out pairs (full frames,
through the Restorer) against the noise-free simulated TIRF: MS-SSIM and PSNR of cTIRF
versus raw EPI. Writes the curve and the scores to `benchmarks/RESULTS.md` and, with
`--ship`, copies the checkpoint into `ctirf_live/weights/`.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.results import update_section
from ctirf_live.config import LossWeights, TrainSettings
from ctirf_live.data.loaders import PairSource
from ctirf_live.evaluation.metrics import ms_ssim, psnr
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet, load_model
from ctirf_live.models.evit_unet import count_parameters
from ctirf_live.training.trainer import TrainResult, train

SHIPPED = Path(__file__).resolve().parents[1] / "ctirf_live" / "weights"
TEST_ROI = 512  # held-out frames: whole 512x512 fields through the Restorer


def held_out_scores(model_path: Path, source: PairSource) -> dict[str, dict[str, float]]:
    """Mean/sd MS-SSIM and PSNR to the noise-free TIRF, for raw EPI and cTIRF."""
    model, meta = load_model(model_path)
    restorer = Restorer(model, device="cpu", metadata=meta)
    rows: dict[str, list[tuple[float, float]]] = {"epi": [], "ctirf": []}
    for pair in source:
        ctirf = restorer.restore(pair.epi)
        for name, img in (("epi", pair.epi), ("ctirf", ctirf)):
            rows[name].append((ms_ssim(img, pair.truth), psnr(img, pair.truth)))
    out = {}
    for name, vals in rows.items():
        arr = np.asarray(vals)
        out[name] = {
            "ms_ssim_mean": float(arr[:, 0].mean()),
            "ms_ssim_sd": float(arr[:, 0].std()),
            "psnr_mean": float(arr[:, 1].mean()),
            "psnr_sd": float(arr[:, 1].std()),
        }
    return out


def warm_start(model: torch.nn.Module, checkpoint: Path) -> list[str]:
    """Load a checkpoint's weights into `model`; new layers' output projections start at 0.

    Returns the names of the parameters the checkpoint did not have. The attention
    upsample at 1/16 -> 1/8 adds to a transposed conv, so when the checkpoint lacks it,
    its last BatchNorm is scaled to zero and the warm-started network computes exactly what
    the checkpoint did; a checkpoint that has it is continued as it is.
    """
    from ctirf_live.models.checkpoint import load_checkpoint

    state, _ = load_checkpoint(checkpoint)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    unexpected = [k for k in weights if k not in own]
    if unexpected:
        raise SystemExit(f"{checkpoint} has layers this model lacks: {unexpected[:3]}")
    missing = [k for k in own if k not in weights]
    model.load_state_dict(weights, strict=False)
    for name, module in model.named_modules():
        if name.endswith("ups.1.attn.proj") and f"{name}.bn.weight" in missing:
            torch.nn.init.zeros_(module.bn.weight)
    return missing


def _ceiling(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def add_ceiling_options(parser: argparse.ArgumentParser) -> None:
    """--target-ceiling and --input-ceiling: where Eq. 1 clips targets and inputs."""
    parser.add_argument(
        "--target-ceiling",
        type=_ceiling,
        default=1.0,
        help="clip of the normalised TIRF targets (paper Eq. 1: 1; 'none': no clip)",
    )
    parser.add_argument(
        "--input-ceiling",
        type=_ceiling,
        default=1.0,
        help="clip of the normalised EPI inputs (Eq. 1: 1; recorded in the checkpoint)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="S0")
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--val-pairs", type=int, default=16)
    parser.add_argument("--test-pairs", type=int, default=20)
    parser.add_argument("--roi", type=int, default=512)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument(
        "--families",
        default="factin,factin,membrane,tissue",
        help="specimen families of the training pairs, cycled (ctirf_live.sim.sample.FAMILIES)",
    )
    parser.add_argument(
        "--line-pairs",
        type=int,
        default=0,
        help="of the --pairs, how many are F-actin fields with extra straight filaments at "
        "heights 0-2 um (benchmarks.ablate_line_ladder.line_pairs, seed 21; 0: none)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="checkpoint to warm-start from; layers it lacks (the 1/16 -> 1/8 attention "
        "upsample) start at zero so the network starts as that checkpoint",
    )
    parser.add_argument(
        "--attn-up-eighth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="attention upsample at 1/16 -> 1/8 as well as 1/32 -> 1/16",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--log-every", type=int, default=4, help="steps between step logs")
    parser.add_argument(
        "--variance-scaling", choices=("weight", "target", "none"), default="weight"
    )
    parser.add_argument(
        "--leak",
        type=float,
        default=0.0,
        help="out-of-layer emphasis of the supervised L1/L2 (LossWeights.leak; 0: off)",
    )
    parser.add_argument(
        "--dark",
        type=float,
        default=0.0,
        help="dark-target emphasis of the supervised L1/L2 (LossWeights.dark, 0-1; 0: off)",
    )
    parser.add_argument(
        "--dim",
        type=float,
        default=0.0,
        help="dim-input emphasis of the supervised L1/L2 (LossWeights.dim, 0-2; 0: off)",
    )
    parser.add_argument(
        "--self-supervised",
        type=float,
        default=LossWeights().self_supervised,
        help="weight of the physics term L(g * psf + b, EPI) (0: supervised only)",
    )
    parser.add_argument(
        "--tv-b",
        type=float,
        default=LossWeights().b2,
        help="weight of the background map's total variation (LossWeights.b2)",
    )
    add_ceiling_options(parser)
    parser.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples-per-epoch", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/shipped_s0"))
    parser.add_argument("--ship", action="store_true", help="copy best to ctirf_live/weights")
    parser.add_argument("--name", default="et2dnet_s0_60x_sim")
    parser.add_argument(
        "--score-only", action="store_true", help="re-score the finished run in --out"
    )
    args = parser.parse_args()

    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    if args.threads:
        torch.set_num_threads(args.threads)
    test_src = PairSource.synthetic(args.test_pairs, "60X", seed=3, roi=TEST_ROI)
    if args.score_only:
        previous = json.loads((args.out / "benchmark.json").read_text())
        render_s, train_s = previous["render_s"], previous["train_s"]
        result = TrainResult(
            best_path=args.out / "best.safetensors",
            best_val_loss=min(h["val_loss"] for h in previous["history"]),
            history=previous["history"],
            last_path=args.out / "last.safetensors",
        )
    else:
        t0 = time.perf_counter()
        train_src = PairSource.synthetic(
            args.pairs - args.line_pairs, "60X", seed=1, roi=args.roi, families=families
        )
        if args.line_pairs:
            from benchmarks.ablate_line_ladder import line_pairs  # it imports this module

            lines = line_pairs(args.line_pairs, 21, args.roi)
            train_src = PairSource(
                list(train_src.pairs) + lines,
                train_src.optics,
                f"{train_src.description} + {args.line_pairs} line-ladder fields",
            )
        val_src = PairSource.synthetic(
            args.val_pairs, "60X", seed=2, roi=args.crop, families=families
        )
        render_s = time.perf_counter() - t0
        settings = TrainSettings(
            epochs=args.epochs,
            warmup_epochs=args.warmup_epochs,
            lr=args.lr,
            crop=args.crop,
            batch_size=args.batch_size,
            seed=0,
            variance_scaling=args.variance_scaling,
            loss=LossWeights(
                leak=args.leak,
                dark=args.dark,
                dim=args.dim,
                self_supervised=args.self_supervised,
                b2=args.tv_b,
            ),
            target_ceiling=args.target_ceiling,
            input_ceiling=args.input_ceiling,
        )
        torch.manual_seed(0)
        model = ET2dNet(train_src.optics, args.variant, attn_up_eighth=args.attn_up_eighth)
        if args.init_from:
            warm_start(model, Path(args.init_from))
        t1 = time.perf_counter()
        result = train(
            model,
            train_src,
            val_src,
            settings,
            args.out,
            samples_per_epoch=args.samples_per_epoch,
            log_every=args.log_every,
        )
        train_s = time.perf_counter() - t1
    model, _ = load_model(result.best_path)
    scores = held_out_scores(result.best_path, test_src)

    record = {
        "variant": args.variant,
        "parameters": count_parameters(model),
        "train_pairs": args.pairs,
        "line_pairs": args.line_pairs,
        "roi": args.roi,
        "crop": args.crop,
        "epochs": args.epochs,
        "samples_per_epoch": args.samples_per_epoch,
        "render_s": render_s,
        "train_s": train_s,
        "batch_size": args.batch_size,
        "steps": args.epochs * -(-args.samples_per_epoch // args.batch_size),
        "held_out": scores,
        "history": result.history,
    }
    (args.out / "benchmark.json").write_text(json.dumps(record, indent=2, default=str))
    if args.ship:
        SHIPPED.mkdir(exist_ok=True)
        target = SHIPPED / f"{args.name}.safetensors"
        shutil.copyfile(result.best_path, target)
        shutil.copyfile(result.best_path.with_suffix(".json"), target.with_suffix(".json"))

    curve = "\n".join(
        f"| {h['epoch']} | {h.get('train_loss', float('nan')):.4f} | "
        f"{h.get('val_loss', float('nan')):.4f} | {h.get('val_ms_ssim', float('nan')):.4f} |"
        for h in result.history
    )
    rows = "\n".join(
        f"| {label} | {s['ms_ssim_mean']:.3f} +- {s['ms_ssim_sd']:.3f} | "
        f"{s['psnr_mean']:.2f} +- {s['psnr_sd']:.2f} |"
        for label, s in (("raw EPI", scores["epi"]), ("cTIRF", scores["ctirf"]))
    )
    init = f", warm-started from `{args.init_from}`" if args.init_from else ""
    command = " ".join(["python -m benchmarks.train_shipped", *sys.argv[1:]])
    text = f"""Command: `{command}`

Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads,
no GPU (this task was lent none); shared with other work while it ran.

{args.variant} ({record["parameters"] / 1e6:.2f} M parameters), {args.pairs} simulated 60X
pairs of {args.roi}x{args.roi} (slide seed 1), validation {args.val_pairs} pairs (seed 2),
random {args.crop}x{args.crop} crops, batch {args.batch_size},
{args.samples_per_epoch} crops per epoch,
{args.epochs} epochs ({record["steps"]} steps), AdamW {args.lr:g} with {args.warmup_epochs}
warm-up epochs and cosine decay, hybrid loss{init}. Rendering took {render_s / 60:.1f} min, training
{train_s / 60:.1f} min.

Held-out: {args.test_pairs} pairs from another slide (seed 3), full {TEST_ROI}x{TEST_ROI}
frames through the Restorer, scored against the noise-free simulated TIRF after p98
normalisation. The reference is the noise-free TIRF as a noiseless camera would record
it (offset included, like the measured TIRF the network learns from):

| input | MS-SSIM | PSNR (dB) |
|---|---|---|
{rows}

Training curve (validation MS-SSIM of cTIRF vs measured TIRF on centre crops):

| epoch | train loss | val loss | val MS-SSIM |
|---|---|---|---|
{curve}
"""
    if not args.no_write:
        update_section("Shipped ET2dNet: training on simulated 60X pairs", text)
    print(text)


if __name__ == "__main__":
    main()
