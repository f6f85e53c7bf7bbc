"""`LiveProcessor`: cTIRF in the acquisition loop, without ever slowing the acquisition.

Use it as a frame handler of an MDA::

    processor = LiveProcessor(Restorer("model.safetensors"), policy="record",
                              result_writer=OmeTiffResultWriter("out/ctirf.ome.tiff"))
    with processor:
        run_mda(core, sequence, handlers=[processor], sinks=["out/raw.ome.tiff"])
        processor.wait_until_idle()

(`ctirf_live.acquisition.mda.run_mda`; `core.mda.run(sequence, output=[..., processor])`
works too, through pymmcore-plus's relay thread, but in a Qt application that relay is
started and fed through the GUI thread: see that module.)

How it stays out of the way: `frameReady` is called on the MDA's relay thread, never
the acquisition thread, and only files the frame (preview: newest wins; record: bounded
memory, then spill files, see `backlog.py`); one worker thread runs the model
(`runners.py`: CPU, or CUDA with pinned buffers and streams), stores results through a
`ResultWriter` and emits `resultReady`. Raw frames are stored by pymmcore-plus's own
sink, independently, so model errors, NaN output or a full queue never cost raw data:
each is counted, reported once through `errorOccurred` and the log, and the run goes on.
On Linux the worker also runs at a lower CPU priority (nice +10), so when the model
shares the CPU with the acquisition, camera and writer threads come first.

Stack mode (default for 3D nets) groups the planes of one z-stack by the event index
without `z` (t, p, c, g) and sends the stack once all planes have arrived; a 2D net in
stack mode restores the planes one by one. Only frames whose channel preset is in
`channels` are processed (frames without a channel are processed).

Signals are emitted from background threads (the worker; `errorOccurred` also from the
MDA's relay thread or the live poller). In a Qt GUI, connect with
`signal.connect(slot, thread="main")` (psygnal queues the call to the main thread once
`psygnal.qt.start_emitting_from_queue()` runs) or poll `latest()`/`stats` on a QTimer;
slots must be quick, since they run between model calls.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from psygnal import Signal

from ctirf_live.config import EPI_PRESET, ILLUMINATION_GROUP
from ctirf_live.inference.backlog import POLICIES, Backlog, Marker, Policy, StackAssembler, WorkItem
from ctirf_live.inference.consistency import (
    ConsistencyLog,
    ConsistencyMonitor,
    restore_scored,
    sidecar_path,
)
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.runners import CpuRunner, make_runner

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

    from ctirf_live.inference.writers import ResultWriter

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1
WORKER_NICENESS = 10
LATENCY_WINDOW = 2000
FPS_WINDOW = 64
STOP_GRACE_S = 5.0
START, FINISH, STOP = "start", "finish", "stop"


@dataclass
class LiveStats:
    """Counters of one processor; frames, not stacks (a 6-plane stack counts 6).

    At rest, `acquired == processed + skipped + errors`; `ignored` counts frames of
    channels that are not processed (e.g. TIRF). Latency runs from a frame's arrival
    in `frameReady` (for stacks: the last plane's) to its result being available.

    Physics consistency (see `ctirf_live.inference.consistency`), per plane processed:
    `consistency_frames` planes scored so far; `consistency_flagged` of them flagged as
    unlike the model's training data (0 while the model has no calibration);
    `consistency_last` the newest plane's scores as a dict (`ms_ssim`, `residual`,
    `noise_ratio`, `band_misfit`, `g_unexplained`, `in_focus`, `focus_offset_um` from the
    run's reference focus, `flagged`: True/False, or None when uncalibrated and the
    acquisition's facts pass, `reason`), empty before the first result or when the
    monitor is off. `LiveProcessor.latest_residual()` gives the matching residual map.
    """

    acquired: int = 0
    processed: int = 0
    skipped: int = 0
    errors: int = 0
    queue_depth: int = 0
    spilled: int = 0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    processed_fps: float = 0.0
    ignored: int = 0
    consistency_frames: int = 0
    consistency_flagged: int = 0
    consistency_last: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON summaries and tables)."""
        return asdict(self)


class LiveProcessor:
    """Restore frames or z-stacks as they are acquired (see the module docstring)."""

    resultReady = Signal(object, object, object)
    statsChanged = Signal(object)
    errorOccurred = Signal(str)

    def __init__(
        self,
        restorer: Restorer,
        *,
        policy: Policy = "preview",
        channels: Sequence[str] = (EPI_PRESET,),
        channel_group: str = ILLUMINATION_GROUP,
        stack_mode: bool | None = None,
        queue_size: int = 4,
        result_writer: ResultWriter | None = None,
        spill_dir: Path | None = None,
        warmup: bool = True,
        space_check: Callable[[int], bool] | None = None,
        consistency: ConsistencyMonitor | bool | None = None,
        threads: int | None = None,
        focus_reference_um: float | None = None,
    ) -> None:
        """`consistency`: a monitor, False for none, or None: one built from the model's
        own calibration whenever `restorer` is a `Restorer` (the scores come from the
        same forward pass; they are recorded beside the result store). `threads`: CPU
        threads of the model (default `worker_threads()`: cores - 1, at least 1).
        `focus_reference_um`: the stage focus (Z, um) the model's frames belong at, the
        coverslip's; default: each run's focus when it starts. Frames focused farther
        from it than the depth of field are flagged by the monitor."""
        self.restorer = restorer
        self.threads = worker_threads(threads)
        self.channels = tuple(channels)
        self.channel_group = channel_group
        self.stack_mode = restorer.dims == 3 if stack_mode is None else bool(stack_mode)
        if restorer.dims == 3 and not self.stack_mode:
            raise ValueError("a 3D network (ET3dNet) needs stack_mode=True")
        self.result_writer = result_writer
        self.warmup = warmup
        self.space_check = space_check
        self._backlog = Backlog(policy, queue_size, spill_dir, space_check)
        self._runner: Any = make_runner(restorer)
        if consistency is None:
            consistency = isinstance(restorer, Restorer)
        if consistency is True:
            consistency = ConsistencyMonitor(restorer)
        self.consistency = ConsistencyLog(consistency) if consistency else None
        self._runner.scorer = restore_scored if self.consistency else None
        self._consistency_start = 0
        self.focus_reference_um = focus_reference_um
        self._run_focus: float | None = None  # the stage focus when the run started
        self._latest_residual: np.ndarray | None = None
        self._assembler = StackAssembler()
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("acquired", "processed", "skipped", "errors", "ignored"), 0)
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._done_times: deque[tuple[float, int]] = deque(maxlen=FPS_WINDOW)
        self._outstanding = 0
        self.dropped_on_stop = 0
        self._reported: set[str] = set()
        self._latest: tuple[Any, Any, Any] | None = None
        self._expected_shape: tuple[int, int] | None = None
        self._planes_cache: dict[int, int] = {}
        self._sequence: Any = None
        self._plane_facts: list[tuple[dict[str, int], dict[str, float]]] = []
        self._warmed: set[tuple[int, int]] = set()
        self._writer_open = False
        self._stats_dirty = False
        self._last_stats_emit = 0.0
        self._worker: threading.Thread | None = None
        self._poller: _LivePoller | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """`preview` (newest frame wins) or `record` (every frame, spilling to disk)."""
        return self._backlog.policy

    @policy.setter
    def policy(self, value: Policy) -> None:
        if value not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {value!r}")
        self._backlog.policy = value

    @property
    def stats(self) -> LiveStats:
        """A snapshot of the counters, latency percentiles and processing rate."""
        with self._lock:
            counts = dict(self._counts)
            lat = np.asarray(self._latencies, dtype=np.float64)
            done = list(self._done_times)
        fps = 0.0
        if len(done) > 1 and done[-1][0] > done[0][0]:
            fps = sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0])
        log_ = self.consistency
        return LiveStats(
            **counts,
            consistency_frames=log_.frames if log_ else 0,
            consistency_flagged=log_.flagged if log_ else 0,
            consistency_last=log_.last if log_ else {},
            queue_depth=self._backlog.depth,
            spilled=self._backlog.spilled,
            latency_p50_ms=float(np.percentile(lat, 50)) if lat.size else 0.0,
            latency_p95_ms=float(np.percentile(lat, 95)) if lat.size else 0.0,
            processed_fps=fps,
        )

    @property
    def reported_errors(self) -> list[str]:
        """The distinct error messages reported so far."""
        with self._lock:
            return sorted(self._reported)

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._worker is not None and self._worker.is_alive()

    def latest(self) -> tuple[Any, Any, Any] | None:
        """The newest (raw, result, event), or None before the first result."""
        return self._latest

    def latest_residual(self) -> np.ndarray | None:
        """x^ - x of the newest result on the model's normalised scale (the residual map
        to overlay; the shape of the result), or None without a consistency monitor."""
        return self._latest_residual

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent; the handler methods call it too)."""
        with self._lock:
            if self._worker is not None and self._worker.is_alive():
                return
            self._worker = threading.Thread(target=self._run, name="ctirf-live", daemon=True)
            self._worker.start()

    def stop(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop the worker; True once it has ended and closed the result store.

        `wait` first processes everything queued (record: all frames). With a `timeout`,
        what is still queued when it runs out is dropped (counted in `skipped` and
        `dropped_on_stop`) and the worker gets up to `STOP_GRACE_S` more to close the store;
        False means it is still inside a model call then (it ends by itself after it).
        """
        self.detach_live()
        if not wait:
            self._drop_queued()
        worker = self._worker
        if worker is not None and worker.is_alive():
            self._enqueue_marker(STOP)
            worker.join(timeout)
            if worker.is_alive() and timeout is not None:
                self._drop_queued()
                worker.join(min(STOP_GRACE_S, max(timeout, 0.1)))
            if worker.is_alive():
                self._emit_stats(force=True)
                return False
        self._worker = None
        self._backlog.cleanup()
        self._emit_stats(force=True)
        return True

    def _drop_queued(self) -> None:
        dropped = self._backlog.clear()
        n = sum(d.n_frames for d in dropped)
        self._count("skipped", n)
        with self._lock:
            self.dropped_on_stop += n
        self._settle(len(dropped))

    @property
    def frames_received(self) -> int:
        """Frames the MDA delivered to this handler (processed channels or not)."""
        with self._lock:
            return self._counts["acquired"] + self._counts["ignored"]

    @property
    def pending(self) -> int:
        """Frames and markers still waiting for the worker (0 once everything is stored)."""
        with self._lock:
            return self._outstanding

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued frame is processed and stores are closed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._outstanding == 0:
                    return True
            if self._worker is None or not self._worker.is_alive():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def warm_up(self, frame_shape: Sequence[int]) -> None:
        """Run the model once at `frame_shape` now (so set-up cost never counts as latency)."""
        shape = (int(frame_shape[-2]), int(frame_shape[-1]))
        if shape not in self._warmed:
            self._runner.warmup(shape)
            self._warmed.add(shape)

    def __enter__(self) -> LiveProcessor:
        self.start()
        return self

    def __exit__(self, exc_type: object, *args: object) -> None:
        self.stop(wait=exc_type is None)

    # -- pymmcore-plus output-handler protocol (called on the MDA's relay thread) -----

    def sequenceStarted(self, sequence: Any, meta: Mapping[str, Any] | None = None) -> None:
        """New acquisition: remember its frame shape, open the result store, warm up."""
        self.start()
        shape, pixel = None, None
        infos = (meta or {}).get("image_infos") or []
        if infos:
            info = infos[0]
            shape = (int(info["height"]), int(info["width"]))
            pixel = info.get("pixel_size_um")
        self._run_focus = _number(((meta or {}).get("position") or {}).get("z"))
        focus = self._run_focus if self.focus_reference_um is None else self.focus_reference_um
        self._expected_shape = shape
        self._sequence = sequence
        self._planes_cache.clear()
        self._assembler.clear()
        self._plane_facts = []  # a new list: the previous run's goes with its FINISH marker
        self._enqueue_marker(
            START, sequence=sequence, shape=shape, pixel_size_um=pixel, focus_um=focus
        )

    def frameReady(
        self, frame: np.ndarray, event: Any = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        """File one frame for processing; returns at once, never raises."""
        t = time.perf_counter()
        try:
            self._file_frame(frame, event, t, z_um=_stage_z(event, meta, self._run_focus))
            self._note_plane(event, meta)
        except Exception as exc:  # the relay thread must never see an exception
            self._error(f"could not queue a frame: {exc}")

    def sequenceFinished(self, sequence: Any = None) -> None:
        """Acquisition over: drop incomplete stacks; the worker drains and closes the store."""
        dropped = self._assembler.clear()
        if dropped:
            self._count("skipped", dropped)
            log.warning("%d plane(s) of incomplete z-stacks were not processed", dropped)
        self._enqueue_marker(FINISH, planes=self._plane_facts)

    def _note_plane(self, event: Any, meta: Mapping[str, Any] | None) -> None:
        """Keep each processed channel's frame time, exposure and stage position (from
        pymmcore-plus's frame metadata) for the result store's OME Plane elements."""
        if event is None or not meta or not self._wants(event):
            return
        facts: dict[str, float] = {}
        if isinstance(meta.get("runner_time_ms"), int | float):
            facts["delta_t_s"] = float(meta["runner_time_ms"]) / 1000.0
        if isinstance(meta.get("exposure_ms"), int | float):
            facts["exposure_ms"] = float(meta["exposure_ms"])
        position = meta.get("position") or {}
        for axis in ("x", "y", "z"):
            if isinstance(position.get(axis), int | float):
                facts[axis] = float(position[axis])
        if facts:
            self._plane_facts.append((dict(getattr(event, "index", None) or {}), facts))

    # -- continuous live streaming -----------------------------------------------------

    def attach_live(self, core: CMMCorePlus, poll_interval_s: float | None = None) -> None:
        """Process frames of continuous live mode (`core.startContinuousSequenceAcquisition`).

        Live mode emits no per-frame event, so a small poller thread (never the camera or
        acquisition thread) reads `core.getLastImageAndMD()` while a continuous sequence
        runs and no MDA does (MDA frames come through `frameReady`), every
        `poll_interval_s` (default: half the exposure, 5-50 ms), and files each new image
        (by its `ImageNumber`) with the preview policy's newest-wins rule. Frames the
        poller never saw count as skipped. Frames are ignored while the `channel_group`
        preset is not in `channels`. Results are displayed, not stored; the frame size may
        change between frames (ROI edits while live).
        """
        self.detach_live()
        self.start()
        self._expected_shape = None
        self._poller = _LivePoller(self, core, poll_interval_s)
        self._poller.start()

    def detach_live(self, core: CMMCorePlus | None = None) -> None:
        """Stop processing live-mode frames (MDA processing is unaffected)."""
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()

    # -- producer internals --------------------------------------------------------------

    def _wants(self, event: Any) -> bool:
        channel = getattr(event, "channel", None)
        return channel is None or channel.config in self.channels

    def _planes(self, event: Any) -> int:
        seq = getattr(event, "sequence", None) or self._sequence
        if seq is None:
            return 1
        key = id(seq)
        if key not in self._planes_cache:
            try:
                self._planes_cache[key] = max(int(seq.sizes.get("z", 0)), 1)
            except Exception:
                self._planes_cache[key] = 1
        return self._planes_cache[key]

    def _file_frame(
        self,
        frame: np.ndarray,
        event: Any,
        t: float,
        live: bool = False,
        z_um: float | None = None,
    ) -> None:
        if event is not None and not self._wants(event):
            self._count("ignored", 1)
            return
        self._count("acquired", 1)
        frame = np.asarray(frame)
        shape = tuple(frame.shape[-2:])
        if frame.ndim != 2:
            self._error(f"frames must be 2D (Y, X); got shape {frame.shape}")
            return
        if self._expected_shape is None or (live and shape != self._expected_shape):
            self._expected_shape = shape  # type: ignore[assignment]  # live: ROI may change
        elif shape != self._expected_shape:
            self._error(
                f"frame of shape {shape} differs from the run's {self._expected_shape} "
                "(camera ROI or binning changed?); frame not processed"
            )
            return
        index = dict(getattr(event, "index", None) or {})
        if self.stack_mode and not live:
            planes = self._planes(event)
            if planes < 2 and self.restorer.dims == 3:
                self._error(
                    "ET3dNet needs z-stacks but the sequence has no z plan; "
                    "add a z plan or use an ET2dNet model"
                )
                return
            if self.restorer.dims == 3 and not self._stack_checked(planes, event):
                return
            item = self._assembler.add(index, frame, event, t, planes, z_um)
            if item is None:
                return
        elif self.restorer.dims == 3:
            self._error("ET3dNet needs z-stacks; live frames are shown raw only")
            return
        else:
            item = WorkItem(frame, index, event, t, z_um=(z_um,))
        self._put(item)

    def _stack_checked(self, planes: int, event: Any) -> bool:
        """Whether a 3D model can restore this sequence's stacks (plane count, z step);
        the first refusal is reported once, as every error is."""
        check = getattr(self.restorer, "check_stack", None)
        if check is None:
            return True
        z_plan = getattr(getattr(event, "sequence", None), "z_plan", None)
        step = getattr(z_plan, "step", None)
        try:
            check(planes, float(step) if step else None)
        except ValueError as exc:
            self._error(str(exc))
            return False
        return True

    def _put(self, item: WorkItem) -> None:
        with self._lock:
            self._outstanding += 1
        dropped = self._backlog.put(item)
        if self._backlog.spill_error:
            message, self._backlog.spill_error = self._backlog.spill_error, None
            self._error(message, 0)
        if dropped:
            self._count("skipped", sum(d.n_frames for d in dropped))
            self._settle(len(dropped))
        self._stats_dirty = True

    def _enqueue_marker(self, kind: str, **payload: Any) -> None:
        with self._lock:
            self._outstanding += 1
        self._backlog.put_marker(kind, **payload)

    def _count(self, key: str, n: int) -> None:
        if n:
            with self._lock:
                self._counts[key] += n
            self._stats_dirty = True

    def _settle(self, n: int = 1) -> None:
        with self._lock:
            self._outstanding -= n

    def _error(self, message: str, n_frames: int = 1) -> None:
        """Count an error for `n_frames` frames; report each distinct message once."""
        self._count("errors", n_frames)
        with self._lock:
            new = message not in self._reported
            self._reported.add(message)
        if new:
            log.warning("live processing: %s", message)
            self._emit(self.errorOccurred, message)

    # -- worker -----------------------------------------------------------------------

    def _run(self) -> None:
        _lower_thread_priority()
        _set_torch_threads(self.threads)
        pending: tuple[WorkItem, Any] | None = None
        while True:
            if pending is None:
                entry = self._backlog.get(timeout=STATS_INTERVAL_S)
                if entry is None:
                    self._emit_stats()
                    continue
                if isinstance(entry, Marker):
                    stop = self._handle_marker(entry)
                    self._settle()
                    if stop:
                        return
                    continue
                pending = self._stage(entry)
                if pending is None:
                    continue
            item, staged = pending
            pending = None
            launched = self._launch(item, staged)
            if launched is not None and self._runner.pipelined:
                nxt = self._backlog.get_nowait()
                if isinstance(nxt, WorkItem):
                    pending = self._stage(nxt)
            if launched is not None:
                self._finish(item, launched)
            self._emit_stats()

    def _stage(self, item: WorkItem) -> tuple[WorkItem, Any] | None:
        try:
            item.data = item.load()
            return item, self._runner.stage(item.data)
        except Exception as exc:
            self._error(_describe(exc), item.n_frames)
            self._settle()
            return None

    def _launch(self, item: WorkItem, staged: Any) -> Any:
        try:
            return self._runner.launch(staged)
        except Exception as exc:
            if self._runner.pipelined and "out of memory" in str(exc).lower():
                log.warning("CUDA out of memory in the streaming path; using Restorer.restore")
                self._runner = CpuRunner(self.restorer)
                self._runner.scorer = restore_scored if self.consistency else None
                return self._launch(item, item.data)
            self._error(_describe(exc), item.n_frames)
            self._settle()
            return None

    def _finish(self, item: WorkItem, launched: Any) -> None:
        try:
            result = self._runner.finish(launched)
            if isinstance(result, tuple):  # with the consistency monitor
                result, scores, residual = result
                assert self.consistency is not None
                verdicts = self.consistency.monitor.verdicts(scores, item.z_um)
                self.consistency.add(item.index, verdicts)
                self._latest_residual = residual
            checked = getattr(self._runner, "checks_finite", False)  # on the GPU already
            if not checked and not np.isfinite(result).all():
                raise FloatingPointError("model output contains NaN or infinite values")
        except Exception as exc:
            self._error(_describe(exc), item.n_frames)
            self._settle()
            return
        now = time.perf_counter()
        with self._lock:
            self._latencies.append((now - item.t_arrival) * 1000.0)
            self._done_times.append((now, item.n_frames))
        self._latest = (item.data, result, item.event)
        self._emit(self.resultReady, item.data, result, item.event)
        stored = self._store(item, result)
        self._count("processed" if stored else "errors", item.n_frames)
        self._settle()

    def _store(self, item: WorkItem, result: np.ndarray) -> bool:
        if not self._writer_open or self.result_writer is None:
            return True
        itemsize = int(getattr(self.result_writer, "bytes_per_pixel", 4))
        if self.space_check is not None and not self.space_check(int(result.size) * itemsize):
            self._error("disk space is kept for raw frames: cTIRF results are not saved", 0)
            return False
        try:
            self.result_writer.write(item.index, result)
            return True
        except Exception as exc:
            self._error(f"could not store a cTIRF result: {_describe(exc)}", 0)
            return False

    def _handle_marker(self, marker: Marker) -> bool:
        if marker.kind == START:
            self._close_writer()
            if self.consistency is not None:  # the run's facts the monitor checks
                monitor = self.consistency.monitor
                monitor.pixel_size_um = _number(marker.payload.get("pixel_size_um"))
                monitor.focus_reference_um = _number(marker.payload.get("focus_um"))
            shape = marker.payload.get("shape")
            if self.warmup and shape:
                try:
                    self.warm_up(shape)
                except Exception as exc:
                    self._error(f"model warm-up failed: {_describe(exc)}", 0)
            self._open_writer(marker.payload.get("sequence"), shape, marker.payload)
        elif marker.kind == FINISH:
            self._close_writer(marker.payload.get("planes"))
            self._emit_stats(force=True)
        elif marker.kind == STOP:
            self._close_writer()
            return True
        return False

    def _open_writer(self, sequence: Any, shape: Any, payload: Mapping[str, Any]) -> None:
        if self.result_writer is None or sequence is None or shape is None:
            return
        if self.consistency is not None:
            self._consistency_start = self.consistency.frames
        try:
            self.result_writer.open(
                sequence,
                shape,
                channels=self.channels,
                metadata=self.restorer.describe(),
                pixel_size_um=payload.get("pixel_size_um"),
            )
            self._writer_open = True
        except Exception as exc:
            self._error(f"cTIRF results are not being saved: {_describe(exc)}", 0)

    def _close_writer(self, planes: Sequence[Any] | None = None) -> None:
        if self._writer_open and self.result_writer is not None:
            self._writer_open = False
            try:
                self._record_consistency(self.result_writer)
                if planes and callable(getattr(self.result_writer, "note_planes", None)):
                    self.result_writer.note_planes(planes)
                self.result_writer.close()
            except Exception as exc:
                self._error(f"could not close the cTIRF store: {_describe(exc)}", 0)

    def _record_consistency(self, writer: ResultWriter) -> None:
        """The store's per-plane scores: a CSV sidecar beside it and, in its metadata,
        the summary (OME-Zarr: with the per-plane columns)."""
        log_, start = self.consistency, self._consistency_start
        if log_ is None:
            return
        try:
            log_.write_csv(sidecar_path(writer.path), start)
        except OSError as exc:
            self._error(f"could not write the consistency scores: {_describe(exc)}", 0)
        extra = getattr(writer, "extra", None)
        if isinstance(extra, dict):
            record = {**log_.summary(start), "sidecar": sidecar_path(writer.path).name}
            if str(writer.path).endswith(".zarr"):
                record["planes"] = log_.per_frame(start)
            extra["consistency"] = record

    # -- signals ----------------------------------------------------------------------

    def _emit(self, signal: Any, *args: Any) -> None:
        try:
            signal.emit(*args)
        except Exception as exc:  # a failing slot must not stop processing
            log.warning("a %s slot raised: %s", getattr(signal, "name", "signal"), exc)

    def _emit_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._stats_dirty or now - self._last_stats_emit < STATS_INTERVAL_S):
            return
        self._stats_dirty = False
        self._last_stats_emit = now
        self._emit(self.statsChanged, self.stats)


def worker_threads(requested: int | None = None) -> int:
    """CPU threads for the model: `requested`, or the usable cores - 1 (at least 1), so
    one core stays free for the camera, acquisition and writer threads (with every core
    computing, the same forward ran ~6x slower next to an acquisition)."""
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"threads must be at least 1, got {requested}")
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def _set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads from the worker thread, where the model runs.

    torch treats the count as process-wide (with its OpenMP backend, threads started
    later inherit it, while an already running thread such as the main one keeps its own),
    so during a live run this processor owns the setting; ONNX Runtime sessions made
    afterwards take the same count (`onnx_backend.py`).
    """
    torch.set_num_threads(n)


def _lower_thread_priority(step: int = WORKER_NICENESS) -> None:
    """Make the calling thread (and the compute threads it starts) yield to acquisition.

    On Linux `nice` is per thread and inherited by threads it creates (torch's CPU
    pool for this thread), so camera, stage and writer threads win whenever the CPU is
    short. Elsewhere, or if refused, nothing changes.
    """
    if not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(current + step, 19))
    except OSError as exc:
        log.debug("could not lower the worker's priority: %s", exc)


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _stage_z(event: Any, meta: Mapping[str, Any] | None, run_focus: float | None) -> float | None:
    """A frame's focus (um): the stage's as recorded with the frame, else the event's
    target, else (an event that moves no focus, in a hardware-sequenced burst whose
    frames carry no position) the focus the run started at."""
    z = _number(((meta or {}).get("position") or {}).get("z"))
    if z is None:
        z = _number(getattr(event, "z_pos", None))
    return run_focus if z is None else z


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _LivePoller(threading.Thread):
    """Feeds continuous live-mode frames to a processor (see `attach_live`)."""

    def __init__(
        self, processor: LiveProcessor, core: CMMCorePlus, interval_s: float | None
    ) -> None:
        super().__init__(name="ctirf-live-poller", daemon=True)
        self.processor, self.core, self.interval_s = processor, core, interval_s
        self._stop_event = threading.Event()
        self._last_number: int | None = None

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(2.0)

    def _interval(self) -> float:
        if self.interval_s is not None:
            return self.interval_s
        try:
            return min(max(self.core.getExposure() / 2000.0, 0.005), 0.05)
        except Exception:
            return 0.02

    def run(self) -> None:
        while not self._stop_event.wait(self._interval()):
            try:
                if not self.core.isSequenceRunning() or self.core.mda.is_running():
                    self._last_number = None
                    continue
                self._poll()
            except Exception as exc:
                self.processor._error(f"live polling failed: {_describe(exc)}", 0)

    def _poll(self) -> None:
        p = self.processor
        try:
            image, md = self.core.getLastImageAndMD()
        except (IndexError, RuntimeError):
            return
        t = time.perf_counter()
        number = int(dict(md).get("ImageNumber", -1))
        if number == self._last_number:
            return
        missed = number - self._last_number - 1 if self._last_number is not None else 0
        self._last_number = number
        if p.channel_group:
            preset = self.core.getCurrentConfigFromCache(p.channel_group)
            if preset and preset not in p.channels:
                p._count("ignored", 1 + max(missed, 0))
                return
        if missed > 0:
            p._count("acquired", missed)
            p._count("skipped", missed)
        p._file_frame(image, None, t, live=True)
