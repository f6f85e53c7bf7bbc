"""Checkpoint file format and the shipped-weights registry.

A checkpoint is one `*.safetensors` file: the tensors, plus a JSON document under the
header metadata key `"ctirf"`::

    {"format": "ctirf-checkpoint", "format_version": 1,
     "architecture": {"name": "ET2dNet", "kwargs": {...}},
     "optics": {...Optics fields...} | null,
     "psf": {"model": "born_wolf", "size": 33} | null,
     "normalization": {"percentile": 98.0},
     "provenance": {...}, "metrics": {...},
     "versions": {"ctirf_live": ..., "torch": ..., "python": ...},
     "created": "2025-01-01T12:00:00+00:00"}

A `<name>.json` sidecar repeats the metadata for people; loading never needs it.
safetensors never unpickles, so a checkpoint cannot run code when opened. Writes go to a
temporary file in the same folder and are renamed into place, so a crash leaves either
the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from ctirf_live import __version__
from ctirf_live.atomic import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "ctirf-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "ctirf"
SUFFIX = ".safetensors"
BEST_NAME = f"best{SUFFIX}"  # what a training run folder stands for
WEIGHTS_DIR = Path(__file__).parent.parent / "weights"

_NOT_FOUND_HINT = "list available models with `ctirf models`"
# a bioimage.io zip that `ctirf export` wrote carries this checkpoint, named in config.ctirf
BIOIMAGEIO_FORMAT = "ctirf-bioimageio"
BIOIMAGEIO_FORMAT_VERSION = 1
BIOIMAGEIO_CHECKPOINT = "ctirf.safetensors"
_MAX_KEYS_SHOWN = 3


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line saying why and what to do."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _complete_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the caller's metadata and fill format, defaults, versions and time."""
    arch = metadata.get("architecture")
    if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str) or not arch["name"]:
        raise CheckpointError(
            "checkpoint metadata needs architecture.name (e.g. {'architecture': "
            "{'name': 'ET2dNet', 'kwargs': {...}}})"
        )
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise CheckpointError("checkpoint metadata architecture.kwargs must be a mapping")
    meta: dict[str, Any] = {
        "optics": None,
        "psf": None,
        "normalization": {"percentile": 98.0},
        "provenance": {},
        "metrics": {},
        **metadata,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {**arch, "kwargs": dict(kwargs)},
        "versions": {
            "ctirf_live": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        return json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON serialisable: {exc}") from None


def _cpu_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies, so tied or strided tensors never share storage on disk."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[str(key)] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return out


def sidecar_path(path: str | Path) -> Path:
    """The human-readable `<name>.json` beside a checkpoint."""
    return Path(path).with_suffix(".json")


def save_checkpoint(
    path: str | Path, state_dict: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write `state_dict` + `metadata` as a ctirf checkpoint (atomically) and its sidecar.

    `metadata` needs `architecture.name`; format, versions and creation time are filled
    in, other sections default as in the module docstring. Pydantic models (e.g.
    `Optics`) inside it are stored as their fields. Returns the checkpoint's path.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    meta = _complete_metadata(metadata)
    tensors = _cpu_tensors(state_dict)
    header = {METADATA_KEY: json.dumps(meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))
    sidecar_text = json.dumps(meta, indent=2) + "\n"
    atomic_write(sidecar_path(path), lambda tmp: tmp.write_text(sidecar_text))
    return path


def _open_metadata(path: Path) -> dict[str, Any]:
    """Read and check the ctirf metadata of `path`, without loading tensors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; {_NOT_FOUND_HINT}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(_corrupt(path, exc)) from None
    return _parse_metadata(path, header)


def _corrupt(path: Path, why: object) -> str:
    reason = " ".join(str(why).split()) or type(why).__name__
    return f"{path} is not a valid ctirf checkpoint (corrupt or truncated): {reason}"


def _parse_metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in header:
        raise CheckpointError(f"{path} has no ctirf metadata; was it saved by ctirf-live?")
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(_corrupt(path, f"metadata is not valid JSON ({exc})")) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(_corrupt(path, f"metadata format is not {FORMAT!r}"))
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(_corrupt(path, "metadata has no integer format_version"))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format {version}, newer than this ctirf-live "
            f"{__version__} reads ({FORMAT_VERSION}); upgrade ctirf-live"
        )
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, reading only the file's header."""
    return _open_metadata(Path(path))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load `(state_dict, metadata)` onto `device`; raises `CheckpointError` on bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; {_NOT_FOUND_HINT}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device=str(device)) as fh:
            meta = _parse_metadata(path, fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (safetensors.SafetensorError, OSError) as exc:
        raise CheckpointError(_corrupt(path, exc)) from None
    return tensors, meta


def _shown(keys: Sequence[str]) -> str:
    head = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return f"{head} (+{more} more)" if more > 0 else head


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load `state` into `model` strictly; any mismatch becomes one `CheckpointError` line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label} {_shown(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch (checkpoint vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint does not match architecture {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class CheckpointInfo:
    """What `ctirf models` shows about one checkpoint."""

    name: str
    path: Path
    architecture: str
    objective: str | None
    pixel_size_um: float | None
    na: float | None
    created: str | None
    shipped: bool


def _info(path: Path, meta: Mapping[str, Any], shipped: bool) -> CheckpointInfo:
    optics = meta.get("optics") or {}
    return CheckpointInfo(
        name=path.stem,
        path=path,
        architecture=str(meta["architecture"]["name"]),
        objective=optics.get("objective"),
        pixel_size_um=optics.get("pixel_size_um"),
        na=optics.get("na"),
        created=meta.get("created"),
        shipped=shipped,
    )


def list_checkpoints(extra_dirs: Sequence[Path] = ()) -> list[CheckpointInfo]:
    """Checkpoints shipped with ctirf-live, then those in `extra_dirs` (by name).

    Files that are not valid checkpoints are skipped with a logged warning.
    """
    found: list[CheckpointInfo] = []
    seen: set[Path] = set()
    for folder, shipped in [(WEIGHTS_DIR, True), *((Path(d), False) for d in extra_dirs)]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{SUFFIX}")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                meta = read_metadata(path)
                info = _info(path, meta, shipped)
            except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
                logger.warning("skipping %s: %s", path, exc)
                continue
            found.append(info)
    return found


def resolve_checkpoint(name_or_path: str | Path, extra_dirs: Sequence[Path] = ()) -> Path:
    """The one model resolver of every command: a checkpoint file, a bioimage.io zip that
    `ctirf export` wrote, a run folder (its `best.safetensors`), or a shipped (or
    `extra_dirs`) model by name (file stem)."""
    candidate = Path(name_or_path)
    if candidate.is_file() and candidate.suffix.lower() == ".zip":
        return checkpoint_in_package(candidate)
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        return _run_folder_best(candidate)
    if candidate.parent != Path("."):
        raise CheckpointError(f"checkpoint not found: {candidate}; {_NOT_FOUND_HINT}")
    name = candidate.name.removesuffix(SUFFIX)
    folders = [WEIGHTS_DIR, *(Path(d) for d in extra_dirs)]
    for folder in folders:
        path = folder / f"{name}{SUFFIX}"
        if path.is_file():
            return path
    available = sorted({p.stem for folder in folders for p in folder.glob(f"*{SUFFIX}")})
    listing = ", ".join(available) if available else "none installed"
    raise CheckpointError(
        f"no checkpoint file, run folder or model named {str(name_or_path)!r}; available "
        f"models: {listing}; or pass a {SUFFIX} file or a training output folder"
    )


def checkpoint_in_package(package: Path) -> Path:
    """The ctirf checkpoint inside a bioimage.io zip `ctirf export` wrote, unpacked once
    into the user cache (by content hash); a foreign bioimage.io package is refused."""
    import hashlib
    import os
    import zipfile

    import yaml

    try:
        with zipfile.ZipFile(package) as zf:
            rdf = yaml.safe_load(zf.read("rdf.yaml")) if "rdf.yaml" in zf.namelist() else None
            ours = ((rdf or {}).get("config") or {}).get("ctirf") or {}
            member = ours.get("checkpoint") if ours.get("format") == BIOIMAGEIO_FORMAT else None
            if not isinstance(rdf, dict) or not member or member not in zf.namelist():
                what = f"bioimage.io model {rdf.get('name')!r}" if isinstance(rdf, dict) else "zip"
                raise CheckpointError(
                    f"{package} is not a ctirf-live package ({what} without ctirf's checkpoint);"
                    " run it with bioimageio.core, or pass a model `ctirf export` wrote"
                )
            data = zf.read(member)
    except (zipfile.BadZipFile, yaml.YAMLError, OSError) as exc:
        raise CheckpointError(_corrupt(package, exc)) from None
    digest = hashlib.sha256(data).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctirf-live"
    path = cache / "packages" / f"{package.stem}-{digest}{SUFFIX}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def _run_folder_best(folder: Path) -> Path:
    best = folder / BEST_NAME
    if best.is_file():
        return best
    others = sorted(p.name for p in folder.glob(f"*{SUFFIX}"))
    if others:
        hint = f"it holds {', '.join(others)}: pass one of them as {folder / others[0]}"
    else:
        hint = "is the training finished? (a run folder gets it after its first epoch)"
    raise CheckpointError(f"{folder} has no {BEST_NAME}; {hint}")


def run_folder_of(path: Path) -> Path | None:
    """The run folder a checkpoint is the best of (what users pass as `-m`), else None."""
    return path.parent if path.name == BEST_NAME else None
