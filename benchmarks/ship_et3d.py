"""Record a finished ET3dNet distillation run's curve and ship its best checkpoint.

    ctirf distill --teacher et2dnet_s0_60x_sim --synthetic 64 --size 384 --epochs 70 \
        --crop 128 -o runs/et3d_s0
    python -m benchmarks.ship_et3d --run runs/et3d_s0 --ship

Writes the "Shipped ET3dNet: distillation on simulated stacks" section of
benchmarks/RESULTS.md (recipe from the checkpoint's provenance, every epoch's losses and
validation MS-SSIM) and, with `--ship`, copies `best.safetensors` and its metadata into
`ctirf_live/weights/` under `--name`. The quality evidence is `benchmarks/bench_et3d.py`'s.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.results import update_section

SHIPPED = Path(__file__).resolve().parents[1] / "ctirf_live" / "weights"
SECTION = "Shipped ET3dNet: distillation on simulated stacks"


def curve_rows(history: list[dict]) -> str:
    """One Markdown row per epoch: supervised, physics and total loss, validation."""
    return "\n".join(
        f"| {h['epoch']} | {h.get('train_supervised', float('nan')):.4f} | "
        f"{h.get('train_self_supervised', float('nan')):.4f} | {h['train_loss']:.4f} | "
        f"{h.get('val_loss', float('nan')):.4f} | {h.get('val_ms_ssim', float('nan')):.4f} | "
        f"{'yes' if h.get('best') else ''} |"
        for h in history
    )


def ship(checkpoint: Path, name: str) -> None:
    """Copy a checkpoint and its metadata into ctirf_live/weights/ as `name`."""
    target = SHIPPED / f"{name}.safetensors"
    shutil.copyfile(checkpoint, target)
    shutil.copyfile(checkpoint.with_suffix(".json"), target.with_suffix(".json"))
    print(f"shipped {target}")


def ship_inflated(args: argparse.Namespace) -> None:
    """Write (and with --ship, ship) the ET2dNet `--inflate-from` inflated to a 6-plane,
    200 nm ET3dNet with `--psf-model`, untrained."""
    from ctirf_live.models.etnet import ET3dNet, load_model, save_model
    from ctirf_live.training.distill import inflate_teacher

    teacher, _ = load_model(args.inflate_from)
    optics = teacher.optics.model_copy(update={"z_step_um": 0.2})
    student = ET3dNet(
        optics,
        "S0",
        psf_model=args.psf_model,
        attn_up_eighth=teacher.backbone.attn_up_eighth,
        axial_unblur=args.axial_unblur,
    )
    inflate_teacher(student, teacher)
    unblur = (
        f", slice-wise view inverted by {args.axial_unblur} Richardson-Lucy iterations along Z"
        if args.axial_unblur
        else ""
    )
    provenance = {
        "kind": "inflate",
        "data": f"none: {args.inflate_from} inflated to 3D, not trained{unblur}",
        "init_from": str(args.inflate_from),
    }
    out = args.run / "inflated.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(student, out, provenance=provenance, stack={"planes": 6, "z_step_um": 0.2})
    print(f"wrote {out}")
    if args.ship:
        ship(out, args.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/et3d_s0"))
    parser.add_argument("--name", default="et3dnet_s0_60x_sim")
    parser.add_argument("--ship", action="store_true", help="copy best into ctirf_live/weights")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--command", default=None, help="the distill command as run (default: rebuilt)"
    )
    parser.add_argument("--section", default=SECTION, help="RESULTS.md section to write")
    parser.add_argument(
        "--inflate-from",
        default=None,
        help="instead of a run: this ET2dNet inflated to 3D, untrained (inflate_teacher)",
    )
    parser.add_argument("--psf-model", default="gibson_lanni_water", help="with --inflate-from")
    parser.add_argument(
        "--axial-unblur",
        type=int,
        default=0,
        help="with --inflate-from: Richardson-Lucy iterations that invert the slice-wise "
        "view along Z in the cTIRF output (ETNet.unblur_view; 0: off)",
    )
    args = parser.parse_args()
    if args.inflate_from:
        ship_inflated(args)
        return

    best = args.run / "best.safetensors"
    if not best.is_file():
        raise SystemExit(f"{best} does not exist: is {args.run} a finished distill run?")
    meta = json.loads(best.with_suffix(".json").read_text())
    history = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]
    prov = meta["provenance"]
    settings = prov["settings"]
    minutes = sum(h.get("seconds", 0.0) for h in history) / 60
    best_epoch = min(history, key=lambda h: h.get("val_loss", float("inf")))["epoch"]
    command = args.command or (
        f"ctirf distill --teacher {prov.get('init_from')} --synthetic "
        f"{prov['train_pairs'] + prov['val_pairs']} --size 384 --epochs {settings['epochs']} "
        f"--crop {settings['crop']} -o {args.run}"
    )
    text = f"""Command: `{command}` (1 CPU thread, machine shared with other work; no GPU lent).

ET3dNet {meta["architecture"]["kwargs"]["variant"]} ({meta["psf"]["model"]} 3D PSF, \
{meta["psf"]["shape"][0]} planes), teacher `{prov.get("init_from")}`, data {prov["data"]}:
{prov["train_pairs"]} training / {prov["val_pairs"]} validation stacks of
{prov["stack"]["planes"]} planes {prov["stack"]["z_step_um"]} um apart, random
{settings["crop"]} px crops, batch {settings["batch_size"]}, AdamW {settings["lr"]:g} with
{settings["warmup_epochs"]} warm-up epochs and cosine decay, {len(history)} epochs in
{minutes:.0f} min; best (lowest validation loss) epoch {best_epoch}. Supervised term:
the teacher's slice-wise g against the student's g as a 2D model sees it
(`ETNet.slicewise_view`); physics term: g * psf3d + b against the stack; missing-cone
prior weight {settings["loss"].get("axial_coarse", 0.0):g}.

| epoch | supervised | physics | train loss | val loss | val MS-SSIM | best so far |
|---|---|---|---|---|---|---|
{curve_rows(history)}
"""
    if not args.no_write:
        update_section(args.section, text)
    print(text)
    if args.ship:
        ship(best, args.name)


if __name__ == "__main__":
    main()
