"""How good is cTIRF on paired data: a score table and a Fig. 1c-like comparison figure.

Every method (raw EPI, the classical baselines, cTIRF) is scored against the same TIRF
reference with MS-SSIM and PSNR after the same per-image percentile normalisation
(`ctirf_live.evaluation.metrics`), as in the paper's Fig. 1e and Extended Data Fig. 2.
For simulated pairs the reference is the noise-free TIRF ground truth; for measured
pairs it is the measured TIRF. The table says which.

Axial resolution (`ctirf_live.evaluation.axial`) and the few-shot adaptation experiment
(`ctirf_live.evaluation.adaptation`) live in their own modules; their public functions
can also be imported from here.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctirf_live.config import Optics
from ctirf_live.data.loaders import PairSource
from ctirf_live.evaluation.baselines import BASELINES, NEEDS_PSF
from ctirf_live.evaluation.metrics import ms_ssim, psnr
from ctirf_live.inference.restorer import Restorer

_ELSEWHERE = {
    "adaptation_experiment": "ctirf_live.evaluation.adaptation",
    "adaptation_figure": "ctirf_live.evaluation.adaptation",
    "axial_figure": "ctirf_live.evaluation.axial",
    "axial_resolution": "ctirf_live.evaluation.axial",
    "restore_stack": "ctirf_live.evaluation.axial",
    "simulated_stack": "ctirf_live.evaluation.axial",
}

DEFAULT_BASELINES: tuple[str, ...] = ("rl", "wbns", "rolling_ball", "bf")
LABELS = {
    "epi": "EPI",
    "rl": "RL deconv.",
    "wbns": "WBNS",
    "rolling_ball": "rolling ball",
    "bf": "BF",
    "ctirf": "cTIRF",
}
REFERENCES = {
    "truth": "noise-free TIRF (simulated ground truth)",
    "tirf": "measured TIRF",
}
METRICS = ("ms_ssim", "psnr")


def __getattr__(name: str) -> Any:
    """Lazy re-exports (those modules import this one, so not at import time)."""
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EvaluationError(ValueError):
    """Data that cannot be evaluated as asked; the message says why."""


def baseline_parameters(
    optics: Optics, names: Sequence[str], psf: np.ndarray | None = None
) -> dict[str, dict[str, Any]]:
    """Keyword arguments for each baseline: RL gets `psf` (default: the optics' in-focus
    PSF), WBNS the PSF FWHM in pixels (0.51 lambda / NA); the others their defaults."""
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise EvaluationError(
            f"unknown baseline {', '.join(unknown)}; choose from {', '.join(BASELINES)}"
        )
    params: dict[str, dict[str, Any]] = {n: {} for n in names}
    if any(n in NEEDS_PSF for n in names):
        if psf is None:
            from ctirf_live.models.etnet import make_psf

            psf = make_psf(optics)
        for n in names:
            if n in NEEDS_PSF:
                params[n]["psf"] = np.asarray(psf, dtype=np.float32)
    if "wbns" in params:
        fwhm_px = 0.51 * optics.wavelength_um / optics.na / optics.pixel_size_um
        params["wbns"]["resolution_px"] = round(max(1.0, fwhm_px), 3)
    return params


def method_outputs(
    restorer: Restorer, epi: np.ndarray, parameters: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Raw EPI, each baseline of `parameters` and cTIRF for one frame, with seconds each.

    Keys keep the table's order: `epi`, the baselines, `ctirf`.
    """
    images: dict[str, np.ndarray] = {"epi": np.asarray(epi, dtype=np.float32)}
    seconds: dict[str, float] = {"epi": 0.0}
    for name, kwargs in parameters.items():
        started = time.perf_counter()
        images[name] = BASELINES[name](epi, **kwargs)
        seconds[name] = time.perf_counter() - started
    started = time.perf_counter()
    images["ctirf"] = restorer.restore(epi)
    seconds["ctirf"] = time.perf_counter() - started
    return images, seconds


def reference_kind(source: PairSource, reference: str = "auto") -> str:
    """`truth` or `tirf`: what `reference` (auto, truth, tirf) means for `source`."""
    if reference not in ("auto", "truth", "tirf"):
        raise EvaluationError(f"reference must be auto, truth or tirf, got {reference!r}")
    if reference == "auto":
        return "truth" if source.has_truth else "tirf"
    if reference == "truth" and not source.has_truth:
        raise EvaluationError(f"{source.description} has no ground truth; use the measured TIRF")
    return reference


def check_references(source: PairSource, kind: str) -> None:
    """Refuse pairs whose TIRF reference holds no image (a constant frame)."""
    if len(source) == 0:
        raise EvaluationError(f"{source.description} has no pairs to evaluate")
    for i, pair in enumerate(source.pairs):
        ref = pair.truth if kind == "truth" else pair.tirf
        if ref is None or not np.ptp(ref) > 0:
            raise EvaluationError(
                f"pair {i} ({pair.field}) has no TIRF image (constant frame); evaluation "
                "needs EPI/TIRF pairs: collect them with `ctirf calibrate`"
            )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass
class EvaluationTable:
    """Per-pair MS-SSIM / PSNR of every method against the TIRF reference.

    `scores[method][metric]` lists one value per pair (order of `fields`), `seconds`
    the processing time per frame. `reference` is `truth` or `tirf` (see `REFERENCES`).
    """

    methods: list[str]
    scores: dict[str, dict[str, list[float]]]
    seconds: dict[str, list[float]]
    reference: str
    source: str
    fields: list[str]
    model: str
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return len(self.fields)

    @property
    def reference_label(self) -> str:
        return REFERENCES[self.reference]

    def mean(self, method: str, metric: str = "ms_ssim") -> float:
        return float(np.mean(self.scores[method][metric]))

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per method: mean and s.d. over pairs, ms per frame."""
        out = []
        for m in self.methods:
            row: dict[str, Any] = {"method": m, "label": LABELS.get(m, m), "pairs": self.pairs}
            for metric in METRICS:
                values = np.asarray(self.scores[m][metric], dtype=np.float64)
                finite = bool(np.isfinite(values).all())  # PSNR of identical images is inf
                row[f"{metric}_mean"] = float(np.mean(values)) if finite else None
                row[f"{metric}_sd"] = float(np.std(values)) if finite else None
            row["ms_per_frame"] = 1000.0 * float(np.mean(self.seconds[m]))
            row["reference"] = self.reference
            out.append(row)
        return out

    def median_pair(self, method: str = "ctirf") -> int:
        """Index of the pair whose `method` MS-SSIM is the median (a representative one)."""
        values = np.asarray(self.scores[method]["ms_ssim"])
        return int(np.argsort(values)[(len(values) - 1) // 2])

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "reference_label": self.reference_label,
            "source": self.source,
            "model": self.model,
            "pairs": self.pairs,
            "fields": self.fields,
            "normalisation": "each image min(1, I / p98) before scoring (paper Eq. 1)",
            "summary": self.rows(),
            "per_pair": {
                m: {k: [_finite(v) for v in vals] for k, vals in self.scores[m].items()}
                for m in self.methods
            },
            "parameters": _jsonable_parameters(self.parameters),
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.rows()
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def rich_table(self) -> Any:
        """A rich Table: mean +- s.d. per method, best MS-SSIM in bold."""
        from rich.table import Table

        table = Table(title=f"{self.pairs} pairs vs {self.reference_label}")
        table.add_column("method")
        table.add_column("MS-SSIM", justify="right")
        table.add_column("PSNR (dB)", justify="right")
        table.add_column("ms / frame", justify="right")
        rows = self.rows()
        best = max(rows, key=lambda r: r["ms_ssim_mean"] or -1.0)["method"]
        for r in rows:
            style = "bold" if r["method"] == best else None
            table.add_row(
                r["label"],
                _pm(r["ms_ssim_mean"], r["ms_ssim_sd"], 3),
                _pm(r["psnr_mean"], r["psnr_sd"], 2),
                f"{r['ms_per_frame']:.0f}",
                style=style,
            )
        return table


def _pm(mean: float | None, sd: float | None, digits: int) -> str:
    if mean is None:
        return "inf"
    return f"{mean:.{digits}f} ± {sd or 0.0:.{digits}f}"


def _jsonable_parameters(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kwargs in params.items():
        out[name] = {
            k: (f"array {list(np.shape(v))}" if isinstance(v, np.ndarray) else v)
            for k, v in kwargs.items()
        }
    return out


def evaluate_pairs(
    restorer: Restorer,
    source: PairSource,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    psf: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
    reference: str = "auto",
) -> EvaluationTable:
    """Score raw EPI, each baseline and cTIRF on every pair of `source`.

    `reference`: `auto` (noise-free ground truth when every pair has one, else the
    measured TIRF), `truth` or `tirf`. `psf` is RL's kernel (default: the in-focus PSF
    of the data's optics). `progress(done, total)` is called after each pair.
    """
    kind = reference_kind(source, reference)
    check_references(source, kind)
    params = baseline_parameters(source.optics, list(baselines), psf)
    methods = ["epi", *params, "ctirf"]
    scores: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for i, pair in enumerate(source.pairs):
        target = pair.truth if kind == "truth" else pair.tirf
        images, took = method_outputs(restorer, pair.epi, params)
        for m in methods:
            scores[m]["ms_ssim"].append(ms_ssim(images[m], target))
            scores[m]["psnr"].append(psnr(images[m], target))
            seconds[m].append(took[m])
        if progress is not None:
            progress(i + 1, len(source))
    return EvaluationTable(
        methods=methods,
        scores=scores,
        seconds=seconds,
        reference=kind,
        source=source.description,
        fields=source.fields,
        model=str(restorer.metadata.get("path") or restorer.model.name),
        parameters=params,
    )


# ---------------------------------------------------------------------------- figure


def pick_region(image: np.ndarray, size: int | None = None) -> tuple[int, int, int, int]:
    """(y, x, h, w) of the square window (a quarter of the smaller side by default) with
    the most fine structure: the largest mean band-pass (difference of Gaussians, 1 and
    4 px) energy, so filaments win over a bright but smooth cell edge."""
    from scipy import ndimage

    arr = np.asarray(image, dtype=np.float64)
    ny, nx = arr.shape
    size = min(int(size or max(16, min(ny, nx) // 4)), ny, nx)
    detail = (ndimage.gaussian_filter(arr, 1.0) - ndimage.gaussian_filter(arr, 4.0)) ** 2
    step = max(1, size // 4)
    best, where = -1.0, (0, 0)
    for y in range(0, ny - size + 1, step):
        for x in range(0, nx - size + 1, step):
            energy = float(detail[y : y + size, x : x + size].mean())
            if energy > best:
                best, where = energy, (y, x)
    return where[0], where[1], size, size


def _default_profile(
    image: np.ndarray, region: tuple[int, int, int, int]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """A line through the region's centre across its dominant structures: along the
    main gradient direction of the structure tensor, so it crosses filaments."""
    from scipy import ndimage

    y, x, h, w = region
    patch = ndimage.gaussian_filter(np.asarray(image, np.float64)[y : y + h, x : x + w], 1.0)
    gy, gx = np.gradient(patch)
    phi = 0.5 * math.atan2(2.0 * float(np.sum(gx * gy)), float(np.sum(gx**2 - gy**2)))
    dy, dx = math.sin(phi), math.cos(phi)
    half = (min(h, w) / 2 - 1) / max(abs(dy), abs(dx))
    cy, cx = y + (h - 1) / 2, x + (w - 1) / 2
    return (cy - half * dy, cx - half * dx), (cy + half * dy, cx + half * dx)


def _sample_line(image: np.ndarray, line: tuple[tuple[float, float], tuple[float, float]]):
    from scipy import ndimage

    (y0, x0), (y1, x1) = line
    n = max(2, math.ceil(math.hypot(y1 - y0, x1 - x0)) + 1)
    ys, xs = np.linspace(y0, y1, n), np.linspace(x0, x1, n)
    values = ndimage.map_coordinates(np.asarray(image, np.float64), [ys, xs], order=1)
    return np.hypot(ys - y0, xs - x0), values


def _contrast(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, (0.5, 99.7))
    return float(lo), float(hi if hi > lo else lo + 1.0)


def comparison_figure(
    epi: np.ndarray,
    baselines: Mapping[str, np.ndarray],
    ctirf: np.ndarray,
    tirf: np.ndarray,
    path: str | Path,
    region: tuple[int, int, int, int] | None = None,
    profile: tuple[tuple[float, float], tuple[float, float]] | None = None,
    *,
    pixel_size_um: float | None = None,
    scores: Mapping[str, float] | None = None,
    tirf_label: str = "TIRF",
    title: str | None = None,
) -> Path:
    """A PNG like the paper's Fig. 1c: EPI | baselines | cTIRF | TIRF.

    Top row: full views (own contrast: 0.5-99.7th percentile) with the magnified
    `region` (y, x, h, w; default `pick_region` on the TIRF) boxed; middle row: the
    region; bottom: intensity along `profile` ((y0, x0), (y1, x1) in frame pixels,
    default a line across the region's dominant structures), each method divided by its
    maximum on the line. `scores` (method -> MS-SSIM) are printed in the titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    panels = {"epi": epi, **dict(baselines), "ctirf": ctirf, "tirf": tirf}
    shapes = {np.shape(v) for v in panels.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"all images must be 2D frames of one shape, got {sorted(shapes)}")
    region = region or pick_region(tirf)
    ry, rx, rh, rw = region
    profile = profile or _default_profile(tirf, region)
    labels = {k: LABELS.get(k, k) for k in panels}
    labels["tirf"] = tirf_label
    colors = _profile_colors(list(panels))

    n = len(panels)
    fig = plt.figure(figsize=(2.1 * n, 2.1 * 2 + 2.4), layout="constrained")
    grid = fig.add_gridspec(3, n, height_ratios=[1, 1, 1.1])
    for col, (name, image) in enumerate(panels.items()):
        lo, hi = _contrast(image)
        top = fig.add_subplot(grid[0, col])
        top.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        top.add_patch(Rectangle((rx - 0.5, ry - 0.5), rw, rh, fill=False, ec="w", lw=1.0, ls="--"))
        heading = labels[name]
        if scores and name in scores:
            heading += f"\nMS-SSIM {scores[name]:.3f}"
        top.set_title(heading, fontsize=9)
        zoom = fig.add_subplot(grid[1, col])
        zoom.imshow(
            image[ry : ry + rh, rx : rx + rw],
            cmap="gray",
            vmin=lo,
            vmax=hi,
            interpolation="nearest",
        )
        (y0, x0), (y1, x1) = profile
        zoom.plot([x0 - rx, x1 - rx], [y0 - ry, y1 - ry], color=colors[name], lw=1.2)
        zoom.set_xlim(-0.5, rw - 0.5)
        zoom.set_ylim(rh - 0.5, -0.5)
        for ax in (top, zoom):
            ax.set_xticks([])
            ax.set_yticks([])
        if col == 0 and pixel_size_um:
            _scale_bar(top, image.shape, pixel_size_um)
            _scale_bar(zoom, (rh, rw), pixel_size_um)
    plot = fig.add_subplot(grid[2, :])
    for name, image in panels.items():
        dist, values = _sample_line(image, profile)
        peak = float(np.max(values))
        norm = values / peak if peak > 0 else values
        xs = dist * pixel_size_um if pixel_size_um else dist
        style = "--" if name == "tirf" else "-"
        width = 1.8 if name in ("ctirf", "tirf") else 1.0
        plot.plot(xs, norm, style, color=colors[name], lw=width, label=labels[name])
    plot.set_xlabel("distance along the line (µm)" if pixel_size_um else "distance (px)")
    plot.set_ylabel("intensity / max")
    plot.set_ylim(bottom=min(0.0, plot.get_ylim()[0]))
    plot.legend(fontsize=8, ncol=min(n, 7), loc="upper center", bbox_to_anchor=(0.5, 1.22))
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _profile_colors(names: Sequence[str]) -> dict[str, str]:
    fixed = {"epi": "0.55", "ctirf": "tab:red", "tirf": "black"}
    others = iter(["tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:cyan"])
    return {n: fixed[n] if n in fixed else next(others, "tab:olive") for n in names}


def _scale_bar(ax: Any, shape: tuple[int, ...], pixel_size_um: float) -> None:
    """A white bar of a round length near a fifth of the width, bottom right."""
    width_um = shape[1] * pixel_size_um
    target = width_um / 5
    length = max((v for v in (0.5, 1, 2, 3, 5, 10, 20, 50, 100) if v <= target), default=target)
    px = length / pixel_size_um
    y = shape[0] * 0.93
    x1 = shape[1] * 0.95
    ax.plot([x1 - px, x1], [y, y], color="w", lw=2.5, solid_capstyle="butt")
    ax.text(
        x1 - px / 2,
        y - shape[0] * 0.03,
        f"{length:g} µm",
        color="w",
        ha="center",
        va="bottom",
        fontsize=7,
    )


def hold_out_trained(source: PairSource, metadata: Mapping[str, Any]) -> tuple[PairSource, str]:
    """Drop the pairs a checkpoint was trained or selected on; say what was done.

    Returns (the pairs to score, a note: empty when nothing overlapped). When every
    pair trained the model, all are kept and the note says the scores are optimistic.
    """
    prov = metadata.get("provenance") or {}
    used = set(prov.get("train_files") or []) | set(prov.get("val_files") or [])
    overlap = [f for f in source.files if f in used]
    if not overlap:
        return source, ""
    kept = source.without_files(overlap)
    if len(kept) == 0:
        return source, (
            f"every one of the {len(source)} pairs trained or selected this model: the scores "
            "below are optimistic; collect held-out pairs with `ctirf calibrate` to score it"
        )
    return kept, (
        f"held out {len(overlap)} of {len(source)} pairs that trained or selected this model; "
        f"scoring the other {len(kept)}"
    )
