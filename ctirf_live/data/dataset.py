"""The on-disk paired EPI/TIRF dataset (written by `calibrate`, read by `train`/`finetune`).

Layout (DESIGN.md, "Paired dataset")::

    DIR/manifest.json          optics, objective, pixel size, versions, pairs[...]
    DIR/pair_0000.ome.tif      C=2 (EPI, TIRF), raw intensities, metadata embedded

Each pair is written atomically (image first, then the manifest), and every pair file
carries its own record in its OME metadata. Opening a folder therefore repairs what an
interruption can leave: a manifest entry whose file is gone is dropped, a pair file
missing from the manifest (crash between the two writes) is adopted, a calibration run
that was killed (still `running` in the manifest) is marked `killed`, and temp files of
interrupted atomic writes are removed. Repairs are written only by the process that
holds the folder's lock (`ctirf_live.folderlock`); anyone else repairs in memory.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ctirf_live import __version__
from ctirf_live.atomic import remove_leftover_temps
from ctirf_live.config import Optics
from ctirf_live.data.tiff import atomic_write_json, read_ome_tiff, write_ome_tiff
from ctirf_live.folderlock import FolderLock, FolderLockedError, held_here

FORMAT = "ctirf-paired-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PAIR_PATTERN = re.compile(r"^pair_(\d{4,})\.ome\.tif$")
CHANNELS = ("EPI", "TIRF")
STACK_SUFFIX = "_stack.ome.tif"  # pair_NNNN.ome.tif's EPI z-stack (calibrate --stacks)


class DatasetError(ValueError):
    """A dataset folder that cannot be used as asked; the message says why and what to do."""


@dataclass
class PairRecord:
    """One entry of the manifest's `pairs` list."""

    file: str
    position: dict[str, float]
    shift_px: list[float]
    quality: float
    timestamp: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairRecord:
        known = {"file", "position", "shift_px", "quality", "timestamp"}
        return cls(
            file=str(d["file"]),
            position={k: float(v) for k, v in (d.get("position") or {}).items()},
            shift_px=[float(v) for v in d.get("shift_px", [0.0, 0.0])],
            quality=float(d.get("quality", 0.0)),
            timestamp=str(d.get("timestamp", "")),
            extra={k: v for k, v in d.items() if k not in known and k != "extra"}
            | dict(d.get("extra") or {}),
        )


def _software() -> dict[str, str]:
    import numpy
    import pymmcore_plus

    return {
        "ctirf_live": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pymmcore_plus": getattr(pymmcore_plus, "__version__", "unknown"),
    }


class PairedDataset:
    """A folder of registered EPI/TIRF pairs with its manifest."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.pairs = [PairRecord.from_dict(p) for p in manifest.get("pairs", [])]
        self.notes: list[str] = []  # repairs made on opening, for the user

    # -- creation / opening --------------------------------------------------------------

    @classmethod
    def create(
        cls, folder: str | Path, optics: Optics, extra: dict[str, Any] | None = None
    ) -> PairedDataset:
        """Start a new dataset folder (or reopen a compatible one to resume it)."""
        folder = Path(folder)
        if (folder / MANIFEST).is_file():
            ds = cls.open(folder)
            ds.check_optics(optics)
            return ds
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(),
            "objective": optics.objective,
            "pixel_size_um": optics.pixel_size_um,
            "optics": optics.model_dump(),
            "channels": list(CHANNELS),
            "software": _software(),
            **(extra or {}),
            "pairs": [],
        }
        ds = cls(folder, manifest)
        ds._adopt_orphans()
        ds.save_manifest()
        return ds

    @classmethod
    def open(cls, folder: str | Path) -> PairedDataset:
        """Open an existing dataset, repairing what an interruption may have left."""
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DatasetError(
                f"{folder} is not a paired dataset (no {MANIFEST}); collect one with "
                "`ctirf calibrate --out DIR`"
            )
        import json

        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{path} is not valid JSON ({exc}); restore it or re-run calibrate"
            ) from None
        if manifest.get("format") != FORMAT:
            raise DatasetError(f"{path} is not a ctirf paired-dataset manifest")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise DatasetError(f"{path} was written by a newer ctirf-live; upgrade to read it")
        ds = cls(folder, manifest)
        changed = ds._drop_missing() | ds._adopt_orphans()
        mine_live = held_here(folder)  # the caller writes here: its own run is alive
        with _write_access(folder, ds.notes) as writable:
            if writable:
                changed |= ds._mark_killed_runs(spare_mine=mine_live)
                removed = remove_leftover_temps(folder)
                if removed:
                    ds.notes.append(
                        f"removed {len(removed)} temp file(s) of interrupted writes in {folder}"
                    )
                if changed:
                    ds.save_manifest()
        return ds

    @property
    def optics(self) -> Optics:
        return Optics(**self.manifest["optics"])

    def check_optics(self, optics: Optics) -> None:
        """Refuse to mix pairs from different objectives or pixel sizes in one folder."""
        mine = self.optics
        if mine.objective != optics.objective or not np.isclose(
            mine.pixel_size_um, optics.pixel_size_um, rtol=1e-3
        ):
            raise DatasetError(
                f"{self.folder} holds {mine.objective} pairs at {mine.pixel_size_um * 1000:g} nm; "
                f"use another --out for {optics.objective} at {optics.pixel_size_um * 1000:g} nm"
            )

    # -- writing --------------------------------------------------------------------------

    def next_file(self) -> str:
        used = [int(m.group(1)) for f in self.folder.iterdir() if (m := PAIR_PATTERN.match(f.name))]
        return f"pair_{(max(used) + 1) if used else 0:04d}.ome.tif"

    def add_pair(
        self,
        epi: np.ndarray,
        tirf: np.ndarray,
        position: dict[str, float],
        shift_px: tuple[float, float] | list[float],
        quality: float,
        extra: dict[str, Any] | None = None,
        stack: np.ndarray | None = None,
        stack_info: dict[str, Any] | None = None,
    ) -> PairRecord:
        """Write one pair (raw intensities, C=2) atomically, then update the manifest.

        With `stack` (Z, Y, X), the field's EPI z-stack is written first as
        `pair_NNNN_stack.ome.tif` (its z step from `stack_info["z_step_um"]`) and recorded
        under the pair's `stack` key; `stack_info` alone records why there is none.
        """
        if epi.shape != tirf.shape or epi.ndim != 2:
            raise DatasetError(f"EPI {epi.shape} and TIRF {tirf.shape} must be equal 2D frames")
        record = PairRecord(
            file=self.next_file(),
            position={k: float(v) for k, v in position.items()},
            shift_px=[float(shift_px[0]), float(shift_px[1])],
            quality=float(quality),
            timestamp=datetime.now(timezone.utc).isoformat(),
            extra=dict(extra or {}),
        )
        if stack_info is not None:
            record.extra["stack"] = dict(stack_info)
        if stack is not None:
            stack = np.asarray(stack)
            if stack.ndim != 3 or stack.shape[1:] != epi.shape:
                raise DatasetError(f"a z-stack must be (Z, {epi.shape}), got {stack.shape}")
            self._write_stack(record, stack, stack_info or {})
        write_ome_tiff(
            self.folder / record.file,
            np.stack([epi, tirf]),
            "CYX",
            pixel_size_um=self.manifest["pixel_size_um"],
            channel_names=list(CHANNELS),
            metadata={"pair": asdict(record), "optics": self.manifest["optics"]},
            name=record.file,
            optics=self.optics,
            modes=list(CHANNELS),
            acquired=datetime.fromisoformat(record.timestamp),
        )
        self.pairs.append(record)
        self.save_manifest()
        return record

    def _write_stack(self, record: PairRecord, stack: np.ndarray, info: dict[str, Any]) -> None:
        name = record.file.replace(".ome.tif", STACK_SUFFIX)
        step = float(info.get("z_step_um") or 0.0) or None
        write_ome_tiff(
            self.folder / name,
            stack,
            "ZYX",
            pixel_size_um=self.manifest["pixel_size_um"],
            z_step_um=step,
            channel_names=[CHANNELS[0]],
            metadata={"stack": {**info, "pair": record.file}, "optics": self.manifest["optics"]},
            name=name,
            optics=self.optics,
            modes=[CHANNELS[0]],
            acquired=datetime.fromisoformat(record.timestamp),
        )
        record.extra["stack"] = {**info, "file": name}

    def stack_files(self) -> list[tuple[PairRecord, Path]]:
        """The pairs that have an EPI z-stack on disk, with its file."""
        out = []
        for rec in self.pairs:
            name = (rec.extra.get("stack") or {}).get("file")
            if name and (self.folder / name).is_file():
                out.append((rec, self.folder / name))
        return out

    def save_manifest(self) -> None:
        self.manifest["pairs"] = [
            {**{k: v for k, v in asdict(p).items() if k != "extra"}, **p.extra} for p in self.pairs
        ]
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    # -- repair ---------------------------------------------------------------------------

    def _drop_missing(self) -> bool:
        kept = [p for p in self.pairs if (self.folder / p.file).is_file()]
        changed = len(kept) != len(self.pairs)
        self.pairs = kept
        return changed

    def _mark_killed_runs(self, spare_mine: bool) -> bool:
        """Runs still `running` while this process may write were killed (a live run holds
        the folder's lock), except this process's own with `spare_mine`: say so."""
        runs = (self.manifest.get("calibration") or {}).get("runs") or []
        me = (os.getpid(), socket.gethostname())
        killed = [
            r
            for r in runs
            if isinstance(r, dict)
            and r.get("status") == "running"
            and not (spare_mine and (r.get("pid"), r.get("host")) == me)
        ]
        found = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for run in killed:
            run.update(status="killed", note=f"the process ended mid-run (found {found})")
            self.notes.append(
                f"calibration run started {run.get('started', '?')} was killed after "
                f"{run.get('accepted', 0)} pair(s); marked 'killed' in the manifest"
            )
        return bool(killed)

    def _adopt_orphans(self) -> bool:
        listed = {p.file for p in self.pairs}
        adopted = False
        for f in sorted(self.folder.iterdir()):
            if not PAIR_PATTERN.match(f.name) or f.name in listed:
                continue
            try:
                _, info = read_ome_tiff(f)
                rec = PairRecord.from_dict(info.metadata["pair"])
            except (ValueError, KeyError, TypeError):
                continue
            rec.file = f.name
            self.pairs.append(rec)
            adopted = True
        return adopted

    # -- reading --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PairRecord]:
        return iter(self.pairs)

    def load_pair(self, index: int, registered: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(EPI, TIRF) as float32; with `registered`, EPI is shifted by the recorded shift."""
        rec = self.pairs[index]
        data, _ = read_ome_tiff(self.folder / rec.file)
        if data.ndim != 3 or data.shape[0] != 2:
            raise DatasetError(f"{rec.file} should hold 2 channels (EPI, TIRF), has {data.shape}")
        epi, tirf = data[0].astype(np.float32), data[1].astype(np.float32)
        if registered and any(abs(s) > 1e-6 for s in rec.shift_px):
            epi = apply_shift(epi, rec.shift_px)
        return epi, tirf

    def shapes(self) -> set[tuple[int, ...]]:
        """Distinct frame shapes, read from file headers."""
        import tifffile

        out = set()
        for rec in self.pairs:
            with tifffile.TiffFile(self.folder / rec.file) as tif:
                out.add(tuple(tif.series[0].shape[-2:]))
        return out


@contextlib.contextmanager
def _write_access(folder: Path, notes: list[str]) -> Iterator[bool]:
    """True while this process may write repairs: it holds the folder's lock, or takes it
    for the block (a stale lock taken over is noted). False when another live process
    holds it or the folder is read-only."""
    if held_here(folder):
        yield True
        return
    lock = FolderLock(folder, command="open dataset")
    try:
        lock.acquire()
    except (FolderLockedError, OSError):
        yield False
        return
    if lock.note:
        notes.append(lock.note)
    try:
        yield True
    finally:
        lock.release()


def apply_shift(image: np.ndarray, shift_px: tuple[float, float] | list[float]) -> np.ndarray:
    """Translate an image by (dy, dx) pixels, sub-pixel (cubic spline, edges replicated)."""
    return ndimage.shift(
        np.asarray(image, dtype=np.float32), shift=tuple(shift_px), order=3, mode="nearest"
    ).astype(np.float32)
