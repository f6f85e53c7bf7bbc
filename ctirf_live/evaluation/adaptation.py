"""Few-shot adaptation: hybrid vs baseline fine-tuning to a new objective (paper Fig. 2d).

Both arms start from the same checkpoint (or the baseline from its own, e.g. a model
trained without the self-supervised branch, as in the paper) and are fine-tuned with the
same settings, seed and crops on the same pairs of the new objective; only the loss
differs (`baseline=True` drops the reconstructed-EPI term). After every epoch (and
before the first) the arm's current model restores every held-out pair and its cTIRF
is scored with MS-SSIM and PSNR against the TIRF reference, the same way as
`evaluate_pairs` scores cTIRF. The plot shows mean +- s.d. over pairs, smoothed over 3
epochs as in the paper.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.config import TrainSettings
from ctirf_live.data.loaders import PairSource
from ctirf_live.evaluation.metrics import ms_ssim, psnr
from ctirf_live.evaluation.report import REFERENCES, check_references, reference_kind
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ETNet, load_model
from ctirf_live.training.trainer import (
    LAST,
    finetune,
    finetune_settings,
    optics_differ,
    resolve_model_path,
)

ARMS = ("hybrid", "baseline")
COLORS = {"hybrid": "tab:red", "baseline": "black"}


def smooth3(values: Sequence[float]) -> list[float]:
    """Centred 3-epoch moving average; the ends average the neighbours they have."""
    arr = np.asarray(values, dtype=np.float64)
    return [float(arr[max(0, i - 1) : i + 2].mean()) for i in range(len(arr))]


def score_ctirf(
    model: ETNet, source: PairSource, kind: str, device: str = "auto"
) -> dict[str, list[float]]:
    """Per-pair MS-SSIM and PSNR of `model`'s cTIRF against the `kind` reference."""
    # torch, not ONNX: a model scored between epochs changes every time, and each new set
    # of weights would export (and cache) a graph of its own
    restorer = Restorer(model, device=device, backend="torch")
    out: dict[str, list[float]] = {"ms_ssim": [], "psnr": []}
    try:
        for pair in source.pairs:
            target = pair.truth if kind == "truth" else pair.tirf
            ctirf = restorer.restore(pair.epi)
            out["ms_ssim"].append(ms_ssim(ctirf, target))
            out["psnr"].append(psnr(ctirf, target))
    finally:
        _forget_inference_tensors()
    return out


def _forget_inference_tensors() -> None:
    """Empty the backbone's relative-position cache after inference.

    It is a module-level lru_cache; entries built under `torch.inference_mode` (as the
    Restorer runs) break training at the same window sizes later in the process
    ("Inference tensors cannot be saved for backward"). Harmless once the cache builds
    its tensors outside inference mode.
    """
    from ctirf_live.models import evit_unet

    cache = getattr(evit_unet, "_relative_index", None)
    if cache is not None and hasattr(cache, "cache_clear"):
        cache.cache_clear()


def _epoch_entry(epoch: int, scores: dict[str, list[float]], train_loss: float | None) -> dict:
    return {
        "epoch": epoch,
        "ms_ssim": scores["ms_ssim"],
        "psnr": scores["psnr"],
        "ms_ssim_mean": float(np.mean(scores["ms_ssim"])),
        "ms_ssim_sd": float(np.std(scores["ms_ssim"])),
        "psnr_mean": float(np.mean(scores["psnr"])),
        "train_loss": train_loss,
    }


def _run_arm(
    arm: str,
    start: str | Path,
    source_train: PairSource,
    source_val: PairSource,
    settings: TrainSettings,
    out: Path,
    kind: str,
    device: str,
    progress: bool,
    on_epoch: Callable[[str, dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Fine-tune one arm; score it before training and after every epoch."""
    model, _ = load_model(resolve_model_path(start))
    if optics_differ(model.optics, source_train.optics):
        model.set_optics(source_train.optics)
    entries = [_epoch_entry(0, score_ctirf(model, source_val, kind, device), None)]
    if on_epoch is not None:
        on_epoch(arm, entries[-1])
    run_dir = out / arm

    def after_epoch(record: dict[str, Any]) -> None:
        trained, _ = load_model(run_dir / LAST)
        scores = score_ctirf(trained, source_val, kind, device)
        entries.append(_epoch_entry(int(record["epoch"]), scores, float(record["train_loss"])))
        if on_epoch is not None:
            on_epoch(arm, entries[-1])

    finetune(
        start,
        source_train,
        settings,
        run_dir,
        device=device,
        baseline=arm == "baseline",
        resume=False,
        progress=progress,
        on_epoch=after_epoch,
    )
    means = [e["ms_ssim_mean"] for e in entries]
    return {
        "start": str(start),
        "run": str(run_dir),
        "epochs": entries,
        "ms_ssim_mean": means,
        "ms_ssim_sd": [e["ms_ssim_sd"] for e in entries],
        "ms_ssim_smoothed": smooth3(means),
        "ms_ssim_sd_smoothed": smooth3([e["ms_ssim_sd"] for e in entries]),
        "initial": means[0],
        "final": means[-1],
        "best": max(means),
        "best_epoch": int(np.argmax(means)),
    }


def adaptation_experiment(
    checkpoint: str | Path,
    source_train: PairSource,
    source_val: PairSource,
    epochs: int,
    out: str | Path,
    *,
    baseline_checkpoint: str | Path | None = None,
    settings: TrainSettings | None = None,
    seed: int = 0,
    reference: str = "auto",
    device: str = "auto",
    progress: bool = True,
    on_epoch: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune the hybrid and the baseline model on `source_train` for `epochs` epochs
    and record the cTIRF MS-SSIM on `source_val` before and after every epoch.

    Runs go to `out/hybrid` and `out/baseline` (fresh each time); `out/adaptation.json`
    and `out/adaptation.png` hold the curves. `settings` defaults to `finetune_settings`
    with the crop fitted to the frames; its epochs are set to `epochs` and all of
    `source_train` is trained on (no validation split); `seed` (crops, rotations) is
    used when `settings` is not given. `on_epoch(arm, entry)` is
    called after each evaluation. Returns what the JSON holds.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if len(source_train) == 0 or len(source_val) == 0:
        raise ValueError("the adaptation experiment needs training and held-out pairs")
    kind = reference_kind(source_val, reference)
    check_references(source_val, kind)
    side = min(source_train.shape)
    base = settings or finetune_settings(crop=min(TrainSettings().crop, side // 32 * 32), seed=seed)
    settings = TrainSettings(**{**base.model_dump(), "epochs": epochs, "val_fraction": 0.0})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    starts = {"hybrid": checkpoint, "baseline": baseline_checkpoint or checkpoint}
    curves = {
        arm: _run_arm(
            arm,
            starts[arm],
            source_train,
            source_val,
            settings,
            out,
            kind,
            device,
            progress,
            on_epoch,
        )
        for arm in ARMS
    }
    result = {
        "checkpoint": str(checkpoint),
        "baseline_checkpoint": str(baseline_checkpoint or checkpoint),
        "train": source_train.description,
        "train_pairs": len(source_train),
        "val_pairs": len(source_val),
        "val_fields": source_val.fields,
        "objective": source_train.optics.objective,
        "reference": kind,
        "reference_label": REFERENCES[kind],
        "epochs": epochs,
        "settings": settings.model_dump(),
        "curves": curves,
    }
    (out / "adaptation.json").write_text(json.dumps(result, indent=2) + "\n")
    adaptation_figure(result, out / "adaptation.png")
    return result


def adaptation_figure(result: dict[str, Any], path: str | Path) -> Path:
    """PNG of MS-SSIM per epoch, mean +- s.d. band, smoothed over 3 epochs, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    for arm, curve in result["curves"].items():
        epochs = [e["epoch"] for e in curve["epochs"]]
        mean = np.asarray(curve["ms_ssim_smoothed"])
        sd = np.asarray(curve["ms_ssim_sd_smoothed"])
        color = COLORS.get(arm, None)
        ax.plot(epochs, mean, "-o", ms=3, color=color, label=arm)
        ax.fill_between(epochs, mean - sd, mean + sd, color=color, alpha=0.18, lw=0)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("cTIRF MS-SSIM on held-out pairs")
    ax.set_title(
        f"adaptation to {result['objective']}: {result['train_pairs']} training pairs, "
        f"{result['val_pairs']} held out\nvs {result['reference_label']}; "
        "mean ± s.d. over pairs, smoothed over 3 epochs",
        fontsize=9,
    )
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
