"""Headless acquisition with live cTIRF: one MDA, raw + cTIRF stores and a summary.

`acquire` runs a useq sequence (as pymmcore-widgets saves it) on a loaded core with two
outputs: pymmcore-plus's own raw sink (`DIR/raw.ome.tiff|zarr`) and a `LiveProcessor`
writing `DIR/ctirf.ome.tiff|zarr`; `DIR/summary.json` records what happened. The MDA
runs on its own thread, so Ctrl-C in the caller cancels it cleanly: pymmcore-plus closes
the raw store, the processor drops what is still queued and closes the cTIRF store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import useq

from ctirf_live import __version__
from ctirf_live.config import EPI_PRESET, ILLUMINATION_GROUP, ConfigError
from ctirf_live.data.tiff import atomic_write_json
from ctirf_live.inference.backlog import Policy
from ctirf_live.inference.live import LiveProcessor, LiveStats
from ctirf_live.inference.restorer import Restorer, pixel_size_warning
from ctirf_live.inference.writers import (
    make_result_writer,
    raw_output_path,
    result_output_path,
)

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

Progress = Callable[[LiveStats, int, int, str], None]
SUMMARY = "summary.json"
SPILL = ".spill"


@dataclass
class AcquireResult:
    """What `acquire` did and where it put it."""

    out_dir: Path
    raw_path: Path
    ctirf_path: Path
    summary_path: Path
    stats: LiveStats
    frames_expected: int
    frames_acquired: int
    canceled: bool
    acquisition_s: float
    total_s: float
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def load_sequence(path: str | Path) -> useq.MDASequence:
    """Read a useq sequence from YAML/JSON, with a one-line error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequence file not found: {path}")
    try:
        return useq.MDASequence.from_file(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"{path} is not a valid useq MDA sequence ({first}); save one from "
            "pymmcore-widgets' MDA widget or write it as useq YAML/JSON"
        ) from None


def resolve_device(device: str) -> tuple[str, str | None]:
    """(device to use, warning): CUDA requested without a usable GPU falls back to CPU."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "cpu", f"{device} requested but CUDA is not available; running on the CPU"
    return device, None


def fit_channels(sequence: useq.MDASequence, core: CMMCorePlus) -> useq.MDASequence:
    """Point channels at the rig's illumination group when their group does not exist.

    useq's default channel group is "Channel"; on a cTIRF rig the presets live in
    "Illumination". Presets that exist nowhere give a ConfigError before anything moves.
    """
    groups = set(core.getAvailableConfigGroups())
    channels = []
    for ch in sequence.channels:
        if ch.group in groups and ch.config in core.getAvailableConfigs(ch.group):
            channels.append(ch)
            continue
        if ILLUMINATION_GROUP in groups and ch.config in core.getAvailableConfigs(
            ILLUMINATION_GROUP
        ):
            channels.append(ch.model_copy(update={"group": ILLUMINATION_GROUP}))
            continue
        raise ConfigError(
            f"channel {ch.config!r} (group {ch.group!r}) does not exist on this rig; "
            f"use a preset of {ILLUMINATION_GROUP!r} such as EPI or TIRF"
        )
    if not channels:
        return sequence
    return sequence.model_copy(update={"channels": tuple(channels)})


def _check_model_fits(sequence: useq.MDASequence, restorer: Restorer) -> None:
    if restorer.dims == 3 and sequence.sizes.get("z", 0) < 2:
        raise ValueError(
            "this ET3dNet model restores z-stacks but the sequence has no z plan; "
            "add a z plan (6 planes, 0.2 um) or use an ET2dNet model"
        )


def _check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another --out or pass --overwrite")


def acquire(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    restorer: Restorer,
    out_dir: str | Path,
    *,
    policy: Policy = "record",
    fmt: str = "ome-tiff",
    channels: Sequence[str] = (EPI_PRESET,),
    queue_size: int = 4,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> AcquireResult:
    """Run `sequence` with raw + cTIRF storage; returns the result (and writes summary.json)."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    raw_path, ctirf_path = raw_output_path(out, fmt), result_output_path(out, fmt)
    _check_outputs([raw_path, raw_path.with_name("raw"), ctirf_path], overwrite)
    sequence = fit_channels(sequence, core)
    _check_model_fits(sequence, restorer)
    warnings = [w for w in [pixel_size_warning(restorer.optics, core.getPixelSizeUm())] if w]
    out.mkdir(parents=True, exist_ok=True)
    writer = make_result_writer(out, fmt, overwrite=overwrite)
    processor = LiveProcessor(
        restorer,
        policy=policy,
        channels=channels,
        queue_size=queue_size,
        result_writer=writer,
        spill_dir=out / SPILL,
    )
    processor.warm_up((core.getImageHeight(), core.getImageWidth()))
    expected = sum(1 for _ in sequence)
    report = progress or (lambda *a: None)
    canceled, acq_s, failure = False, 0.0, None
    with processor:
        try:
            acq_s, failure, canceled = _run_mda(
                core, sequence, [str(raw_path), processor], overwrite, processor, expected, report
            )
            if canceled or failure is not None:
                processor.stop(wait=False)
            else:
                _drain(processor, expected, report)
        except KeyboardInterrupt:
            canceled = True
            processor.stop(wait=False)
    stats = processor.stats
    report(stats, stats.acquired + stats.ignored, expected, "done")
    result = AcquireResult(
        out_dir=out,
        raw_path=raw_path if raw_path.exists() else raw_path.with_name("raw"),
        ctirf_path=ctirf_path,
        summary_path=out / SUMMARY,
        stats=stats,
        frames_expected=expected,
        frames_acquired=stats.acquired + stats.ignored,
        canceled=canceled,
        acquisition_s=acq_s,
        total_s=time.perf_counter() - t_start,
        warnings=warnings,
        errors=processor.reported_errors,
    )
    _write_summary(result, sequence, restorer, policy, fmt, failure)
    _remove_empty(out / SPILL)
    if failure is not None:
        raise failure
    return result


def _run_mda(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    outputs: list[Any],
    overwrite: bool,
    processor: LiveProcessor,
    expected: int,
    report: Progress,
) -> tuple[float, BaseException | None, bool]:
    """Run the MDA on a thread; Ctrl-C cancels it and waits for a clean finish."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            core.mda.run(sequence, output=outputs, overwrite=overwrite)
        except BaseException as exc:  # reported to the caller after the thread ends
            failure.append(exc)

    thread = threading.Thread(target=target, name="ctirf-acquire-mda", daemon=True)
    canceled = False
    t0 = time.perf_counter()
    thread.start()
    while thread.is_alive():
        try:
            thread.join(0.1)
            stats = processor.stats
            report(stats, stats.acquired + stats.ignored, expected, "acquiring")
        except KeyboardInterrupt:
            canceled = True
            core.mda.cancel()
    reason = getattr(core.mda.status, "finish_reason", None)
    canceled = canceled or str(reason) == "canceled"  # also when a GUI or script canceled
    return time.perf_counter() - t0, (failure[0] if failure else None), canceled


def _drain(processor: LiveProcessor, expected: int, report: Progress) -> None:
    while processor.running and not processor.wait_until_idle(timeout=0.1):
        stats = processor.stats
        report(stats, stats.acquired + stats.ignored, expected, "processing")


def _write_summary(
    result: AcquireResult,
    sequence: useq.MDASequence,
    restorer: Restorer,
    policy: str,
    fmt: str,
    failure: BaseException | None,
) -> None:
    summary = {
        "ctirf_live": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "policy": policy,
        "format": fmt,
        "raw": str(result.raw_path),
        "ctirf": str(result.ctirf_path),
        "frames_expected": result.frames_expected,
        "frames_acquired": result.frames_acquired,
        "canceled": result.canceled,
        "failed": None if failure is None else f"{type(failure).__name__}: {failure}",
        "acquisition_s": round(result.acquisition_s, 3),
        "total_s": round(result.total_s, 3),
        "stats": result.stats.to_dict(),
        "errors": result.errors,
        "warnings": result.warnings,
        "model": restorer.describe(),
        "mda_sequence": json.loads(sequence.model_dump_json(exclude_unset=True)),
    }
    atomic_write_json(result.summary_path, summary)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
