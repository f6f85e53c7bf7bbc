"""Headless acquisition with live cTIRF: one MDA, raw + cTIRF stores and a summary.

`acquire` runs a useq sequence (as pymmcore-widgets saves it) on a loaded core with two
outputs: pymmcore-plus's own raw sink (`DIR/raw.ome.tiff|zarr`) and a `LiveProcessor`
(fed by the MDA's relay thread: `acquisition.mda.run_mda`) writing
`DIR/ctirf.ome.tiff|zarr` (several positions in OME-TIFF: `DIR/raw/raw_p000.ome.tiff`
and `DIR/ctirf/ctirf_p000.ome.tiff`, ...); `DIR/summary.json` records what happened (status
`running` while the run goes on, so a killed run is recognisable). The MDA runs on its
own thread, so Ctrl-C in the caller cancels it cleanly: the caller waits for the MDA's
real end (pymmcore-plus closes the raw store), then finishes or counts the queue.
After the run the raw store is read back: the summary counts the frames really on
disk, and a missing raw frame is an error, never a silent exit 0.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import useq

from ctirf_live import __version__
from ctirf_live.acquisition.mda import run_mda
from ctirf_live.config import (
    EPI_PRESET,
    ILLUMINATION_GROUP,
    ConfigError,
    Optics,
    validation_message,
)
from ctirf_live.data.tiff import atomic_write_json
from ctirf_live.inference.backlog import Policy
from ctirf_live.inference.consistency import ConsistencyMonitor
from ctirf_live.inference.diskspace import RESERVE_BYTES, DiskBudget, DiskFullError
from ctirf_live.inference.encoding import make_encoding
from ctirf_live.inference.live import LiveProcessor, LiveStats
from ctirf_live.inference.rawstore import (
    count_raw_frames,
    enrich_raw_tiff,
    enrich_raw_zarr,
    set_tiff_resolution,
)
from ctirf_live.inference.restorer import Restorer, pixel_size_warning
from ctirf_live.inference.writers import (
    RAW_STEM,
    RESULT_STEM,
    make_result_writer,
    raw_output_path,
    result_output_path,
)

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

    from ctirf_live.acquisition.limits import StageLimits
    from ctirf_live.progress import ProgressReport

log = logging.getLogger(__name__)

Progress = Callable[[LiveStats, int, int, str], None]
SUMMARY = "summary.json"
SPILL = ".spill"


def report_progress(report: ProgressReport) -> Progress:
    """An `acquire` progress callback that moves `report`: frames acquired of planned,
    the phase as its label, and what the cTIRF worker has done."""

    def show(stats: LiveStats, frames: int, total: int, phase: str) -> None:
        report.update(
            frames,
            total,
            label=phase,
            detail=f"processed {stats.processed}, skipped {stats.skipped}, "
            f"errors {stats.errors}, queue {stats.queue_depth}",
        )

    return show


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
    raw_frames_saved: int = 0
    ctirf_planes_saved: int = 0
    ctirf_planes: int = 0
    unprocessed: int = 0
    failure: str | None = None
    consistency: dict[str, Any] = field(default_factory=dict)  # summary (+ "planes" columns)
    ctirf_encoding: dict[str, Any] = field(default_factory=dict)  # dtype, scale, clipped
    advice: str = ""  # the one line a run with many flagged frames ends with


def load_sequence(path: str | Path) -> useq.MDASequence:
    """Read a useq sequence from YAML/JSON; one-line errors that name the bad keys/fields.

    useq ignores unknown keys (`z_plna:` would silently mean "no z plan"), so every key
    of the file is checked against the model it ends up in, nested plans included.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequence file not found: {path}")
    hint = "save one from pymmcore-widgets' MDA widget or write it as useq YAML/JSON"
    try:
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        sequence = useq.MDASequence.model_validate(data)
    except Exception as exc:
        raise ValueError(f"{path} is not a valid useq MDA sequence ({_why(exc)}); {hint}") from None
    unknown = unknown_keys(data, sequence)
    if unknown:
        raise ValueError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            "(useq would ignore them); fix the spelling or remove them"
        )
    return sequence


def _why(exc: Exception) -> str:
    """A validation error as `field.path: message` (at most three), else its first line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return validation_message(exc).split(": ", 1)[1]
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def unknown_keys(data: Any, model: Any, where: str = "") -> list[str]:
    """Keys of `data` that no field of the parsed pydantic `model` took, as dotted paths."""
    from pydantic import BaseModel

    found: list[str] = []
    if isinstance(model, BaseModel) and isinstance(data, dict):
        fields = type(model).model_fields
        names = {k: k for k in fields} | {f.alias: k for k, f in fields.items() if f.alias}
        for key, value in data.items():
            if key not in names:
                found.append(f"{where}{key}")
            else:
                found += unknown_keys(value, getattr(model, names[key]), f"{where}{key}.")
    elif isinstance(data, list) and isinstance(model, list | tuple) and len(data) == len(model):
        for i, (d, m) in enumerate(zip(data, model, strict=True)):
            found += unknown_keys(d, m, f"{where[:-1]}[{i}].")
    return found


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


class AcquireError(OSError):
    """A run that lost or could not save raw frames; `result` says what was saved."""

    def __init__(self, message: str, result: AcquireResult | None = None) -> None:
        super().__init__(message)
        self.result = result


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
    limits: StageLimits | None = None,
    reserve_bytes: int = RESERVE_BYTES,
    consistency: ConsistencyMonitor | bool | None = None,
    threads: int | None = None,
    ctirf_dtype: str = "float32",
    ctirf_scale: float | None = None,
    optics: Optics | None = None,
    focus_reference_um: float | None = None,
) -> AcquireResult:
    """Run `sequence` with raw + cTIRF storage; returns the result (and writes summary.json).

    Raw frames come first: the run is refused when they cannot fit on the disk, cTIRF
    results and spill files give way when space runs low, and the MDA is stopped while
    the frames already saved are safe. Every planned position is checked against
    `limits` before anything moves. Ctrl-C cancels the MDA and waits for its real end;
    under `record` the queued frames are then processed (a second Ctrl-C drops them,
    counted in the summary). Raises AcquireError, after writing the summary, when a
    raw frame is missing from the raw store or the disk filled up. `consistency` is the
    LiveProcessor's (default: the model's own calibration); its per-frame scores go to
    the summary and beside the cTIRF store. `threads`: the model's CPU threads (default:
    cores - 1, see `LiveProcessor`). `ctirf_dtype`: float32, float16 (OME-Zarr) or
    uint16 with `ctirf_scale` counts a step (default from the camera's bit depth, see
    `encoding`); pixels clipped to the range are counted in the summary and warned about.
    `optics`: what the rig images with (`select_objective`), recorded in both stores'
    OME metadata (objective, channel modes, wavelengths); default the model's optics,
    which `check_model_optics` requires to match the rig, at the core's pixel size.
    `focus_reference_um`: the coverslip's stage focus (Z, um), against which the monitor
    checks each frame's focus (default: the focus when the run starts).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    raw_path, ctirf_path = raw_output_path(out, fmt), result_output_path(out, fmt)
    _check_outputs(
        [raw_path, raw_path.with_name(RAW_STEM), ctirf_path, ctirf_path.with_name(RESULT_STEM)],
        overwrite,
    )
    encoding = make_encoding(ctirf_dtype, ctirf_scale, bits=core.getImageBitDepth() or None)
    writer = make_result_writer(out, fmt, overwrite=overwrite, encoding=encoding)
    writer.optics = optics = optics or _model_optics(restorer, core.getPixelSizeUm())
    sequence = fit_channels(sequence, core)
    _check_model_fits(sequence, restorer)
    if limits is not None:
        limits.check_sequence(sequence)
    expected = sum(1 for _ in sequence)
    height, width = core.getImageHeight(), core.getImageWidth()
    budget = DiskBudget(out, width * height * max(core.getBytesPerPixel(), 1), expected,
                        reserve_bytes=reserve_bytes)
    n_processed = sum(1 for e in sequence if e.channel is None or e.channel.config in channels)
    warnings = budget.check_start(n_processed * width * height * writer.bytes_per_pixel)
    warnings += [w for w in [pixel_size_warning(restorer.optics, core.getPixelSizeUm())] if w]
    out.mkdir(parents=True, exist_ok=True)
    processor = LiveProcessor(
        restorer,
        policy=policy,
        channels=channels,
        queue_size=queue_size,
        result_writer=writer,
        spill_dir=out / SPILL,
        space_check=budget.allows,
        consistency=consistency,
        threads=threads,
        focus_reference_um=focus_reference_um,
    )
    budget.frames_done = lambda: processor.frames_received
    processor.warm_up((height, width))
    report = progress or (lambda *a: None)
    summary_path = out / SUMMARY
    atomic_write_json(summary_path, _running_summary(sequence, restorer, policy, fmt, raw_path))
    processor.start()
    try:
        run = _run_mda(core, sequence, [str(raw_path)], overwrite, processor,
                       expected, report, budget)
        if run.failure is None and (not run.canceled or policy == "record"):
            _drain(processor, expected, report, "finishing" if run.canceled else "processing")
    finally:
        processor.stop(wait=False)
    stats = processor.stats
    report(stats, processor.frames_received, expected, "done")
    received = processor.frames_received
    saved = count_raw_frames(raw_path if raw_path.exists() else raw_path.with_name("raw"))
    if fmt == "ome-tiff" and (note := set_tiff_resolution(
        raw_path if raw_path.exists() else raw_path.with_name("raw"), core.getPixelSizeUm()
    )):
        warnings.append(note)
    raw_store = raw_path if raw_path.exists() else raw_path.with_name("raw")
    enrich = enrich_raw_zarr if fmt == "ome-zarr" else enrich_raw_tiff
    if raw_store.exists() and (note := enrich(raw_store, optics)):
        warnings.append(note)
    if clip := writer.encoding.clip_warning():
        warnings.append(clip)
    failure = run.failure
    if failure is None and saved < received:
        failure = AcquireError(
            f"{received - saved} of {received} raw frames are missing from {raw_path.name} "
            "(disk full or write error; see the log)"
        )
    result = AcquireResult(
        out_dir=out,
        raw_path=raw_path if raw_path.exists() else raw_path.with_name("raw"),
        ctirf_path=writer.path,
        summary_path=summary_path,
        stats=stats,
        frames_expected=expected,
        frames_acquired=received,
        canceled=run.canceled,
        acquisition_s=run.seconds,
        total_s=time.perf_counter() - t_start,
        warnings=warnings,
        errors=processor.reported_errors,
        raw_frames_saved=saved,
        ctirf_planes_saved=writer.frames_written,
        ctirf_planes=writer.planes_total,
        ctirf_encoding=writer.encoding.describe(),
        unprocessed=processor.dropped_on_stop,
        failure=None if failure is None else _one_line(failure),
    )
    if processor.consistency is not None:
        result.consistency = {
            **processor.consistency.summary(),
            "planes": processor.consistency.per_frame(),
        }
        result.advice = result.consistency["advice"]
    try:
        _write_summary(result, sequence, restorer, policy, fmt)
        see = f"see {summary_path}"
    except OSError as exc:  # the disk may be full by now: say so, keep the real reason
        see = f"{summary_path.name} not updated ({exc.strerror or exc})"
        failure = failure or AcquireError(f"could not write {summary_path}")
    _remove_empty(out / SPILL)
    if failure is not None:
        raise AcquireError(
            f"{_one_line(failure)}; raw: {saved} of {expected} frames saved in "
            f"{result.raw_path}; {see}",
            result,
        ) from None
    return result


def _model_optics(restorer: Restorer, pixel_size_um: float) -> Optics:
    """The model's optics at the rig's pixel size (when Micro-Manager knows it)."""
    if pixel_size_um > 0:
        return restorer.optics.model_copy(update={"pixel_size_um": float(pixel_size_um)})
    return restorer.optics


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if isinstance(exc, OSError) and text:
        return text[0]
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@dataclass
class _Run:
    seconds: float
    failure: BaseException | None
    canceled: bool


def _run_mda(
    core: CMMCorePlus,
    sequence: useq.MDASequence,
    sinks: list[Any],
    overwrite: bool,
    processor: LiveProcessor,
    expected: int,
    report: Progress,
    budget: DiskBudget,
) -> _Run:
    """Run the MDA on a thread and return once it has really ended.

    The end is an event set after `core.mda.run` returns (raw store closed, handler
    backlog drained) and `core.mda.is_running()` turning False, never `is_alive()`,
    which a KeyboardInterrupt inside `join` can make lie (DESIGN.md). Ctrl-C and low
    disk space cancel the MDA, then the wait goes on.
    """
    failure: list[BaseException] = []
    ended = threading.Event()

    def target() -> None:
        try:
            run_mda(core, sequence, handlers=[processor], sinks=sinks, overwrite=overwrite)
        except BaseException as exc:  # reported to the caller after the run ends
            failure.append(exc)
        finally:
            ended.set()

    canceled = False
    t0 = time.perf_counter()
    threading.Thread(target=target, name="ctirf-acquire-mda", daemon=True).start()
    while not (ended.is_set() and not core.mda.is_running()):
        try:
            ended.wait(0.1)
            if not failure and budget.raw_in_danger():
                failure.append(DiskFullError(budget.stop_message()))
                core.mda.cancel()
            report(processor.stats, processor.frames_received, expected,
                   "stopping" if canceled else "acquiring")
        except KeyboardInterrupt:
            canceled = True
            core.mda.cancel()
    reason = str(getattr(core.mda.status, "finish_reason", ""))
    disk_stop = bool(failure) and isinstance(failure[0], DiskFullError)
    canceled = canceled or (reason == "canceled" and not disk_stop)  # a GUI or script canceled
    return _Run(time.perf_counter() - t0, failure[0] if failure else None, canceled)


def _drain(processor: LiveProcessor, expected: int, report: Progress, phase: str) -> None:
    """Let the worker store every queued frame; Ctrl-C here drops the rest (counted)."""
    try:
        while processor.running and not processor.wait_until_idle(timeout=0.1):
            report(processor.stats, processor.frames_received, expected, phase)
    except KeyboardInterrupt:
        log.warning("%d queued frame(s) dropped; the raw store has them", processor.pending)


def _running_summary(
    sequence: useq.MDASequence, restorer: Restorer, policy: str, fmt: str, raw_path: Path
) -> dict[str, Any]:
    """What summary.json says while the run goes on (and after a crash)."""
    return {
        "ctirf_live": __version__,
        "status": "running",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "policy": policy,
        "format": fmt,
        "raw": str(raw_path),
        "recover": "if this run was killed, run `ctirf repair` on its folder (OME-TIFF); "
        "OME-Zarr keeps every frame written",
        "model": restorer.describe(),
        "mda_sequence": json.loads(sequence.model_dump_json(exclude_unset=True)),
    }


def _write_summary(
    result: AcquireResult,
    sequence: useq.MDASequence,
    restorer: Restorer,
    policy: str,
    fmt: str,
) -> None:
    status = "failed" if result.failure else "canceled" if result.canceled else "completed"
    summary = {
        "ctirf_live": __version__,
        "status": status,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "policy": policy,
        "format": fmt,
        "raw": str(result.raw_path),
        "ctirf": str(result.ctirf_path),
        "frames_expected": result.frames_expected,
        "frames_acquired": result.frames_acquired,
        "raw_frames_saved": result.raw_frames_saved,
        "ctirf_planes_saved": result.ctirf_planes_saved,
        "ctirf_planes": result.ctirf_planes,
        "ctirf_encoding": result.ctirf_encoding,
        "unprocessed_at_stop": result.unprocessed,
        "canceled": result.canceled,
        "failed": result.failure,
        "acquisition_s": round(result.acquisition_s, 3),
        "total_s": round(result.total_s, 3),
        "stats": result.stats.to_dict(),
        "consistency": result.consistency,
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
