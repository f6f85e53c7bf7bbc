"""Few-shot adaptation to a second rig (paper Fig. 2b,d), over several seeds.

    python -m benchmarks.bench_adaptation --seeds 0 1 2 --epochs 10

The shipped 60X model is fine-tuned on 20 simulated pairs of the demo's second rig
("100X": NA 1.45, 65 nm pixels, 561/600 nm, 150 nm penetration, another camera), once
as the hybrid network and once as the baseline (no self-supervised branch), for each
seed (crops, rotations, order), and scored after every epoch on held-out pairs of that
rig against the noise-free TIRF. An upper reference, a model adapted on 96 pairs of the
rig (`--reference-pairs`) for `--reference-epochs` epochs (or `--reference CKPT`),
gives the gap the few-shot runs should close: closure = (best - start) / (reference -
start). Curves (mean +- s.d. over seeds, Fig. 2d) go to benchmarks/RESULTS.md and `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks.results import update_section
from ctirf_live.config import TrainSettings
from ctirf_live.data.loaders import PairSource
from ctirf_live.evaluation.adaptation import adaptation_experiment, score_ctirf
from ctirf_live.models.etnet import load_model
from ctirf_live.training.trainer import finetune, finetune_settings

SECTION = "Few-shot adaptation to the second rig (hybrid vs baseline, seeds)"


def reference_model(args: argparse.Namespace, val: PairSource) -> tuple[str, float]:
    """(checkpoint, held-out MS-SSIM) of the rig-trained upper reference."""
    if args.reference:
        path = args.reference
    else:
        many = PairSource.synthetic(
            args.reference_pairs,
            args.objective,
            seed=args.data_seed + 50,
            roi=args.size,
            progress=False,
        )
        settings = finetune_settings(
            crop=min(TrainSettings().crop, args.size), epochs=args.reference_epochs
        )
        result = finetune(args.model, many, settings, args.out / "reference", progress=False)
        path = str(result.best_path)
    model, _ = load_model(path)
    scores = score_ctirf(model, val, "truth", "cpu")
    return str(path), float(np.mean(scores["ms_ssim"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="et2dnet_s0_60x_sim")
    parser.add_argument("--objective", default="100X")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--val-pairs", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--reference", default=None, help="rig-trained checkpoint")
    parser.add_argument("--reference-epochs", type=int, default=8)
    parser.add_argument("--reference-pairs", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("runs/adaptation"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    train = PairSource.synthetic(
        args.pairs, args.objective, seed=args.data_seed, roi=args.size, progress=False
    )
    val = PairSource.synthetic(
        args.val_pairs, args.objective, seed=args.data_seed + 1, roi=args.size, progress=False
    )
    runs = {}
    for seed in args.seeds:
        runs[seed] = adaptation_experiment(
            args.model,
            train,
            val,
            args.epochs,
            args.out / f"seed{seed}",
            seed=seed,
            device="cpu",
            progress=False,
        )
    ref_path, ref_score = reference_model(args, val)
    summary = summarise(runs, ref_score)
    record = {
        "model": args.model,
        "objective": args.objective,
        "pairs": args.pairs,
        "val_pairs": args.val_pairs,
        "size": args.size,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "reference": ref_path,
        "reference_ms_ssim": ref_score,
        "summary": summary,
        "minutes": (time.perf_counter() - started) / 60,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_adaptation.json").write_text(json.dumps(record, indent=2))
    text = report(record, args)
    print(text)
    if not args.no_write:
        update_section(SECTION, text)


def summarise(runs: dict[int, dict], reference: float) -> dict[str, dict]:
    """Per arm: mean and s.d. over seeds of MS-SSIM at each epoch, and the gap closed."""
    out = {}
    for arm in ("hybrid", "baseline"):
        curves = np.array([r["curves"][arm]["ms_ssim_mean"] for r in runs.values()])
        start = float(curves[:, 0].mean())
        best = curves.max(axis=1)
        gap = reference - start
        out[arm] = {
            "mean": curves.mean(0).tolist(),
            "sd": curves.std(0).tolist(),
            "start": start,
            "best_mean": float(best.mean()),
            "best_epoch_mean": float(curves.argmax(axis=1).mean()),
            "gap_closed": float((best.mean() - start) / gap) if abs(gap) > 1e-6 else None,
        }
    return out


def report(record: dict, args: argparse.Namespace) -> str:
    s = record["summary"]
    epochs = len(s["hybrid"]["mean"])
    rows = "\n".join(
        f"| {e} | {s['hybrid']['mean'][e]:.3f} +- {s['hybrid']['sd'][e]:.3f} | "
        f"{s['baseline']['mean'][e]:.3f} +- {s['baseline']['sd'][e]:.3f} |"
        for e in range(epochs)
    )

    def closed(arm: str) -> str:
        g = s[arm]["gap_closed"]
        return "n/a" if g is None else f"{100 * g:.0f}%"

    seeds = " ".join(map(str, args.seeds))
    arms = "\n".join(
        f"| {arm} | {s[arm]['start']:.3f} | {s[arm]['best_mean']:.3f} | "
        f"{s[arm]['best_epoch_mean']:.1f} | {closed(arm)} |"
        for arm in ("hybrid", "baseline")
    )
    command = f"python -m benchmarks.bench_adaptation --seeds {seeds} --epochs {args.epochs}"
    return f"""Command: `{command}`
({date.today().isoformat()}, CPU, {record["minutes"]:.0f} min).

Model `{record["model"]}` fine-tuned on {record["pairs"]} simulated {record["objective"]}
pairs ({record["size"]} px, slide seed {args.data_seed}), scored after every epoch on
{record["val_pairs"]} held-out pairs of that rig (seed {args.data_seed + 1}) against the
noise-free TIRF; seeds {seeds}. Rig-trained reference (`{record["reference"]}`):
MS-SSIM {record["reference_ms_ssim"]:.3f}.

| arm | start | best (mean over seeds) | epoch of best | gap to reference closed |
|---|---|---|---|---|
{arms}

MS-SSIM per epoch, mean +- s.d. over seeds (epoch 0 = before fine-tuning):

| epoch | hybrid | baseline |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
