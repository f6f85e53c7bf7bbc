"""napari reader: ctirf paired datasets and the raw/cTIRF stores, as named, scaled layers.

Plain functions returning napari's layer-data tuples `(data, kwargs, "image")`; nothing
here imports napari, so they are usable (and tested) without it.

- a paired dataset folder (`ctirf calibrate`): an `EPI` and a `TIRF` layer, one plane
  per pair, EPI registered onto TIRF as training sees it;
- an OME-TIFF (a file, or a per-position folder such as `raw/` or `ctirf/`): one layer
  per series and channel, named after the channel (`EPI`, `cTIRF EPI`);
- an OME-Zarr store (single image or one series per position): one layer per series
  and channel, read lazily with zarr, display window from the store's omero metadata.

Scale is the pixel size (and z step) in micrometres; contrast limits come from the data.
cTIRF stored as uint16/float16 (`encoding` in its metadata) is shown in the input's
intensity units: the recorded scale and offset are undone (lazily for OME-Zarr).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.data.dataset import FORMAT as DATASET_FORMAT
from ctirf_live.data.dataset import MANIFEST
from ctirf_live.inference.encoding import decode, encoding_of
from ctirf_live.inference.naming import tiff_stem
from ctirf_live.inference.rawstore import is_zarr, tiff_files

LayerData = tuple[Any, dict[str, Any], str]
PathLike = str | Path
MAX_SAMPLE = 1 << 20  # pixels sampled for contrast limits


def get_reader(path: PathLike | Sequence[PathLike]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a reader function for what ctirf writes, else None."""
    if not isinstance(path, str | Path):
        return read_paths if path and all(get_reader(p) for p in path) else None
    p = Path(path)
    if _is_dataset(p) or (is_zarr(p) and (p / "zarr.json").is_file()) or _tiffs(p):
        return read_paths
    return None


def read_paths(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Layers of one path or several."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    return [layer for p in paths for layer in read_path(p)]


def read_path(path: PathLike) -> list[LayerData]:
    """Layers of a paired dataset, an OME-Zarr store or an OME-TIFF file/folder."""
    p = Path(path)
    if _is_dataset(p):
        return read_dataset(p)
    if is_zarr(p):
        return read_zarr(p)
    files = _tiffs(p)
    if not files:
        raise ValueError(
            f"{p} is not a ctirf dataset, OME-TIFF or OME-Zarr store; open a calibrate "
            "folder, a .ome.tiff (or its raw/ or ctirf/ folder) or a .ome.zarr"
        )
    return [layer for f in files for layer in read_tiff(f, multi=len(files) > 1)]


def _is_dataset(p: Path) -> bool:
    manifest = p / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == DATASET_FORMAT
    except (OSError, ValueError):
        return False


def _tiffs(p: Path) -> list[Path]:
    return [f for f in tiff_files(p) if f.suffix.lower() in (".tif", ".tiff")]


def contrast_limits(data: Any) -> tuple[float, float]:
    """0.1-99.9th percentiles of (a strided sample of) the data, never an empty range;
    of a lazy (zarr, dask) array only its middle plane is read."""
    if not isinstance(data, np.ndarray) and data.ndim > 2:
        data = data[tuple(n // 2 for n in data.shape[:-2])]
    arr = np.asarray(data)
    step = max(1, int(np.ceil((arr.size / MAX_SAMPLE) ** 0.5)))
    sample = arr[..., ::step, ::step]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, (0.1, 99.9)))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def read_dataset(folder: Path) -> list[LayerData]:
    """A paired dataset: EPI (registered) and TIRF, one plane per pair."""
    from ctirf_live.data.dataset import PairedDataset

    ds = PairedDataset.open(folder)
    if len(ds) == 0:
        raise ValueError(f"{folder} holds no pairs yet; collect some with `ctirf calibrate`")
    if len(ds.shapes()) > 1:
        raise ValueError(f"{folder} mixes frame sizes {sorted(ds.shapes())}; open the pair files")
    pairs = [ds.load_pair(i, registered=True) for i in range(len(ds))]
    px = float(ds.manifest["pixel_size_um"])
    files = [p.file for p in ds.pairs]
    layers = []
    for k, channel in enumerate(("EPI", "TIRF")):
        data = np.stack([pair[k] for pair in pairs])
        meta = {"ctirf": {"dataset": str(folder), "files": files, "optics": ds.manifest["optics"]}}
        kwargs = {
            "name": f"{channel} ({folder.name})",
            "scale": (1.0, px, px),
            "contrast_limits": contrast_limits(data),
            "metadata": meta,
            "blending": "additive" if k else "translucent",
            "visible": True,
        }
        layers.append((data, kwargs, "image"))
    return layers


def _split_channels(
    data: Any, axes: str, names: list[str], scale: dict[str, float], base: dict[str, Any]
) -> list[LayerData]:
    """One layer per channel (C removed from the axes), the others kept in order."""
    axes = axes.upper()
    rest = axes.replace("C", "")
    count = data.shape[axes.index("C")] if "C" in axes else 1
    # plain indexing keeps zarr/dask arrays lazy
    planes = [data[tuple(i if a == "C" else slice(None) for a in axes)] for i in range(count)]
    layers = []
    for i, plane in enumerate(planes):
        name = names[i] if i < len(names) and names[i] else f"channel {i}"
        kwargs = {
            **base,
            "name": f"{name} ({base['name']})" if base.get("name") else name,
            "scale": tuple(scale.get(a, 1.0) for a in rest),
            "contrast_limits": contrast_limits(plane),
            "metadata": {**base.get("metadata", {}), "axes": rest},
        }
        layers.append((plane, kwargs, "image"))
    return layers


def read_tiff(file: Path, multi: bool = False) -> list[LayerData]:
    """Every series of an OME-TIFF, split by channel."""
    from ctirf_live.data.tiff import read_ome_series

    series = read_ome_series(file)
    layers = []
    for s in series:
        info = s.info
        px = info.pixel_size_um or 1.0
        scale = {"Y": px, "X": px, "Z": info.z_step_um or 1.0}
        where = info.name or tiff_stem(s.file)
        label = where if multi or len(series) > 1 else ""
        base = {"name": label, "metadata": {"ctirf": info.metadata, "file": str(s.file)}}
        data = decode(s.data, encoding_of(info.metadata))
        layers += _split_channels(data, info.axes, info.channel_names, scale, base)
    return layers


def read_zarr(root: Path) -> list[LayerData]:
    """A single-image OME-Zarr or a bioformats2raw group of series (one per position)."""
    import dask.array
    import zarr

    attrs = json.loads((root / "zarr.json").read_text()).get("attributes", {})
    ome = attrs.get("ome", {})
    if "multiscales" in ome:
        images = [("", root, ome)]
    else:
        names = [p.name for p in sorted(root.iterdir()) if (p / "zarr.json").is_file()]
        images = []
        for name in names:
            doc = json.loads((root / name / "zarr.json").read_text())
            sub = doc.get("attributes", {}).get("ome", {})
            if "multiscales" in sub:
                images.append((name, root / name, sub))
    if not images:
        raise ValueError(f"{root} holds no OME-Zarr image; is it a complete store?")
    store_meta = attrs.get("ctirf", {})
    encoding = encoding_of(store_meta)
    gain, offset = (encoding or {}).get("scale", 1.0), (encoding or {}).get("offset", 0.0)
    layers = []
    for name, path, meta in images:
        ms = meta["multiscales"][0]
        axes = "".join(a["name"] for a in ms["axes"]).upper()
        dataset = ms["datasets"][0]
        scale_values = next(
            t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale"
        )
        scale = {a: float(s) for a, s in zip(axes, scale_values, strict=True)}
        array = decode(
            dask.array.from_zarr(zarr.open_array(path / dataset["path"], mode="r")), encoding
        )
        channels = (meta.get("omero") or {}).get("channels") or []
        labels = [str(ch.get("label", "")) for ch in channels]
        base = {"name": name if len(images) > 1 else "", "metadata": {"ctirf": store_meta}}
        for i, layer in enumerate(_split_channels(array, axes, labels, scale, base)):
            window = (channels[i] if i < len(channels) else {}).get("window") or {}
            if "start" in window and window.get("end", 0) > window["start"]:
                limits = (float(window["start"]), float(window["end"]))  # in stored units
                layer[1]["contrast_limits"] = tuple(v * gain + offset for v in limits)
            layers.append(layer)
    return layers
