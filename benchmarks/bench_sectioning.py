"""Does the simulator pose the sectioning problem, and does the model solve it?

    python -m benchmarks.bench_sectioning                       # shipped model
    python -m benchmarks.bench_sectioning --model runs/x/best.safetensors --fields 4

Three parts, written to the "Sectioning" section of benchmarks/RESULTS.md:

1. What the simulated frames are made of, per specimen family, on held-out fields
   (slide seed 5, never trained on): the share of the frame under cells, the mean cell
   height, the share of the EPI frame's sub-micron detail (spatial frequencies above
   1 cycle/um, energy) that comes from structure more than 0.3 um above the coverslip,
   and raw EPI's MS-SSIM to the noise-free TIRF.
2. Filament survival (`ctirf_live.evaluation.sectioning`): identical filaments at
   z = 0, 0.2, 0.5, 1, 2 um inside a dense F-actin cell, bright and dim, for TIRF, raw
   EPI, the classical baselines and cTIRF.
3. MS-SSIM and PSNR to the noise-free TIRF of raw EPI, each baseline and cTIRF on the
   held-out fields of each family.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from benchmarks.results import update_section
from ctirf_live.data.loaders import PairSource
from ctirf_live.evaluation.identifiability import height_lookalikes, lookalike_markdown
from ctirf_live.evaluation.metrics import ms_ssim, psnr
from ctirf_live.evaluation.report import baseline_parameters, method_outputs
from ctirf_live.evaluation.sectioning import build_scene, run_sectioning, sectioning_methods
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import load_model
from ctirf_live.sim.sample import FAMILIES, field_statistics
from ctirf_live.sim.scope import SimulatedMicroscope

SECTION = "Sectioning: simulated specimens, filament survival, held-out scores"
HELD_OUT_SEED = 5
DETAIL_CYCLES_PER_UM = 1.0


def _highpass_energy(image: np.ndarray, pixel_um: float) -> float:
    spec = np.abs(np.fft.rfft2(image - image.mean())) ** 2
    fy = np.fft.fftfreq(image.shape[0], pixel_um)[:, None]
    fx = np.fft.rfftfreq(image.shape[1], pixel_um)[None, :]
    return float(spec[np.hypot(fy, fx) > DETAIL_CYCLES_PER_UM].sum())


def detail_from_above(scope: SimulatedMicroscope, z_split_um: float = 0.3) -> float:
    """Share of the noise-free EPI frame's sub-micron detail energy from above `z_split_um`."""
    f = scope._field()
    z = f.axial.z
    original = scope._plane_weights
    parts = []
    try:
        for mask in (z <= z_split_um, z > z_split_um):
            scope._plane_weights = lambda _f, _mode, m=mask: m.astype(float)  # type: ignore[method-assign]
            parts.append(scope._image("EPI", drift=False))
    finally:
        scope._plane_weights = original  # type: ignore[method-assign]
    p = scope.pixel_size_um()
    low, high = (_highpass_energy(img, p) for img in parts)
    return high / (low + high)


def frame_statistics(source: PairSource, family: str) -> dict[str, float]:
    """Coverage, height, detail from above 0.3 um and EPI MS-SSIM over a family's fields."""
    scope = SimulatedMicroscope(seed=HELD_OUT_SEED, drift_px=0.0, family=family)
    scope.centre_roi(source.pairs[0].epi.shape[0])
    side = scope.frame_shape[0] * scope.pixel_size_um()
    rows = []
    for pair in source.pairs:
        _, coords = pair.field.rsplit(":", 1)
        x, y = (float(v) for v in coords.split(","))
        scope.xy_um = (x, y)
        stats = field_statistics(HELD_OUT_SEED, (x, y), side, family)
        rows.append(
            (
                stats["cell_fraction"],
                stats["mean_height_um"],
                detail_from_above(scope),
                ms_ssim(pair.epi, pair.truth),
            )
        )
        scope.clear_cache()
    arr = np.asarray(rows)
    keys = ("cell_fraction", "mean_height_um", "detail_above_0p3", "epi_ms_ssim")
    return {k: float(v) for k, v in zip(keys, arr.mean(0), strict=True)}


def held_out_scores(
    restorer: Restorer, source: PairSource, baselines: list[str]
) -> dict[str, dict[str, float]]:
    """Mean and s.d. of MS-SSIM / PSNR to the noise-free TIRF, per method."""
    params = baseline_parameters(restorer.optics, baselines)
    scores: dict[str, list[tuple[float, float]]] = {}
    for pair in source.pairs:
        images, _ = method_outputs(restorer, pair.epi, params)
        for name, img in images.items():
            scores.setdefault(name, []).append((ms_ssim(img, pair.truth), psnr(img, pair.truth)))
    out = {}
    for name, vals in scores.items():
        a = np.asarray(vals)
        out[name] = {
            "ms_ssim": float(a[:, 0].mean()),
            "ms_ssim_sd": float(a[:, 0].std()),
            "psnr": float(a[:, 1].mean()),
            "psnr_sd": float(a[:, 1].std()),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="et2dnet_s0_60x_sim")
    parser.add_argument("--fields", type=int, default=4, help="held-out fields per family")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--baselines", default="rl,wbns,rolling_ball,bf")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    baselines = [b for b in args.baselines.split(",") if b]

    started = time.perf_counter()
    model, meta = load_model(args.model)
    restorer = Restorer(model, device="cpu", metadata=meta)
    scene = build_scene(objective="60X")
    sectioning = run_sectioning(sectioning_methods(restorer, baselines), scene)
    lookalikes = height_lookalikes(scene)
    families = {}
    for family in FAMILIES:
        source = PairSource.synthetic(
            args.fields,
            "60X",
            seed=HELD_OUT_SEED,
            roi=args.size,
            exposure_ms=(10.0, 100.0),
            progress=False,
            families=(family,),
        )
        families[family] = {
            "frames": frame_statistics(source, family),
            "scores": held_out_scores(restorer, source, baselines),
        }
    record = {
        "model": str(meta.get("path", args.model)),
        "sectioning": sectioning.to_dict(),
        "lookalikes": [r.to_dict() for r in lookalikes],
        "families": families,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    text = report(record, sectioning.markdown(), args, lookalike_markdown(lookalikes))
    print(text)
    if not args.no_write:
        update_section(SECTION, text)


def report(
    record: dict, survival_table: str, args: argparse.Namespace, lookalike_table: str = ""
) -> str:
    """The RESULTS.md section."""
    stats = [
        "| family | cell fraction | mean cell height (um) | sub-micron EPI detail from "
        "> 0.3 um | raw EPI MS-SSIM to TIRF |",
        "|---|---|---|---|---|",
    ]
    for family, r in record["families"].items():
        f = r["frames"]
        stats.append(
            f"| {family} | {f['cell_fraction']:.2f} | {f['mean_height_um']:.2f} | "
            f"{100 * f['detail_above_0p3']:.1f}% | {f['epi_ms_ssim']:.3f} |"
        )
    methods = list(next(iter(record["families"].values()))["scores"])
    scores = [
        "| method | " + " | ".join(record["families"]) + " |",
        "|---" * (len(record["families"]) + 1) + "|",
    ]
    for m in methods:
        cells = []
        for r in record["families"].values():
            s = r["scores"][m]
            cells.append(f"{s['ms_ssim']:.3f} +- {s['ms_ssim_sd']:.3f} / {s['psnr']:.1f} dB")
        scores.append(f"| {m} | " + " | ".join(cells) + " |")
    command = f"python -m benchmarks.bench_sectioning --model {args.model} --fields {args.fields}"
    return f"""Command: `{command}`
({date.today().isoformat()}, {platform.machine()} CPU, {record["seconds"] / 60:.1f} min).
Model: `{record["model"]}`.

Simulated frames ({args.fields} held-out {args.size}x{args.size} fields per family, slide seed
{HELD_OUT_SEED}, 60X rig, exposures 10-100 ms; detail = energy above
{DETAIL_CYCLES_PER_UM:g} cycle/um of the noise-free EPI frame):

{chr(10).join(stats)}

Filament survival (added cross-section peak relative to the filament on the coverslip;
TIRF and EPI noise-free references, the rest from one noisy 50 ms EPI frame):

{survival_table}

What the frame says about each height (`ctirf_live.evaluation.identifiability`): the best
on-glass look-alike of each raised filament (the coverslip filament, scaled and blurred
sideways, as a wider bundle on the glass would be) and the residual it leaves in the
noise-free EPI cross-section; separation is that residual's matched-filter SNR along the
filament in this frame's noise, an upper bound on what any single-frame method can use:

{lookalike_table}

Held-out MS-SSIM / PSNR to the noise-free TIRF (camera units), mean +- s.d.:

{chr(10).join(scores)}
"""


if __name__ == "__main__":
    main()
