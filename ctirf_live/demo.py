"""The headless demo: the whole cTIRF workflow on the simulated rig, in a few minutes.

1. load `acquisition_configs/ctirf_demo.cfg` (simulated EPI/TIRF microscope);
2. collect paired EPI/TIRF calibration images with the 100X objective (`calibrate`);
3. fine-tune the shipped 60X ET2dNet to 100X on those pairs (few-shot adaptation);
4. score the shipped and the fine-tuned model on held-out simulated 100X pairs against
   the noise-free TIRF (MS-SSIM, PSNR; raw EPI for reference);
5. run a time-lapse of 6-plane z-stacks through the live hook (`acquire`), saving raw
   and cTIRF, and report frames, latency and throughput: with the shipped ET3dNet (one
   forward per completed stack, back on the 60X objective it was distilled for) when it
   is there, else the fine-tuned ET2dNet plane by plane.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import useq

from ctirf_live.acquisition.calibration import calibrate
from ctirf_live.acquisition.core import check_rig, open_core, set_objective
from ctirf_live.config import EPI_PRESET, ILLUMINATION_GROUP, ConfigError, TrainSettings
from ctirf_live.data.loaders import PairSource
from ctirf_live.data.tiff import atomic_write_json
from ctirf_live.inference.acquire import AcquireResult, acquire, report_progress
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.checkpoint import WEIGHTS_DIR, resolve_checkpoint
from ctirf_live.models.etnet import load_model
from ctirf_live.progress import ProgressReport
from ctirf_live.training.trainer import evaluate_model, finetune, finetune_settings

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "acquisition_configs" / "ctirf_demo.cfg"
SHIPPED_MODEL = "et2dnet_s0_60x_sim"
SHIPPED_3D_MODEL = "et3dnet_s0_60x_sim"


@dataclass
class DemoOptions:
    """Knobs of the demo; the defaults finish in a few minutes on a 2-core laptop."""

    out: Path = Path("demo_out")
    config: Path = DEMO_CONFIG
    model: str = SHIPPED_MODEL
    model3d: str | None = SHIPPED_3D_MODEL  # None: the time-lapse runs ET2dNet per plane
    objective: str = "100X"
    pairs: int = 20
    epochs: int = 8
    crop: int = 256
    eval_pairs: int = 6
    timepoints: int = 3
    planes: int = 6
    roi: int = 512
    seed: int = 0
    device: str = "auto"


@dataclass
class DemoReport:
    """What the demo did and measured."""

    pairs: int = 0
    rejected: int = 0
    calibration_s: float = 0.0
    finetune_s: float = 0.0
    epochs: int = 0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    acquisition: dict[str, Any] = field(default_factory=dict)
    model_path: str = ""
    verdict: str = ""
    consistency: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def flagged_before_after(
    shipped: str | Path, tuned: str | Path, held_out: PairSource
) -> dict[str, Any]:
    """Held-out frames of the new rig the consistency monitor flags before and after
    fine-tuning, each model judged by its own calibration (the shipped one's, and the
    one fine-tuning recorded on its validation frames) and against the rig's pixel size,
    as a live run is. Empty when either model has no calibration. `image_before/after`:
    the frames the image scores alone flag."""
    from ctirf_live.inference.consistency import ConsistencyMonitor, context_reasons

    first = ConsistencyMonitor(Restorer(shipped, device="cpu"))
    after = ConsistencyMonitor(Restorer(tuned, device="cpu"))
    if not (first.calibrated and after.calibrated):
        return {}
    frames = [p.epi for p in held_out.pairs]
    counts: dict[str, Any] = {"frames": len(frames)}
    for name, monitor in (("before", first), ("after", after)):
        image = [bool(monitor.restore(f).flagged) for f in frames]
        rig = context_reasons(monitor.restorer.optics, None, held_out.optics.pixel_size_um)
        counts[name] = sum(flag or bool(rig) for flag in image)
        counts[f"image_{name}"] = sum(image)
    counts["calibration_after"] = after.calibration.get("source", "")
    return counts


def consistency_line(counts: dict[str, Any]) -> str:
    """The demo's line on the monitor: flagged fractions before/after, plainly."""
    if not counts:
        return "consistency monitor: not calibrated, nothing to compare"
    n, before, after = counts["frames"], counts["before"], counts["after"]
    verdict = "drops" if after < before else "does not drop" if after == before else "rises"
    line = (
        f"consistency monitor: {before} of {n} held-out frames of this rig flagged before "
        f"fine-tuning ({before / n:.0%}), {after} of {n} after ({after / n:.0%}): the "
        f"flagged fraction {verdict}"
    )
    if "image_before" in counts:
        line += (
            f" (image scores alone: {counts['image_before']} -> {counts['image_after']}; "
            "the rest by the rig's pixel size)"
        )
    return line


def adaptation_verdict(
    before: dict[str, Any], after: dict[str, Any], epochs: int, pairs: int = 1
) -> str:
    """One plain sentence on whether fine-tuning helped on the held-out pairs.

    A change counts when it exceeds both 0.005 MS-SSIM and the pairs' spread divided by
    the square root of their number (a rough standard error).
    """
    gain = after["ms_ssim_mean"] - before["ms_ssim_mean"]
    n = max(1, int(pairs))
    noise = max(0.005, max(after["ms_ssim_sd"], before["ms_ssim_sd"]) / n**0.5)
    if gain > noise:
        return (
            f"fine-tuning helped: MS-SSIM {before['ms_ssim_mean']:.3f} -> "
            f"{after['ms_ssim_mean']:.3f} (+{gain:.3f})"
        )
    if gain < -noise:
        return (
            f"fine-tuning made it worse: MS-SSIM {before['ms_ssim_mean']:.3f} -> "
            f"{after['ms_ssim_mean']:.3f} ({gain:.3f}); collect more or better pairs, or "
            "fine-tune with fewer epochs"
        )
    return (
        f"fine-tuning made no measurable difference (MS-SSIM {gain:+.3f}, within {noise:.3f}) "
        f"after {epochs} epochs: the shipped model already fits this rig, or it needs more "
        "epochs (--epochs 20)"
    )


Step = Callable[[str], None]


def _timelapse(options: DemoOptions) -> useq.MDASequence:
    half = (options.planes - 1) / 2 * 0.2
    return useq.MDASequence(
        stage_positions=[(0.0, 0.0, half)],
        time_plan={"interval": 0, "loops": options.timepoints},
        z_plan={"range": 2 * half, "step": 0.2},
        channels=[{"group": ILLUMINATION_GROUP, "config": EPI_PRESET, "exposure": 50}],
        axis_order="tpcz",
    )


def _timelapse_restorer(
    options: DemoOptions, model2d: Any, meta2d: dict[str, Any], notes: list[str]
) -> tuple[Restorer, str]:
    """ET3dNet for the stacks when it is there and fits them, else ET2dNet per plane."""
    if options.model3d:
        try:
            restorer = Restorer(options.model3d, device=options.device)
            restorer.check_stack(options.planes, 0.2)
        except ValueError as exc:
            notes.append(f"time-lapse with ET2dNet per plane: {exc}")
        else:
            if restorer.dims == 3:
                return restorer, (
                    f"{Path(str(options.model3d)).name} (ET3dNet, {restorer.optics.objective}, "
                    "one forward per stack)"
                )
            notes.append(f"{options.model3d} is not a 3D model; time-lapse with ET2dNet")
    return (
        Restorer(model2d, device=options.device, metadata=meta2d),
        f"the fine-tuned ET2dNet ({options.objective}, plane by plane)",
    )


def run_demo(options: DemoOptions, step: Step = print) -> DemoReport:
    """Run the whole workflow; `step` receives one line per stage."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport()
    try:
        shipped = resolve_checkpoint(options.model)
    except ValueError:
        raise ConfigError(
            f"shipped model {options.model!r} not found in {WEIGHTS_DIR}; train one with "
            "`python -m benchmarks.train_shipped --ship` or pass --model PATH"
        ) from None

    with open_core(options.config) as core:
        rig = check_rig(core, options.config)
        camera = core.getCameraDevice()
        core.setProperty(camera, "RealTime", "1")
        core.clearROI()
        width, height = core.getImageWidth(), core.getImageHeight()
        size = options.roi
        core.setROI((width - size) // 2, (height - size) // 2, size, size)
        set_objective(core, rig, options.objective)
        step(
            f"[1/4] collecting {options.pairs} EPI/TIRF pairs with the {options.objective} "
            f"objective (simulated rig, {core.getImageWidth()}x{core.getImageHeight()})"
        )
        t0 = time.perf_counter()
        with ProgressReport("calibrating", unit="pairs", every=1) as bar:
            dataset = calibrate(
                core,
                rig,
                out / "pairs",
                pairs=options.pairs,
                objective=options.objective,
                exposure_ms=50,
                seed=options.seed,
                progress=lambda s: bar.update(s.done, s.requested, detail=f"{s.rejected} rejected"),
            )
        report.calibration_s = time.perf_counter() - t0
        report.pairs = len(dataset)
        report.rejected = len(dataset.manifest.get("calibration", {}).get("rejected", []))

        step(
            f"[2/4] fine-tuning the shipped 60X model ({shipped.name}) on "
            f"{report.pairs} pairs, {options.epochs} epochs"
        )
        source = PairSource.from_dataset(dataset)
        settings = finetune_settings(
            TrainSettings(crop=min(options.crop, *source.shape), seed=options.seed),
            epochs=options.epochs,
        )
        t1 = time.perf_counter()
        result = finetune(shipped, source, settings, out / "finetuned", device=options.device)
        report.finetune_s = time.perf_counter() - t1
        report.epochs = len(result.history)
        report.model_path = str(result.best_path)

        step(
            f"[3/4] scoring before/after on {options.eval_pairs} held-out simulated "
            f"{options.objective} pairs against the noise-free TIRF"
        )
        with ProgressReport("rendering held-out pairs", unit="pairs", every=1) as bar:
            held_out = PairSource.synthetic(
                options.eval_pairs,
                options.objective,
                seed=options.seed + 101,
                roi=options.roi,
                progress=bar.update,
            )
        before, _ = load_model(shipped)
        with ProgressReport("scoring the shipped model", unit="pairs", every=1) as bar:
            report.before = evaluate_model(
                before, held_out, device=options.device, progress=bar.update
            )
        after, after_meta = load_model(result.best_path)
        with ProgressReport("scoring the fine-tuned model", unit="pairs", every=1) as bar:
            report.after = evaluate_model(
                after, held_out, device=options.device, progress=bar.update
            )
        report.verdict = adaptation_verdict(
            report.before["ctirf"], report.after["ctirf"], report.epochs, len(held_out)
        )
        step(report.verdict)
        with ProgressReport("consistency monitor, before and after"):
            report.consistency = flagged_before_after(shipped, result.best_path, held_out)
        step(consistency_line(report.consistency))

        restorer, label = _timelapse_restorer(options, after, after_meta, report.notes)
        if restorer.dims == 3:
            set_objective(core, rig, restorer.optics.objective)
        step(
            f"[4/4] time-lapse: {options.timepoints} time points x {options.planes}-plane "
            f"z-stacks through the live hook with {label} (raw + cTIRF saved)"
        )
        with ProgressReport("acquiring", unit="frames") as bar:
            run: AcquireResult = acquire(
                core,
                _timelapse(options),
                restorer,
                out / "timelapse",
                policy="record",
                overwrite=True,
                progress=report_progress(bar),
            )
        report.acquisition = {
            "frames": run.frames_acquired,
            "expected": run.frames_expected,
            "acquisition_s": run.acquisition_s,
            "total_s": run.total_s,
            "raw": str(run.raw_path),
            "ctirf": str(run.ctirf_path),
            "model": restorer.describe(),
            **run.stats.to_dict(),
        }
        report.notes.extend(run.warnings + run.errors)
    atomic_write_json(out / "demo_report.json", report.__dict__)
    return report
