"""Configuration models: the one place where ctirf-live's defaults live.

`Optics` describes what the network and the PSF need to know about an objective and
camera. Training and live settings sit beside it so the CLI, GUI and Python API share
the same defaults and the same validation messages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-facing configuration problem: the message says what is wrong and what to do."""


class Optics(BaseModel):
    """Optical parameters of one objective + camera combination.

    Frozen (hashable) so PSFs can be cached per optics. Lengths are in micrometres,
    wavelengths in nanometres.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    objective: str = Field("60X", description="objective preset name, e.g. '60X'")
    na: float = Field(1.5, gt=0, description="numerical aperture")
    emission_wavelength_nm: float = Field(670.0, ge=200, le=2000)
    excitation_wavelength_nm: float = Field(638.0, ge=200, le=2000)
    immersion_index: float = Field(1.518, ge=1.0, le=2.0)
    sample_index: float = Field(1.33, ge=1.0, le=2.0)
    pixel_size_um: float = Field(0.0975, gt=0, le=100)
    z_step_um: float = Field(0.2, gt=0, le=100)

    @model_validator(mode="after")
    def _physical(self) -> Optics:
        if self.na >= self.immersion_index:
            raise ValueError(
                f"NA {self.na} must be smaller than the immersion index "
                f"{self.immersion_index}; check the objective's NA and immersion medium"
            )
        return self

    @property
    def wavelength_um(self) -> float:
        """Emission wavelength in micrometres."""
        return self.emission_wavelength_nm / 1000.0

    @property
    def nyquist_pixel_um(self) -> float:
        """Largest pixel size that still samples the lateral cut-off (lambda / 4 NA)."""
        return self.wavelength_um / (4 * self.na)

    @property
    def supports_tirf(self) -> bool:
        """TIRF needs NA above the sample's refractive index."""
        return self.na > self.sample_index

    def describe(self) -> str:
        """One-line human description."""
        return (
            f"{self.objective} NA {self.na:g}, em {self.emission_wavelength_nm:g} nm, "
            f"n_imm {self.immersion_index:g}, n_sample {self.sample_index:g}, "
            f"pixel {self.pixel_size_um * 1000:g} nm, z step {self.z_step_um * 1000:g} nm"
        )


def make_optics(**kwargs: object) -> Optics:
    """Build `Optics`, turning pydantic's validation report into one clear line."""
    try:
        return Optics(**kwargs)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None


_UNION_TAG = re.compile(r"^[A-Z]\w*$|[\[\]]")  # a union member's class name in a `loc`
MAX_ERRORS_SHOWN = 3


def validation_message(exc: ValidationError, limit: int = MAX_ERRORS_SHOWN) -> str:
    """Pydantic's report as one line naming each field: `invalid Optics: na: must be > 0`.

    Unions (useq's time and z plans) report every member they tried; only the members
    that fit the input best (fewest missing fields) are named, without their class names.
    """
    lines: list[str] = []
    members: dict[tuple[str, ...], dict[str, list[str]]] = {}
    ranks: dict[tuple[tuple[str, ...], str], list[int]] = {}
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        tag = next((i for i, p in enumerate(loc) if _UNION_TAG.search(p)), None)
        if tag is None:
            lines.append(_line(loc, err))
            continue
        prefix, rest = tuple(loc[:tag]), [p for p in loc[tag + 1 :] if not _UNION_TAG.search(p)]
        members.setdefault(prefix, {}).setdefault(loc[tag], []).append(_line([*prefix, *rest], err))
        rank = ranks.setdefault((prefix, loc[tag]), [0, 0])
        rank[0] += err.get("type") == "missing"
        rank[1] += 1
    for prefix, tried in members.items():
        best = min(tuple(ranks[(prefix, name)]) for name in tried)
        fits = [
            ", ".join(errs) for name, errs in tried.items() if tuple(ranks[(prefix, name)]) == best
        ]
        lines.append(" or ".join(dict.fromkeys(fits)))
    lines = list(dict.fromkeys(lines))
    shown = "; ".join(lines[:limit])
    more = len(lines) - limit
    return f"invalid {exc.title}: {shown}" + (f"; and {more} more" if more > 0 else "")


def _line(loc: list[str], err: Any) -> str:
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def load_optics_file(path: str | Path) -> dict[str, Optics]:
    """Read a `<config>.optics.yaml` file: a mapping of objective preset -> optics.

    Format::

        objectives:
          60X: {na: 1.5, emission_wavelength_nm: 670, immersion_index: 1.518,
                sample_index: 1.33, pixel_size_um: 0.0975}
        defaults: {z_step_um: 0.2}          # optional, merged under every objective
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"optics file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"optics file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("objectives"), dict):
        raise ConfigError(
            f"optics file {path} must contain an 'objectives:' mapping "
            "(preset name -> na, emission_wavelength_nm, immersion_index, ...)"
        )
    defaults = raw.get("defaults") or {}
    out: dict[str, Optics] = {}
    for name, values in raw["objectives"].items():
        merged = {**defaults, **(values or {}), "objective": str(name)}
        try:
            out[str(name)] = Optics(**merged)
        except ValidationError as exc:
            raise ConfigError(f"{path}: objective {name}: {validation_message(exc)}") from None
    return out


class LossWeights(BaseModel):
    """Weights of the hybrid loss (paper Eq. 2-4).

    `L(a, b) = a1*L1 + a2*L2 + a3*(1 - MS-SSIM)`;
    `R = b1*TV(g) + b2*TV(b) + b3*|g|_1`. The paper does not publish its values; these
    defaults keep each term of the same order on p98-normalised images.
    """

    model_config = ConfigDict(frozen=True)

    a1: float = 1.0
    a2: float = 1.0
    a3: float = 1.0
    b1: float = 0.01
    b2: float = 0.01
    b3: float = 0.001
    self_supervised: float = 1.0
    leak: float = Field(
        0.0,
        ge=0,
        description="out-of-layer emphasis: the supervised L1/L2 weights each pixel by "
        "1 + leak * max(input - target, 0), renormalised to mean 1, so light the target "
        "rejects (EPI haze, structure above the TIRF layer) costs more to keep (0: off)",
    )
    dark: float = Field(
        0.0,
        ge=0,
        le=1,
        description="dark-target emphasis: the supervised L1/L2 weights each pixel by "
        "(max(target, 0) + DARK_FLOOR) ** -dark, renormalised to mean 1, so an error costs "
        "about as much where the TIRF target is dim as where it is bright (a dim filament "
        "above the layer is a small absolute error); multiplies the leak weight (0: off)",
    )
    dim: float = Field(
        0.0,
        ge=0,
        le=2,
        description="dim-input emphasis: the supervised L1/L2 weights each pixel by "
        "(max(input, 0) + DARK_FLOOR) ** -dim, renormalised to mean 1, so a dim filament "
        "above the layer (dim in the input as well) costs more to keep than its small "
        "absolute error; multiplies the other weights (0: off)",
    )
    axial_coarse: float = Field(
        0.0,
        ge=0,
        description="3D only: weight of a missing-cone prior, the mean squared Z difference "
        "of g pooled over AXIAL_POOL_PX laterally (widefield passes no axial frequencies at "
        "low lateral ones, so nothing else stops plane-to-plane brightness ringing; 0: off)",
    )


DISTILL_AXIAL_PRIOR = 50.0
"""Default `LossWeights.axial_coarse` of `ctirf distill`. Measured when continuing the
ringing ET3dNet v1: the prior cost 0.048 in the first epoch (a tenth of the loss) and
0.005 two epochs later, once the plane-to-plane ringing was gone."""


class TrainSettings(BaseModel):
    """Training recipe (paper Methods 4.5): AdamW 5e-4, warm-up cosine, batch 4."""

    epochs: int = Field(200, ge=1)
    warmup_epochs: int = Field(5, ge=0)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(4, ge=1)
    crop: int = Field(512, ge=32)
    rotation_probability: float = Field(0.8, ge=0, le=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    percentile: float = Field(98.0, gt=0, le=100)
    variance_scaling: Literal["weight", "target", "none"] = "weight"
    target_ceiling: float | None = Field(
        None,
        gt=0,
        description=(
            "clip normalised TIRF targets here; None (default): no clip. Paper Eq. 1 clips"
            " at 1, which flattens the in-focus structures a model must keep brighter than"
            " those a few hundred nm up (RESULTS 'Probe: Eq. 1's clip')"
        ),
    )
    input_ceiling: float | None = Field(
        1.0,
        gt=0,
        description="clip normalised EPI inputs here (Eq. 1: 1; recorded in the checkpoint)",
    )
    loss: LossWeights = LossWeights()


class LiveSettings(BaseModel):
    """Live processing defaults."""

    policy: Literal["preview", "record"] = "preview"
    channels: tuple[str, ...] = ("EPI",)
    queue_size: int = Field(4, ge=1)
    tile: int = Field(512, ge=64)
    overlap: int = Field(32, ge=0)
    half_precision: bool = True
    threads: int | None = Field(
        None, ge=1, description="model CPU threads; None: cores - 1, at least 1"
    )
    backend: Literal["auto", "torch", "onnx"] = "auto"


ILLUMINATION_GROUP = "Illumination"
EPI_PRESET = "EPI"
TIRF_PRESET = "TIRF"
OBJECTIVE_GROUP = "Objective"
