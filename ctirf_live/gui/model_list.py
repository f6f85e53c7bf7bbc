"""The models the window offers: shipped checkpoints and local training runs.

A training run folder stands for its best checkpoint and is listed by the folder's name
(what `-m` takes), never as "best"; `last.safetensors` beside a best one is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctirf_live.models.checkpoint import CheckpointInfo, list_checkpoints, run_folder_of

LAST_NAME = "last.safetensors"


@dataclass(frozen=True)
class ModelEntry:
    """One line of the model selector."""

    label: str
    path: Path


def search_folders(current: str | Path | None, extra: Iterable[Path] = ()) -> list[Path]:
    """Where local models are looked for: `runs/` here, the folder holding the current
    model's run folder, `extra`, and each one's subfolders (training runs)."""
    roots = [Path.cwd() / "runs", *extra]
    if current:
        path = Path(current)
        run = run_folder_of(path)
        roots.append(run.parent if run is not None else path.parent)
    folders: list[Path] = []
    for root in roots:
        if root.is_dir() and root not in folders:
            folders.append(root)
            folders += sorted(p for p in root.iterdir() if p.is_dir() and p not in folders)
    return folders


def _label(info: CheckpointInfo) -> str:
    run = run_folder_of(info.path)
    name = run.name if run is not None else info.name
    pixel = f", {info.pixel_size_um * 1000:.0f} nm" if info.pixel_size_um else ""
    kind = "3D, " if "3d" in info.architecture.lower() else ""
    return f"{name} ({kind}{info.objective or '?'}{pixel})"


def model_entries(folders: Sequence[Path] = ()) -> list[ModelEntry]:
    """Shipped models first, then local ones, each under a readable name."""
    found = list_checkpoints(folders)
    runs = {run_folder_of(i.path) for i in found} - {None}
    return [
        ModelEntry(_label(info), info.path)
        for info in found
        if not (info.path.name == LAST_NAME and info.path.parent in runs)
    ]
