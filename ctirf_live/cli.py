"""`ctirf` command line: a thin layer over the Python API.

Every command turns user errors (bad config, missing file, impossible optics) into one
line on stderr and exit code 2; set CTIRF_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from ctirf_live import __version__
from ctirf_live.cli_export import export_command
from ctirf_live.clihelp import FlagCommand, FlagGroup
from ctirf_live.config import DISTILL_AXIAL_PRIOR

app = typer.Typer(
    name="ctirf",
    cls=FlagGroup,
    help="Computational TIRF (cTIRF) in the acquisition loop.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

ObjectiveOpt = Annotated[
    str | None,
    typer.Option(
        "--objective", help="Objective preset to image with, e.g. 60X (default: the active one)"
    ),
]

TileOpt = Annotated[int, typer.Option(help="tile size (px, multiple of 32)")]
PolicyOpt = Annotated[
    str,
    typer.Option(
        metavar="record|preview",
        help="record: every frame (spills to disk); preview: newest frame wins (any case)",
    ),
]
ThreadsOpt = Annotated[
    int | None, typer.Option(min=1, help="torch CPU threads (default: torch's own)")
]
LiveThreadsOpt = Annotated[
    int | None,
    typer.Option(min=1, help="model CPU threads (default: cores - 1, one left to acquisition)"),
]
CtirfDtypeOpt = Annotated[
    str,
    typer.Option(
        "--ctirf-dtype",
        metavar="float32|float16|uint16",
        help="cTIRF pixels: float32; uint16 with a recorded scale (half the bytes); "
        "float16 (OME-Zarr only)",
    ),
]
CtirfScaleOpt = Annotated[
    float | None,
    typer.Option(
        "--ctirf-scale",
        help="uint16: input counts per stored step (default: 1 for 14-16-bit cameras, "
        "finer for fewer bits)",
    ),
]
ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="Micro-Manager .cfg (acquisition_configs/ctirf_demo.cfg)"),
]


def user_errors(func: F) -> F:
    """Report expected failures in one line with exit code 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
            if os.environ.get("CTIRF_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {error_line(exc)}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: work done so far is kept")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


_PYTHON_OVERWRITE = re.compile(r"[Uu]se '?overwrite=True'? to overwrite\.?|'?overwrite=True'?")


def error_line(exc: BaseException) -> str:
    """The one line a user sees: pydantic reports name their fields, Python-only hints
    (`overwrite=True`) become the CLI's option."""
    from pydantic import ValidationError

    from ctirf_live.config import validation_message

    if isinstance(exc, ValidationError):
        return validation_message(exc)
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    return _PYTHON_OVERWRITE.sub(
        lambda m: "pass --overwrite to replace it" if m.group(0)[0] in "Uu" else "--overwrite", msg
    )


def _version(value: bool) -> None:
    if value:
        console.print(f"ctirf-live {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Computational TIRF (cTIRF) in the acquisition loop."""


@app.command(cls=FlagCommand)
@user_errors
def snap(
    config: ConfigOpt,
    output: Annotated[Path, typer.Option("--out", "--output", "-o", help="OME-TIFF to write")],
    mode: Annotated[
        str, typer.Option(help="Illumination preset: EPI | TIRF (any case)", metavar="EPI|TIRF")
    ] = "EPI",
    objective: Annotated[str | None, typer.Option(help="Objective preset, e.g. 60X")] = None,
    z: Annotated[float | None, typer.Option("--z", help="Focus position (um)")] = None,
    exposure: Annotated[float | None, typer.Option(help="Exposure (ms)")] = None,
) -> None:
    """Snap one EPI or TIRF frame and save it as OME-TIFF with its metadata."""
    from ctirf_live.acquisition.core import check_rig, open_core
    from ctirf_live.acquisition.snap import save_snap
    from ctirf_live.acquisition.snap import snap as snap_frame

    with open_core(config) as core:
        rig = check_rig(core, config)
        image, meta = snap_frame(core, rig, _preset(mode, rig), objective, z, exposure)
    path = save_snap(output, image, meta)
    console.print(
        f"saved {path} ({image.shape[1]}x{image.shape[0]} {image.dtype}, {meta['mode']}, "
        f"{meta['optics']['objective']}, pixel {meta['optics']['pixel_size_um'] * 1000:g} nm)"
    )


def _preset(mode: str, rig: Any) -> str:
    """The rig's illumination preset spelt as the user typed it, in any case."""
    matches = [p for p in rig.illumination_presets if p.lower() == mode.lower()]
    return matches[0] if len(matches) == 1 else mode


@app.command(cls=FlagCommand)
@user_errors
def calibrate(
    config: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder (resumed if present)")],
    pairs: Annotated[int, typer.Option(help="Good EPI/TIRF pairs to collect")] = 20,
    objective: Annotated[str | None, typer.Option(help="Objective preset, e.g. 100X")] = None,
    positions: Annotated[
        str, typer.Option(help="grid, random, or a useq/pymmcore-widgets YAML/JSON file")
    ] = "grid",
    exposure: Annotated[float | None, typer.Option(help="Exposure (ms)")] = None,
    z_offset: Annotated[float, typer.Option("--z-offset", help="Focus offset (um)")] = 0.0,
    max_shift: Annotated[
        float, typer.Option("--max-shift", help="Reject pairs shifted more than this (px)")
    ] = 3.0,
    force: Annotated[bool, typer.Option(help="Keep pairs with a shift over --max-shift")] = False,
    seed: Annotated[int, typer.Option(help="Seed for --positions random")] = 0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the planned sequence; move and write nothing")
    ] = False,
    stacks: Annotated[
        bool,
        typer.Option(
            "--stacks",
            help="Also record an EPI z-stack at each field (ET3dNet data for ctirf distill)",
        ),
    ] = False,
    planes: Annotated[int, typer.Option(min=2, help="--stacks: planes per stack")] = 6,
    z_step: Annotated[
        float, typer.Option("--z-step", min=0.01, help="--stacks: plane spacing (um)")
    ] = 0.2,
) -> None:
    """Collect registered EPI/TIRF pairs for fine-tuning (safe to interrupt and rerun)."""
    from rich.table import Table

    from ctirf_live.acquisition.calibration import calibrate as run_calibration
    from ctirf_live.acquisition.calibration import summarize
    from ctirf_live.acquisition.core import check_rig, open_core
    from ctirf_live.progress import ProgressReport

    with open_core(config) as core:
        rig = check_rig(core, config)
        kwargs = dict(
            pairs=pairs,
            objective=objective,
            positions=positions,
            exposure_ms=exposure,
            z_offset_um=z_offset,
            max_shift_px=max_shift,
            force=force,
            seed=seed,
            stack_planes=planes if stacks else 0,
            stack_step_um=z_step,
        )
        if dry_run:
            plan = run_calibration(core, rig, out, dry_run=True, **kwargs)
            console.print(plan.describe(), highlight=False, soft_wrap=True)
            return
        report = ProgressReport(
            "calibrating", unit="pairs", console=err_console, every=1, transient=False
        )
        with report:
            ds = run_calibration(
                core,
                rig,
                out,
                progress=lambda s: report.update(
                    s.done, s.requested, detail=f"{s.rejected} rejected"
                ),
                **kwargs,
            )
    for note in ds.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    summary = summarize(ds)
    table = Table(title="calibration", show_header=False)
    table.add_row("pairs", f"{summary['pairs']} / {summary['requested']}")
    rejected = summary["rejected"]
    table.add_row(
        "rejected", ", ".join(f"{k}: {v}" for k, v in rejected.items()) if rejected else "none"
    )
    shifts = f"{summary['mean_shift_px']:.2f} px (max {summary['max_shift_px']:.2f})"
    table.add_row("mean |shift|", shifts)
    if stacks:
        table.add_row("z-stacks", f"{len(ds.stack_files())} of {planes} planes")
    console.print(table)
    console.print(f"dataset: {summary['folder']}", soft_wrap=True, highlight=False)


@app.command(cls=FlagCommand)
@user_errors
def process(
    source: Annotated[
        Path,
        typer.Argument(help="EPI OME-TIFF (frame, time series, stack; every series) or a folder"),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint path or shipped name")],
    output: Annotated[
        Path,
        typer.Option(
            "--out",
            "--output",
            "-o",
            help="cTIRF OME-TIFF to write (several series: a folder <stem>/<stem>_p000.ome.tiff)",
        ),
    ],
    channels: Annotated[
        str,
        typer.Option(help="Channels to restore, comma-separated, or all; others are left out"),
    ] = "EPI",
    device: DeviceOption = "auto",
    backend: BackendOption = "auto",
    tile: TileOpt = 512,
    threads: ThreadsOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output")
    ] = False,
    scheduler: Annotated[
        str,
        typer.Option(
            help="Chunk-wise with Dask: local (a cluster here), sync (this process) or a "
            "scheduler address; none: in memory. auto: chunk-wise for OME-Zarr in or out"
        ),
    ] = "auto",
    workers: Annotated[
        int | None, typer.Option(min=1, help="--scheduler local: workers (default one per GPU)")
    ] = None,
    block: Annotated[int, typer.Option(min=64, help="Chunk-wise: block side (px)")] = 2048,
    ctirf_dtype: CtirfDtypeOpt = "float32",
    ctirf_scale: CtirfScaleOpt = None,
) -> None:
    """Restore an EPI file to cTIRF offline; metadata kept, model recorded."""
    from ctirf_live.inference.dask_process import ModelSpec, choose_scheduler, process_chunked
    from ctirf_live.inference.encoding import check_dtype
    from ctirf_live.inference.process import process_file
    from ctirf_live.inference.restorer import Restorer
    from ctirf_live.models.etnet import load_model

    wanted = [c.strip() for c in channels.split(",") if c.strip()]
    # loaded first, so a broken or unknown model is named before the input is looked at
    net, net_meta = load_model(model, "cpu")
    where = choose_scheduler(source, output, scheduler)
    if where is not None and check_dtype(ctirf_dtype) != "float32":
        raise ValueError(
            f"--ctirf-dtype {ctirf_dtype} is not available for chunk-wise (OME-Zarr) "
            "processing yet; keep float32 or write OME-TIFF (-o NAME.ome.tiff) as uint16"
        )
    if where is not None:
        spec = ModelSpec(model, device=device, tile=tile, threads=threads)
        report, update = _progress(f"cTIRF on {where}", unit="blocks")
        with report:
            path, warnings = process_chunked(
                source, output, spec, scheduler=where, channels=wanted, overwrite=overwrite,
                block=block, workers=workers, progress=update,
            )  # fmt: skip
        for w in warnings:
            err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
        console.print(f"saved {path} (model {model}, chunk-wise)", highlight=False)
        return
    with _torch_threads(threads):
        restorer = Restorer(net, device=device, tile=tile, backend=backend, metadata=net_meta)
        report, update = _progress("cTIRF", unit="planes" if restorer.dims == 2 else "stacks")
        with report:
            path, warnings = process_file(
                source,
                output,
                restorer,
                update,
                channels=wanted,
                overwrite=overwrite,
                ctirf_dtype=ctirf_dtype,
                ctirf_scale=ctirf_scale,
            )
    for w in warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"saved {path} (model {restorer.metadata.get('path', model)}, {restorer.device})")


VARIANT_HELP = "Backbone size: S0, S1, S2, L (EfficientFormerV2 sizes) or tiny (tests)"
RUN_DIR_HELP = "Model folder: best.safetensors, last.safetensors, metrics.jsonl"
CROP_HELP = "Training crop (px); default 512, or the frame size when smaller"
RESUME_HELP = "Continue the run already in the output folder, if any"

# options shared by several commands, spelled once
ResumeOption = Annotated[bool, typer.Option(help=RESUME_HELP)]
KeepResumeOption = Annotated[
    bool, typer.Option(help="Keep resume.state (~80 MB for S0) after the run completes")
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps")]
BackendOption = Annotated[
    str,
    typer.Option(
        metavar="auto|torch|onnx",
        help="model backend: auto (ONNX Runtime on the CPU when installed), torch, onnx",
    ),
]
VariantOption = Annotated[str, typer.Option(help=VARIANT_HELP)]
CropOption = Annotated[int | None, typer.Option(min=32, help=CROP_HELP)]
EpochsOption = Annotated[int | None, typer.Option(min=1, help="Epochs (default 200)")]
TargetCeilingOption = Annotated[
    float | None,
    typer.Option(
        min=0,
        help="Clip normalised TIRF targets at this value (1: the paper's Eq. 1; 0: no clip). "
        "Default: no clip for train, the base model's for finetune",
    ),
]


def _with_target_ceiling(settings: Any, ceiling: float | None) -> Any:
    """`settings` with the user's --target-ceiling (0 means no clip); unchanged without it."""
    if ceiling is None:
        return settings
    return settings.model_copy(update={"target_ceiling": ceiling or None})


def _training_settings(
    base: Any,
    epochs: int | None,
    crop: int | None,
    batch_size: int | None,
    seed: int,
    frame_side: int,
) -> Any:
    """`base` TrainSettings with the options the user gave (crop fitted to the frames)."""
    changes: dict[str, Any] = {"seed": seed}
    if epochs is not None:
        changes["epochs"] = epochs
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if crop is None and frame_side < 32:
        raise ValueError(f"frames of {frame_side} px are too small to train on (at least 32 px)")
    changes["crop"] = crop if crop is not None else min(base.crop, frame_side // 32 * 32)
    return type(base)(**{**base.model_dump(exclude_unset=True), **changes})


def _record_consistency(result: Any) -> None:
    """Say what the run's consistency monitor was calibrated on (the trainer stores it)."""
    calibration = getattr(result, "consistency", None) or {}
    if not calibration:
        return
    console.print(
        f"consistency monitor calibrated on {calibration['frames']} frames "
        f"({calibration.get('source', 'validation')})",
        highlight=False,
        soft_wrap=True,
    )


def _report_training(result: Any) -> None:
    """Print where the best checkpoint is and its validation metrics (the run's notes, e.g.
    "PSF switched", were printed by the trainer when they arose)."""
    best = [h for h in result.history if h.get("best")]
    if not best:
        console.print(f"no epoch finished; run folder {result.last_path.parent}", soft_wrap=True)
        return
    h = best[-1]
    if h.get("val_loss") is not None:
        scores = f"val loss {h['val_loss']:.4f}, val MS-SSIM {h['val_ms_ssim']:.3f}"
    else:
        scores = f"train loss {h['train_loss']:.4f} (no validation fields)"
    console.print(
        f"best checkpoint: {result.best_path} (epoch {h['epoch']}/{len(result.history)}: {scores})",
        highlight=False,
        soft_wrap=True,
    )


@app.command("train", cls=FlagCommand)
@user_errors
def train_command(
    out: Annotated[Path, typer.Option("--out", "-o", help=RUN_DIR_HELP)],
    data: Annotated[Path | None, typer.Option(help="Paired dataset folder (calibrate)")] = None,
    synthetic: Annotated[
        int | None, typer.Option(min=1, help="Train on N pairs from the simulated microscope")
    ] = None,
    variant: VariantOption = "S0",
    epochs: EpochsOption = None,
    crop: CropOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size (default 4)")] = None,
    objective: Annotated[
        str | None, typer.Option(help="Objective of the --synthetic pairs (60X or 100X)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, split and initialisation")] = 0,
    baseline: Annotated[
        bool, typer.Option(help="Ablation: no self-supervised (reconstructed EPI) branch")
    ] = False,
    variance_scaling: Annotated[
        str,
        typer.Option(
            help="How TIRF variance damps out-of-focus pairs: weight (loss weight), "
            "target (multiply the target, the paper's wording) or none"
        ),
    ] = "weight",
    families: Annotated[
        str,
        typer.Option(
            help="--synthetic: specimen families, comma-separated (factin,membrane,tissue)"
        ),
    ] = "factin,membrane,tissue",
    attn_up_eighth: Annotated[
        bool,
        typer.Option(help="Attention upsampling at 1/16 -> 1/8 too (EViT-UNet reference)"),
    ] = True,
    target_ceiling: TargetCeilingOption = None,
    resume: ResumeOption = True,
    keep_resume: KeepResumeOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Train ET2dNet from scratch on paired EPI/TIRF frames (safe to interrupt and rerun)."""
    from ctirf_live.config import TrainSettings
    from ctirf_live.data.loaders import PairSource, check_crop, split_by_field
    from ctirf_live.models.etnet import ET2dNet
    from ctirf_live.training.trainer import seed_everything, train

    if (data is None) == (synthetic is None):
        raise ValueError("give exactly one of --data DIR or --synthetic N")
    _check_variant(variant)
    seed_everything(seed)
    if data is not None:
        source = PairSource.from_dataset(data)
        if objective is not None and objective != source.optics.objective:
            raise ValueError(
                f"{data} holds {source.optics.objective} pairs, not {objective}; drop --objective"
            )
    else:
        roi = max(256, crop or TrainSettings().crop)
        names = _family_names(families)
        source = PairSource.synthetic(
            synthetic or 0, objective or "60X", seed=seed, roi=roi, families=names
        )
    if variance_scaling not in ("weight", "target", "none"):
        raise ValueError(
            f"--variance-scaling must be weight, target or none, got {variance_scaling!r}"
        )
    settings = _training_settings(
        TrainSettings(variance_scaling=variance_scaling),
        epochs,
        crop,
        batch_size,
        seed,
        min(source.shape),
    )
    settings = _with_target_ceiling(settings, target_ceiling)
    check_crop(source, settings.crop)
    train_source, val_source = split_by_field(source, settings.val_fraction, seed)
    model = ET2dNet(source.optics, variant, attn_up_eighth=attn_up_eighth)
    console.print(
        f"training ET2dNet-{variant} on {source.description}: {len(train_source)} train / "
        f"{len(val_source)} validation pairs, {settings.crop} px crops, {settings.epochs} epochs",
        highlight=False,
        soft_wrap=True,
    )
    result = train(
        model,
        train_source,
        val_source,
        settings,
        out,
        device=device,
        baseline=baseline,
        resume=resume,
        keep_resume=keep_resume,
    )
    _report_training(result)
    _record_consistency(result)


def _stack_files(stacks: Path) -> list[Path]:
    """The OME-TIFF files and OME-Zarr stores in a folder (or the one given); in a run
    folder of `ctirf acquire` the raw store, not the cTIRF one beside it."""
    from ctirf_live.inference.rawstore import is_zarr
    from ctirf_live.inference.writers import RESULT_STEM

    if not stacks.is_dir() or is_zarr(stacks):
        return [stacks]
    found = [*stacks.glob("*.tif*"), *(p for p in stacks.glob("*.zarr") if is_zarr(p))]
    files = sorted(p for p in found if not p.name.startswith(f"{RESULT_STEM}."))
    if not files:
        raise ValueError(
            f"{stacks} holds no OME-TIFF or OME-Zarr stacks; record some with ctirf acquire "
            "or ctirf calibrate --stacks"
        )
    return files


def _read_stack_file(path: Path) -> list[tuple[Any, Any]]:
    """Every image of an OME-TIFF (as `data.stacks`) or OME-Zarr store (every position)."""
    from ctirf_live.data.stacks import read_tiff_images
    from ctirf_live.inference.rawstore import is_zarr

    if not is_zarr(Path(path)):
        return read_tiff_images(path)
    from ctirf_live.inference.dask_process import read_chunked

    return [(series.data, series.info) for series in read_chunked(path)]


@app.command(cls=FlagCommand)
@user_errors
def distill(
    teacher: Annotated[
        str, typer.Option(help="ET2dNet teacher: checkpoint, model folder or shipped name")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help=RUN_DIR_HELP)],
    stacks: Annotated[
        Path | None,
        typer.Option(
            help="EPI z-stacks: a ctirf calibrate --stacks dataset, or a folder (or file) of "
            "OME-TIFF stacks, e.g. from ctirf acquire"
        ),
    ] = None,
    synthetic: Annotated[
        int | None, typer.Option(min=2, help="Distil on N simulated stacks instead")
    ] = None,
    planes: Annotated[int, typer.Option(min=2, help="Planes per stack (the paper's 6)")] = 6,
    z_step: Annotated[
        float, typer.Option("--z-step", min=0.01, help="--synthetic: plane spacing (um)")
    ] = 0.2,
    size: Annotated[int, typer.Option(min=32, help="--synthetic: frame side (px)")] = 384,
    objective: Annotated[str, typer.Option(help="--synthetic: simulated objective")] = "60X",
    families: Annotated[
        str, typer.Option(help="--synthetic: specimen families, comma-separated")
    ] = "factin,membrane,tissue",
    variant: VariantOption = "S0",
    psf_model: Annotated[
        str,
        typer.Option(
            "--psf-model",
            help="3D PSF of the physics term: gibson_lanni (emitter on the coverslip), "
            "gibson_lanni_water (emitter 1 um into the sample: focal shift, depth "
            "aberration) or born_wolf",
            case_sensitive=False,
        ),
    ] = "gibson_lanni",
    axial_prior: Annotated[
        float,
        typer.Option(
            "--axial-prior",
            min=0,
            help="Weight of the missing-cone prior against plane-to-plane ringing "
            "(LossWeights.axial_coarse; 0: off)",
        ),
    ] = DISTILL_AXIAL_PRIOR,
    init_student: Annotated[
        Path | None,
        typer.Option(help="Continue this ET3dNet checkpoint instead of a fresh student"),
    ] = None,
    inflate: Annotated[
        bool,
        typer.Option(
            "--inflate/--no-inflate",
            help="Start the student as the teacher run plane by plane (its 2D kernels "
            "inflated to 3D); --variant must be the teacher's",
        ),
    ] = False,
    lr: Annotated[
        float | None,
        typer.Option(min=1e-7, help="Peak learning rate (default the paper's 5e-4)"),
    ] = None,
    epochs: EpochsOption = None,
    crop: CropOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size (default 2)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, split and initialisation")] = 0,
    resume: ResumeOption = True,
    keep_resume: KeepResumeOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Train ET3dNet on EPI z-stacks from a frozen ET2dNet teacher (paper Section 2.3)."""
    from ctirf_live.data.stacks import stacks_from_dataset, stacks_from_files, synthetic_stacks
    from ctirf_live.training.distill import distill as run_distill
    from ctirf_live.training.distill import distill_settings
    from ctirf_live.training.trainer import seed_everything

    if (stacks is None) == (synthetic is None):
        raise ValueError("give exactly one of --stacks DIR or --synthetic N")
    _check_variant(variant)
    seed_everything(seed)
    if stacks is not None:
        if (stacks / "manifest.json").is_file():  # a `ctirf calibrate --stacks` dataset
            data = stacks_from_dataset(stacks, planes)
        else:
            data = stacks_from_files(_stack_files(stacks), planes, reader=_read_stack_file)
    else:
        names = _family_names(families)
        bar, update = _progress(f"simulating {synthetic} stacks of {planes} planes", "stacks")
        with bar:
            data = synthetic_stacks(
                synthetic or 0,
                objective,
                seed,
                size,
                planes,
                z_step,
                families=names,
                progress=update,
            )
    base = distill_settings(seed=seed)
    if batch_size is None:
        batch_size = base.batch_size
    settings = _training_settings(base, epochs, crop, batch_size, seed, _stack_side(data))
    loss = settings.loss.model_copy(update={"axial_coarse": axial_prior})
    settings = settings.model_copy(update={"loss": loss, **({"lr": lr} if lr else {})})
    n_val = max(1, round(settings.val_fraction * len(data))) if len(data) > 1 else 0
    train_idx, val_idx = list(range(len(data) - n_val)), list(range(len(data) - n_val, len(data)))
    console.print(
        f"distilling ET3dNet-{variant} from {teacher} on {data.description}: "
        f"{len(train_idx)} train / {len(val_idx)} validation stacks of {data.planes} planes, "
        f"{settings.crop} px crops, {settings.epochs} epochs",
        highlight=False,
        soft_wrap=True,
    )
    result = run_distill(
        teacher,
        data.subset(train_idx),
        data.subset(val_idx) if val_idx else None,
        settings,
        out,
        variant=variant,
        psf_model=psf_model.lower(),
        device=device,
        resume=resume,
        keep_resume=keep_resume,
        init_student=init_student,
        inflate=inflate,
    )
    _report_training(result)


def _check_variant(variant: str) -> None:
    """One line naming the backbone sizes when `variant` is not one of them."""
    from ctirf_live.models.evit_unet import VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _family_names(families: str) -> list[str]:
    """`factin, membrane` -> ["factin", "membrane"] (checked where the pairs are made)."""
    return [f.strip() for f in families.split(",") if f.strip()]


def _stack_side(data: Any) -> int:
    """Smallest Y/X side of a stack set."""
    return min(min(s.epi.shape[-2:]) for s in data.stacks)


@app.command(cls=FlagCommand)
@user_errors
def finetune(
    data: Annotated[Path, typer.Option(help="Paired dataset folder (ctirf calibrate)")],
    from_: Annotated[
        str,
        typer.Option(
            "--model", "-m", "--from", help="Model to start from: name, run folder or file"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help=RUN_DIR_HELP)],
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (default 20)")] = None,
    crop: CropOption = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size (default 4)")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data and split")] = 0,
    baseline: Annotated[
        bool, typer.Option(help="Ablation: no self-supervised (reconstructed EPI) branch")
    ] = False,
    target_ceiling: TargetCeilingOption = None,
    resume: ResumeOption = True,
    keep_resume: KeepResumeOption = False,
    device: DeviceOption = "auto",
) -> None:
    """Fine-tune a trained model to a microscope's pairs; the PSF follows the data's optics."""
    from ctirf_live.data.loaders import PairSource, check_crop
    from ctirf_live.training.trainer import finetune as run_finetune
    from ctirf_live.training.trainer import finetune_settings, seed_everything

    seed_everything(seed)
    source = PairSource.from_dataset(data)
    settings = _training_settings(
        finetune_settings(), epochs, crop, batch_size, seed, min(source.shape)
    )
    settings = _with_target_ceiling(settings, target_ceiling)
    check_crop(source, settings.crop)
    console.print(
        f"fine-tuning {from_} on {source.description} ({len(source)} pairs, "
        f"{settings.crop} px crops, {settings.epochs} epochs)",
        highlight=False,
        soft_wrap=True,
    )
    result = run_finetune(
        from_,
        source,
        settings,
        out,
        device=device,
        baseline=baseline,
        resume=resume,
        keep_resume=keep_resume,
    )
    _report_training(result)
    _record_consistency(result)


@app.command(cls=FlagCommand)
@user_errors
def models(
    directory: Annotated[
        list[Path] | None,
        typer.Option("--dir", help="Also list checkpoints in this folder and its subfolders"),
    ] = None,
) -> None:
    """List shipped and local checkpoints with their optics, by the name `-m` takes:
    a training run folder stands for its best checkpoint."""
    from rich.table import Table

    from ctirf_live.models.checkpoint import WEIGHTS_DIR, list_checkpoints, run_folder_of

    folders: list[Path] = []
    for d in directory or []:
        if not d.is_dir():
            raise FileNotFoundError(f"no such folder: {d}")
        folders += [d, *sorted(p for p in d.iterdir() if p.is_dir())]
    found = list_checkpoints(folders)
    run_folders = {run_folder_of(i.path) for i in found} - {None}
    found = [
        i for i in found if not (i.path.name == "last.safetensors" and i.path.parent in run_folders)
    ]
    if not found:
        console.print(f"no checkpoints found (shipped weights live in {WEIGHTS_DIR})")
        return
    table = Table(title="checkpoints")
    table.add_column("model", overflow="fold")
    for column in ("architecture", "objective", "NA", "pixel (nm)", "created"):
        table.add_column(column, no_wrap=True)
    for info in found:
        table.add_row(
            f"{info.name} (shipped)"
            if info.shipped
            else str(run_folder_of(info.path) or info.path),
            info.architecture,
            info.objective or "-",
            f"{info.na:g}" if info.na is not None else "-",
            f"{info.pixel_size_um * 1000:g}" if info.pixel_size_um is not None else "-",
            (info.created or "-")[:16].replace("T", " "),
        )
    console.print(table)


@app.command(cls=FlagCommand)
@user_errors
def acquire(
    config: ConfigOpt,
    sequence: Annotated[
        Path, typer.Option("--sequence", "-s", help="useq MDA sequence (YAML/JSON)")
    ],
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint path or shipped name")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (raw, ctirf, summary)")],
    objective: ObjectiveOpt = None,
    policy: PolicyOpt = "record",
    fmt: Annotated[
        str, typer.Option("--format", metavar="ome-tiff|ome-zarr", help="Store format (any case)")
    ] = "ome-tiff",
    device: DeviceOption = "auto",
    backend: BackendOption = "auto",
    channels: Annotated[str, typer.Option(help="Presets to process, comma-separated")] = "EPI",
    tile: TileOpt = 512,
    threads: LiveThreadsOpt = None,
    queue_size: Annotated[int, typer.Option("--queue-size", help="Frames held in memory")] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs in --out")] = False,
    ctirf_dtype: CtirfDtypeOpt = "float32",
    ctirf_scale: CtirfScaleOpt = None,
    coverslip_z: Annotated[
        float | None,
        typer.Option(
            "--coverslip-z",
            help="Stage focus (um) of the coverslip; frames focused farther than the "
            "depth of field are flagged [default: the focus when the run starts]",
        ),
    ] = None,
) -> None:
    """Run an MDA with live cTIRF: raw and cTIRF stores plus summary.json (Ctrl-C stops)."""
    from rich.table import Table

    from ctirf_live.acquisition.core import check_rig, open_core
    from ctirf_live.acquisition.limits import stage_limits
    from ctirf_live.acquisition.objective import check_model_optics, select_objective
    from ctirf_live.inference.acquire import acquire as run_acquire
    from ctirf_live.inference.acquire import load_sequence, report_progress, resolve_device
    from ctirf_live.inference.backlog import POLICIES
    from ctirf_live.inference.restorer import Restorer
    from ctirf_live.inference.writers import check_format

    policy, fmt = policy.lower(), fmt.lower()
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use record or preview")
    check_format(fmt)
    seq = load_sequence(sequence)
    device, warning = resolve_device(device)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    restorer = Restorer(model, device=device, tile=tile, backend=backend)
    report, _ = _progress("acquiring", unit="frames")
    with _torch_threads(threads), open_core(config) as core:
        rig = check_rig(core, config)
        optics = select_objective(core, rig, objective)
        check_model_optics(restorer.optics, optics, rig)

        with report:
            result = run_acquire(
                core,
                seq,
                restorer,
                out,
                optics=optics,
                policy=policy,
                fmt=fmt,  # type: ignore[arg-type]
                channels=tuple(c.strip() for c in channels.split(",") if c.strip()),
                queue_size=queue_size,
                overwrite=overwrite,
                progress=report_progress(report),
                limits=stage_limits(core, config),
                threads=threads,
                ctirf_dtype=ctirf_dtype,
                ctirf_scale=ctirf_scale,
                focus_reference_um=coverslip_z,
            )
    for w in result.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    for e in result.errors:
        err_console.print(f"[red]processing error:[/] {e}", highlight=False)
    s = result.stats
    table = Table(title="live cTIRF", show_header=False)
    table.add_row(
        "frames",
        f"{result.frames_acquired} / {result.frames_expected} acquired, "
        f"{result.raw_frames_saved} raw saved",
    )
    table.add_row(
        "processed",
        f"{s.processed} (skipped {s.skipped}, errors {s.errors}, "
        f"other channels {s.ignored}, spilled {s.spilled})",
    )
    table.add_row("latency", f"p50 {s.latency_p50_ms:.0f} ms, p95 {s.latency_p95_ms:.0f} ms")
    table.add_row("throughput", f"{s.processed_fps:.1f} frames/s on {restorer.device}")
    table.add_row("acquisition", f"{result.acquisition_s:.1f} s (total {result.total_s:.1f} s)")
    table.add_row("raw", str(result.raw_path))
    table.add_row(
        "cTIRF",
        f"{result.ctirf_path} ({result.ctirf_planes_saved} of "
        f"{result.ctirf_planes} planes processed)",
    )
    table.add_row("summary", str(result.summary_path))
    if result.consistency.get("flagged") is not None:
        c = result.consistency
        table.add_row("consistency", f"{c['flagged']} of {c['frames']} planes flagged")
    console.print(table)
    if result.advice:
        err_console.print(f"[yellow]{result.advice}[/]", highlight=False, soft_wrap=True)
    if result.unprocessed:
        err_console.print(
            f"[yellow]warning:[/] {result.unprocessed} queued frame(s) were not "
            "processed (the raw store has them; `ctirf process` can do them)"
        )
    if result.canceled:
        err_console.print("[yellow]canceled[/]: frames acquired so far are saved")
        raise typer.Exit(130)


@app.command(cls=FlagCommand)
@user_errors
def repair(
    path: Annotated[Path, typer.Argument(help="Raw OME-TIFF, folder of them, or a run folder")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Repaired file (default: *.repaired.ome.tiff)"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing repaired file")] = False,
) -> None:
    """Rebuild a readable raw OME-TIFF after a crash (the original is left untouched)."""
    from ctirf_live.inference.rawstore import repair_path

    for line in repair_path(path, out, overwrite=overwrite):
        console.print(line, highlight=False, soft_wrap=True)


def _qt_display_problem() -> str | None:
    """Why a Qt window cannot open here (checked first: Qt aborts the process otherwise)."""
    import sys

    platform = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0]
    if platform in ("offscreen", "minimal", "vnc", "eglfs", "linuxfb"):
        return None
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return (
            "no display for the live window; set QT_QPA_PLATFORM=offscreen (or run on a "
            "desktop), or use `ctirf acquire` for headless acquisition"
        )
    return None


@app.command(cls=FlagCommand)
@user_errors
def live(
    config: ConfigOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint path or shipped name")],
    policy: PolicyOpt = "preview",
    device: DeviceOption = "auto",
    backend: BackendOption = "auto",
    tile: TileOpt = 512,
    threads: LiveThreadsOpt = None,
    sequence: Annotated[
        Path | None, typer.Option("--sequence", "-s", help="useq sequence for Run MDA")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Save each MDA's raw + cTIRF here")
    ] = None,
    objective: ObjectiveOpt = None,
) -> None:
    """Open the live window: raw EPI and cTIRF side by side while imaging."""
    from ctirf_live.inference.acquire import resolve_device
    from ctirf_live.inference.backlog import POLICIES

    policy = policy.lower()
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; use preview or record")
    problem = _qt_display_problem()
    if problem:
        raise ValueError(problem)
    try:
        from ctirf_live.gui.live_window import run_live_window
    except ImportError as exc:
        raise ValueError(
            f"the live window needs Qt ({exc}); install it with pip install 'ctirf-live[gui]'"
        ) from None
    device, warning = resolve_device(device)
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    with _torch_threads(threads):
        code = run_live_window(
            config,
            model,
            policy,
            device=device,
            sequence_path=sequence,
            output_dir=out,
            objective=objective,
            tile=tile,
            backend=backend,
            threads=threads,
        )
    if code:
        raise typer.Exit(code)


SIMULATED_OBJECTIVES = ("60X", "100X")


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Limit torch's CPU threads for a block (small tensor ops are faster on one);
    None keeps torch's default."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(label: str, unit: str = "") -> Any:
    """A progress report on stderr (a rich bar on a terminal, timestamped lines otherwise)
    and its `(done, total)` callback."""
    from ctirf_live.progress import ProgressReport

    report = ProgressReport(label, unit=unit, console=err_console)
    return report, report.update


def _evaluation_source(
    data: Path | None,
    synthetic: int | None,
    objective: str | None,
    size: int,
    seed: int,
    families: str = "factin",
) -> Any:
    """Pairs from a dataset folder or the simulated microscope (`objective` checked)."""
    from ctirf_live.data.loaders import PairSource

    if (data is None) == (synthetic is None):
        raise ValueError("give exactly one of --data DIR or --synthetic N")
    if data is not None:
        source = PairSource.from_dataset(data)
        if objective is not None and objective != source.optics.objective:
            raise ValueError(
                f"{data} holds {source.optics.objective} pairs, not {objective}; drop --objective"
            )
        return source
    if objective not in SIMULATED_OBJECTIVES:
        raise ValueError(f"the simulator has objectives {', '.join(SIMULATED_OBJECTIVES)}")
    bar, update = _progress("rendering pairs", unit="pairs")
    with bar:
        return PairSource.synthetic(
            synthetic or 0,
            objective,
            seed=seed,
            roi=size,
            progress=update,
            families=[f.strip() for f in families.split(",") if f.strip()],
        )


def _evaluate_adaptation(
    model: str,
    baseline_model: str | None,
    source: Any,
    val_fraction: float,
    epochs: int,
    out: Path,
    seed: int,
    device: str,
) -> None:
    from rich.table import Table

    from ctirf_live.data.loaders import split_by_field
    from ctirf_live.evaluation.adaptation import adaptation_experiment

    train_source, val_source = split_by_field(source, val_fraction, seed)
    if len(val_source) == 0 or len(train_source) == 0:
        raise ValueError(
            f"{source.description}: {len(source)} pairs cannot be split into training and "
            "held-out fields; use more pairs or another --val-fraction"
        )
    console.print(
        f"adaptation to {source.optics.objective}: {len(train_source)} training / "
        f"{len(val_source)} held-out pairs, {epochs} epochs, hybrid and baseline",
        highlight=False,
        soft_wrap=True,
    )

    def report(arm: str, entry: dict[str, Any]) -> None:
        console.print(
            f"{arm:>8} epoch {entry['epoch']:>3}: MS-SSIM {entry['ms_ssim_mean']:.3f} ± "
            f"{entry['ms_ssim_sd']:.3f}",
            highlight=False,
        )

    result = adaptation_experiment(
        model,
        train_source,
        val_source,
        epochs,
        out,
        baseline_checkpoint=baseline_model,
        seed=seed,
        device=device,
        on_epoch=report,
    )
    table = Table(title=f"MS-SSIM to {result['reference_label']} ({result['val_pairs']} pairs)")
    for column in ("model", "before", "after", "best (epoch)"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for arm, curve in result["curves"].items():
        table.add_row(
            arm,
            f"{curve['initial']:.3f}",
            f"{curve['final']:.3f}",
            f"{curve['best']:.3f} ({curve['best_epoch']})",
        )
    console.print(table)
    console.print(f"wrote {out / 'adaptation.json'} and {out / 'adaptation.png'}", soft_wrap=True)


@app.command(cls=FlagCommand)
@user_errors
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="checkpoint, run folder or name")],
    data: Annotated[Path | None, typer.Option(help="Paired dataset folder (calibrate)")] = None,
    synthetic: Annotated[
        int | None,
        typer.Option(min=1, help="N simulated pairs (--adaptation: N to train, N held out)"),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report")] = Path(
        "evaluation"
    ),
    objective: Annotated[
        str | None,
        typer.Option(help="Simulated objective (60X, 100X); default the model's (100X to adapt)"),
    ] = None,
    baselines: Annotated[
        str, typer.Option(help="Comma-separated: rl, wbns, rolling_ball, bf (or none)")
    ] = "rl,wbns,rolling_ball,bf",
    axial: Annotated[
        bool | None,
        typer.Option(
            "--axial/--no-axial",
            help="Axial resolution on a z-stack (default: with --stack or --synthetic)",
        ),
    ] = None,
    stack: Annotated[Path | None, typer.Option(help="EPI z-stack OME-TIFF for --axial")] = None,
    planes: Annotated[
        int, typer.Option(help="Planes of the simulated z-stack (the paper's 201 at 100 nm)")
    ] = 201,
    z_step: Annotated[
        float | None, typer.Option("--z-step", help="Z step (um): simulated 0.1, or the file's")
    ] = None,
    size: Annotated[int, typer.Option(help="Frame side (px) of simulated pairs and z-stack")] = 256,
    adaptation: Annotated[
        bool, typer.Option(help="Fine-tune hybrid vs baseline, MS-SSIM per epoch (Fig. 2d)")
    ] = False,
    sectioning: Annotated[
        bool,
        typer.Option(
            "--sectioning",
            help="Filament survival at z = 0, 0.2, 0.5, 1, 2 um in a simulated cell (vs TIRF)",
        ),
    ] = False,
    families: Annotated[
        str,
        typer.Option(help="Simulated specimen families, comma-separated: factin, membrane, tissue"),
    ] = "factin",
    epochs: Annotated[int, typer.Option(min=1, help="Epochs for --adaptation")] = 20,
    baseline_model: Annotated[
        str | None,
        typer.Option(help="--adaptation: baseline starts from this checkpoint (default --model)"),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="--adaptation: fraction of fields held out for scoring")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed for simulated data and splits")] = 0,
    device: DeviceOption = "auto",
    threads: Annotated[
        int,
        typer.Option(min=1, help="torch CPU threads (more may speed up CPU training)"),
    ] = 1,
) -> None:
    """Score cTIRF against raw EPI and classical baselines (MS-SSIM, PSNR), draw a
    comparison figure and measure axial resolution on a z-stack (evaluation.json/.csv,
    comparison.png, axial.json, axial_xz.png); with --adaptation, fine-tune the hybrid and
    the baseline model and record MS-SSIM per epoch (adaptation.json/.png)."""
    import numpy as np

    from ctirf_live.evaluation.axial import STACK_PLANE_STEP_UM, simulated_stack
    from ctirf_live.evaluation.report import hold_out_trained
    from ctirf_live.inference.restorer import Restorer, pixel_size_warning
    from ctirf_live.training.trainer import resolve_model_path

    with _torch_threads(threads):
        restorer = Restorer(resolve_model_path(model), device=device)
        model_objective = restorer.optics.objective
        if objective is None and synthetic is not None:
            objective = model_objective if model_objective in SIMULATED_OBJECTIVES else "60X"
            if adaptation:
                objective = "100X" if objective == "60X" else "60X"
        if sectioning:
            _evaluate_sectioning(restorer, _baseline_names(baselines), out, seed)
            if data is None and synthetic is None:
                return
        if axial is None:
            axial = stack is not None or synthetic is not None
        axial = axial and not adaptation
        sim_objective = objective or model_objective
        pixel = restorer.optics.pixel_size_um
        loaded = _axial_input(stack, z_step, planes, sim_objective, pixel) if axial else None
        names = _baseline_names(baselines)
        if adaptation and synthetic is not None:
            synthetic *= 2  # N pairs to train on and N held out
        source = _evaluation_source(data, synthetic, objective, size, seed, families)
        out.mkdir(parents=True, exist_ok=True)
        if adaptation:
            _evaluate_adaptation(
                model, baseline_model, source, val_fraction, epochs, out, seed, device
            )
            return
        if warning := pixel_size_warning(restorer.optics, source.optics.pixel_size_um):
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        source, note = hold_out_trained(source, restorer.metadata)
        if note:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
        _evaluate_pairs(restorer, source, names, out)
        if not axial:
            if stack is None and data is not None:
                console.print("axial resolution: pass --stack FILE (an EPI z-stack) or --axial")
            return
        if loaded is None:
            step = z_step or 0.1
            bar, update = _progress(f"simulating {planes}-plane stack")
            truth = np.empty((planes, size, size), np.float32)
            with bar:
                epi, optics = simulated_stack(
                    planes, step, size, seed, sim_objective, progress=update, truth=truth
                )
            origin = (
                f"simulated ({sim_objective}, seed {seed}, {planes} x {size} x {size} px, "
                f"specimen planes every {STACK_PLANE_STEP_UM:g} um)"
            )
            loaded = (epi, optics.pixel_size_um, step, origin)
            _evaluate_axial(restorer, *loaded, out, truth=truth)
            return
        _evaluate_axial(restorer, *loaded, out)


def _baseline_names(baselines: str) -> list[str]:
    """`rl,wbns` -> ["rl", "wbns"]; `none` -> []; unknown names refused."""
    from ctirf_live.evaluation.baselines import BASELINES

    names = [b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(
            f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)} or none"
        )
    return names


def _axial_input(
    stack: Path | None, z_step: float | None, planes: int, objective: str, model_pixel: float
) -> tuple[Any, float, float, str] | None:
    """Check the axial input before any work: the file's stack (EPI, pixel size, z step,
    origin), or None when a simulated stack of `planes` planes will do. A file without a
    pixel size is taken to have the model's (kc does not depend on it)."""
    from ctirf_live.evaluation.axial import check_planes, read_stack

    if stack is None:
        check_planes(planes)
        if objective not in SIMULATED_OBJECTIVES:
            raise ValueError(
                f"the simulator has objectives {', '.join(SIMULATED_OBJECTIVES)}, not "
                f"{objective}; pass --stack FILE or --objective"
            )
        return None
    epi, pixel, step = read_stack(stack, z_step)
    check_planes(epi.shape[0])
    if pixel is None:
        err_console.print(
            f"[yellow]note:[/] {stack} has no pixel size; assuming the model's "
            f"{model_pixel * 1000:g} nm",
            highlight=False,
        )
    return epi, pixel or model_pixel, step, str(stack)


def _evaluate_sectioning(restorer: Any, names: list[str], out: Path, seed: int) -> None:
    """Filament survival table (sectioning.json) and its console table."""
    from rich.table import Table

    from ctirf_live.atomic import atomic_write_json
    from ctirf_live.evaluation.sectioning import evaluate_sectioning

    out.mkdir(parents=True, exist_ok=True)
    bar, update = _progress("sectioning test")
    with bar:
        result = evaluate_sectioning(restorer, names, seed=seed + 11)
        update(1, 1)
    atomic_write_json(out / "sectioning.json", result.to_dict())
    table = Table(title="filament survival (relative to the filament on the coverslip)")
    table.add_column("method")
    table.add_column("filament")
    for z in result.heights_um:
        table.add_column(f"z={z:g} um", justify="right")
    table.add_column("max |dev| vs TIRF", justify="right")
    for method, levels in result.survival.items():
        dev = "" if method == "tirf" else f"{result.deviation_from(method):.2f}"
        for level, values in levels.items():
            table.add_row(method, level, *(f"{v:.3f}" for v in values), dev)
    console.print(table)
    console.print(f"wrote {out / 'sectioning.json'}")


def _evaluate_pairs(restorer: Any, source: Any, names: list[str], out: Path) -> None:
    from ctirf_live.evaluation.report import comparison_figure, evaluate_pairs, method_outputs

    bar, update = _progress("scoring pairs")
    with bar:
        table = evaluate_pairs(restorer, source, names, progress=update)
    console.print(table.rich_table())
    table.to_json(out / "evaluation.json")
    table.to_csv(out / "evaluation.csv")
    index = table.median_pair()
    pair = source[index]
    images, _ = method_outputs(restorer, pair.epi, table.parameters)
    reference = pair.truth if table.reference == "truth" else pair.tirf
    comparison_figure(
        images["epi"],
        {k: v for k, v in images.items() if k not in ("epi", "ctirf")},
        images["ctirf"],
        reference,
        out / "comparison.png",
        pixel_size_um=source.optics.pixel_size_um,
        scores={m: table.scores[m]["ms_ssim"][index] for m in table.methods},
        tirf_label="TIRF (truth)" if table.reference == "truth" else "TIRF",
        title=f"{source.description}: pair {index + 1} of {len(source)} (median cTIRF MS-SSIM)",
    )
    console.print(
        f"wrote {out / 'evaluation.json'}, evaluation.csv and comparison.png", soft_wrap=True
    )


def _evaluate_axial(
    restorer: Any,
    epi: Any,
    pixel: float,
    step: float,
    origin: str,
    out: Path,
    truth: Any = None,
) -> None:
    import json

    from ctirf_live.evaluation.axial import axial_figure, axial_resolution, restore_stack

    bar, update = _progress("cTIRF stack")
    with bar:
        ctirf = restore_stack(restorer, epi, update)
    result = {
        "stack": origin,
        **axial_resolution(restorer, epi, pixel, step, ctirf=ctirf, truth=truth),
    }
    (out / "axial.json").write_text(json.dumps(result, indent=2) + "\n")
    axial_figure(epi, ctirf, out / "axial_xz.png", pixel, step, result=result)
    for w in result["warnings"]:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    parts = []
    for axis in ("xz", "yz"):
        e, c = result["epi"][axis]["kc"], result["ctirf"][axis]["kc"]
        ratio = result["ratio"][axis]
        parts.append(f"{axis.upper()} kc {e:.2f} -> {c:.2f} (x{ratio:.2f})" if ratio else axis)
    console.print(f"axial resolution (EPI -> cTIRF): {'; '.join(parts)}", highlight=False)
    if ideal := result.get("ideal_ratio"):
        console.print(
            "a perfect 100 nm section of this simulated stack would reach "
            + " / ".join(f"x{ideal[a]:.2f} ({a.upper()})" for a in ("xz", "yz") if ideal[a]),
            highlight=False,
        )
    console.print(f"wrote {out / 'axial.json'} and axial_xz.png", soft_wrap=True)


@app.command(cls=FlagCommand)
@user_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="folder for everything the demo makes")
    ] = Path("demo_out"),
    pairs: Annotated[int, typer.Option(help="calibration pairs to collect")] = 20,
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs")] = 8,
    model: Annotated[
        str, typer.Option("--model", "-m", help="checkpoint to fine-tune")
    ] = "et2dnet_s0_60x_sim",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
) -> None:
    """Headless demo on the simulated rig: calibrate, fine-tune, score, live time-lapse."""
    from rich.table import Table

    from ctirf_live.demo import DemoOptions, run_demo

    options = DemoOptions(out=out, pairs=pairs, epochs=epochs, model=model, device=device)
    t0 = time.perf_counter()
    report = run_demo(options, step=lambda line: console.print(line, highlight=False))
    table = Table(title="cTIRF vs noise-free TIRF, held-out simulated 100X pairs")
    for column in ("model", "MS-SSIM", "PSNR (dB)"):
        table.add_column(column)
    rows = (
        ("raw EPI", report.before["epi"]),
        ("shipped 60X model", report.before["ctirf"]),
        ("fine-tuned to 100X", report.after["ctirf"]),
    )
    for label, m in rows:
        table.add_row(
            label,
            f"{m['ms_ssim_mean']:.3f} ± {m['ms_ssim_sd']:.3f}",
            f"{m['psnr_mean']:.2f} ± {m['psnr_sd']:.2f}",
        )
    console.print(table)
    console.print(report.verdict, highlight=False)
    acq = report.acquisition
    console.print(
        f"calibration: {report.pairs} pairs ({report.rejected} fields rejected) in "
        f"{report.calibration_s:.0f} s; fine-tuning: {report.epochs} epochs in "
        f"{report.finetune_s:.0f} s -> {report.model_path}"
    )
    console.print(
        f"time-lapse: {acq['frames']}/{acq['expected']} frames acquired in "
        f"{acq['acquisition_s']:.1f} s, {acq['processed']} processed, {acq['skipped']} skipped, "
        f"latency p50 {acq['latency_p50_ms']:.0f} ms / p95 {acq['latency_p95_ms']:.0f} ms, "
        f"{acq['processed_fps']:.1f} fps; raw {acq['raw']}, cTIRF {acq['ctirf']}"
    )
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    elapsed = time.perf_counter() - t0
    console.print(f"demo finished in {elapsed:.0f} s; report {out}/demo_report.json")


app.command("export", cls=FlagCommand)(user_errors(export_command))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
