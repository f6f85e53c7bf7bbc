"""Names shared by the raw and cTIRF stores, so both have the same layout.

pymmcore-plus (through ome-writers) stores a multi-position OME-TIFF run as a folder
`raw/` of `raw_p000.ome.tiff`, ... and an OME-Zarr run as a bioformats2raw group with
one series per position, named after the position. The cTIRF stores follow the same
rules (`ctirf/ctirf_p000.ome.tiff`, the same series names), and every cTIRF channel is
called `cTIRF <preset>` by `acquire`, `live` and `process` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")


def ctirf_channel_name(channel: str) -> str:
    """The cTIRF channel restored from a raw channel (preset), e.g. 'cTIRF EPI'."""
    return f"cTIRF {channel}" if channel else "cTIRF"


def tiff_stem(path: str | Path) -> str:
    """A TIFF's name without .ome.tiff/.ome.tif/.tiff/.tif."""
    name = Path(path).name
    for suffix in TIFF_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def position_files(path: str | Path, positions: int) -> tuple[Path, list[Path]]:
    """(store path, files) for an OME-TIFF store of `positions` images at `path`.

    One image: the file itself. Several: a folder named after the file's stem holding
    `<stem>_p000.ome.tiff`, ... (what ome-writers does for the raw store).
    """
    path = Path(path)
    if positions <= 1:
        return path, [path]
    stem = tiff_stem(path)
    folder = path.with_name(stem)
    return folder, [folder / f"{stem}_p{i:03d}.ome.tiff" for i in range(positions)]


def position_names(sequence: Any, frame_shape: Sequence[int], count: int) -> list[str]:
    """The series names ome-writers gives the positions of `sequence` (`count` of them).

    Falls back to p000, p001, ... when ome-writers cannot describe the sequence or
    names another number of positions, or the names are not unique.
    """
    fallback = [f"p{i:03d}" for i in range(count)]
    try:
        from ome_writers import useq_to_acquisition_settings

        settings = useq_to_acquisition_settings(
            sequence, int(frame_shape[-1]), int(frame_shape[-2])
        )
    except Exception:  # any sequence ome-writers rejects keeps the fallback names
        return fallback
    if settings.get("plate") is not None:
        return fallback
    coords = next(
        (d.coords for d in settings["dimensions"] if getattr(d, "type", None) == "position"),
        None,
    )
    if not coords:
        return fallback
    names = [
        f"{p.name}_{p.grid_row}_{p.grid_column}"
        if p.grid_row is not None and p.grid_column is not None
        else str(p.name)
        for p in coords
    ]
    if len(names) != count or len(set(names)) != count:
        return fallback
    return names
