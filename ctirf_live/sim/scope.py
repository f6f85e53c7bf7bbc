"""A simulated EPI/TIRF microscope: stage, focus, objectives, illumination and sCMOS camera.

Image formation (Fourier space, per field):

- The specimen (`ctirf_live.sim.sample`) is rendered over the camera ROI plus a margin
  of `PSF_MARGIN_UM` (what lies outside the ROI still blurs into it) at the planes
  `SAMPLE_PLANES_UM`: 0.05 um apart up to 0.5 um (where TIRF's 50-200 nm evanescent
  field needs fine sampling), 0.1 um to 1.6 um, 0.2 um to 3 um and 0.4 um to 6.6 um
  (deep planes are always far from focus near the coverslip and only add haze; fewer of
  them keep a 2048x2048 field near 0.6 GB). The rFFT of every plane, cut to the band the
  objective passes (|f| < 2 NA / lambda), is cached per field (stage position,
  objective, ROI, slide seed).
- An EPI frame at focal height z_f is sum_k F_k * OTF(z_k - z_f) with the Born & Wolf
  OTF (`ctirf_live.optics.psf`, cached per defocus), then one inverse FFT. TIRF weights
  plane k by exp(-z_k / d), d the evanescent penetration depth of the TIRF angle
  (`ctirf_live.optics.tirf`; below the critical angle d is infinite). Moving focus
  reuses the plane spectra; stage drift is a phase ramp.
- A smooth illumination profile (different for EPI and TIRF) multiplies the image; the
  excitation is concentrated on the field, so per-pixel brightness scales with
  1 / pixel area and both objectives give similar counts.
- sCMOS camera: QE, Poisson shot noise, Gaussian read noise, gain, offset, 16-bit
  saturation, on-sensor binning (sums pixels; read noise of the summed pixels).

Frames are reproducible: the noise of frame n comes from an RNG seeded by (seed, n),
the drift of the n-th illumination switch from (seed, n).
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import fft as sfft

from ctirf_live.config import Optics
from ctirf_live.optics.psf import born_wolf_psf, depth_psf, focal_shift_factor
from ctirf_live.optics.tirf import (
    angle_for_depth_deg,
    check_angle_within_na,
    penetration_depth_um,
)
from ctirf_live.sim.sample import (
    DEFAULT_FAMILY,
    FILAMENT_SIGMA_UM,
    TOP_UM,
    AxialSampling,
    SpecimenRenderer,
    check_family,
)

SENSOR_SHAPE = (2048, 2048)
CAMERA_PIXEL_UM = 6.5
MAX_ADU = 65535

SAMPLE_PLANES_UM = np.round(
    np.concatenate(
        [
            np.arange(0.0, 0.5001, 0.05),
            np.arange(0.6, 1.6001, 0.1),
            np.arange(1.8, 3.0001, 0.2),
            np.arange(3.4, 6.6001, 0.4),
            np.arange(7.4, 11.4001, 0.8),
            np.arange(12.6, 15.0001, 1.2),
        ]
    ),
    4,
)
PSF_MARGIN_UM = 7.0
SECTION_THICKNESS_UM = 0.1
REFERENCE_PIXEL_UM = 0.0975
# photons per specimen amount unit per ms of exposure, at the reference pixel size
PHOTONS_PER_UNIT_MS = {"EPI": 60.0, "TIRF": 100.0}
# autofluorescence of the medium, amount units per um^3: EPI excites the whole column
MEDIUM_PER_UM3 = 0.02
MEDIUM_COLUMN_UM = 100.0
MODES = ("EPI", "TIRF")
BINNINGS = (1, 2, 4)

_PLANE_CHUNK = 8
_OTF_CACHE_BYTES = 512 * 2**20
_FIELD_CACHE_BYTES = 1024 * 2**20
_WORKERS = 2
_DRIFT_LIMIT_PX = 1.9


@dataclass(frozen=True)
class Camera:
    """An sCMOS camera: mean calibration and its per-pixel spread (fixed pattern).

    Each pixel has its own offset (ADU), gain and read noise (electrons), drawn once
    from `serial`; the maps are what a camera calibration would measure.
    """

    name: str
    quantum_efficiency: float
    electrons_per_adu: float
    offset_adu: float
    read_noise_e: float
    offset_sd_adu: float = 1.5
    gain_sd: float = 0.015
    read_noise_sigma: float = 0.35  # lognormal spread of per-pixel read noise
    serial: int = 0

    def maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Full-sensor (offset ADU, relative gain, read noise e) maps, read-only."""
        return _camera_maps(self)


@functools.lru_cache(maxsize=4)
def _camera_maps(camera: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([camera.serial, 0xCA3])
    shape = SENSOR_SHAPE
    offset = camera.offset_adu + camera.offset_sd_adu * rng.standard_normal(shape, np.float32)
    gain = 1.0 + camera.gain_sd * rng.standard_normal(shape, np.float32)
    sigma = camera.read_noise_sigma
    read = camera.read_noise_e * np.exp(
        sigma * rng.standard_normal(shape, np.float32) - 0.5 * sigma**2
    )
    out = (offset.astype(np.float32), gain.astype(np.float32), read.astype(np.float32))
    for arr in out:
        arr.setflags(write=False)
    return out


@dataclass(frozen=True)
class SimRig:
    """Everything that differs between two microscopes besides the specimen.

    Optics (objective, wavelengths, pixel), camera, the TIRF penetration depth its laser
    angle is set to, the share of scattered (non-evanescent) TIRF excitation and its
    decay length, and which illumination profile its light path has.
    """

    optics: Optics
    camera: Camera
    tirf_depth_um: float = 0.1
    scatter_fraction: float = 0.1
    scatter_length_um: float = 5.0
    profile: int = 0


CAMERA_A = Camera("sCMOS A (Orca-Flash-like)", 0.8, 0.5, 100.0, 1.5, serial=11)
CAMERA_B = Camera(
    "sCMOS B (back-illuminated)", 0.95, 0.24, 400.0, 1.0, offset_sd_adu=3.0, serial=23
)
# kept for callers that want the mean camera calibration of the default rig
QUANTUM_EFFICIENCY = CAMERA_A.quantum_efficiency
ELECTRONS_PER_ADU = CAMERA_A.electrons_per_adu
OFFSET_ADU = CAMERA_A.offset_adu
READ_NOISE_E = CAMERA_A.read_noise_e
DEFAULT_PENETRATION_DEPTH_UM = 0.1


def _objective(name: str, na: float, pixel_um: float, emission: float, excitation: float) -> Optics:
    return Optics(
        objective=name,
        na=na,
        emission_wavelength_nm=emission,
        excitation_wavelength_nm=excitation,
        immersion_index=1.518,
        sample_index=1.33,
        pixel_size_um=pixel_um,
        z_step_um=0.2,
    )


DEFAULT_RIGS: dict[str, SimRig] = {
    "60X": SimRig(_objective("60X", 1.5, 0.0975, 670.0, 638.0), CAMERA_A, 0.1, 0.1, 5.0, 0),
    # the demo's second microscope: other objective, laser line, dye, camera and TIRF angle
    "100X": SimRig(_objective("100X", 1.45, 0.065, 600.0, 561.0), CAMERA_B, 0.15, 0.12, 4.0, 1),
}
DEFAULT_OBJECTIVES: dict[str, Optics] = {k: v.optics for k, v in DEFAULT_RIGS.items()}


_PROFILES = {  # (EPI centre u, v, width), (TIRF centre u, v, widths u, v, angle)
    0: ((0.08, -0.05, 0.75), (-0.12, 0.06, 0.55, 0.7, 0.0)),
    1: ((-0.1, 0.12, 0.6), (0.15, -0.1, 0.45, 0.8, 0.5)),
}


@functools.lru_cache(maxsize=8)
def illumination_profile(mode: str, roi: tuple[int, int, int, int], variant: int = 0) -> np.ndarray:
    """Relative excitation over the ROI (x, y, w, h) of the sensor: smooth, <= 1, read-only.

    EPI: a broad, off-centre Gaussian on a floor; TIRF: a narrower, tilted elliptical
    laser spot, offset the other way (as a real rig's TIRF beam). `variant` picks the
    light path of one rig.
    """
    x, y, w, h = roi
    (eu, ev, ew), (tu, tv, twu, twv, tang) = _PROFILES[variant % len(_PROFILES)]
    cy, cx = (SENSOR_SHAPE[0] - 1) / 2, (SENSOR_SHAPE[1] - 1) / 2
    v = (np.arange(y, y + h) - cy)[:, None] / cy
    u = (np.arange(x, x + w) - cx)[None, :] / cx
    if mode == "EPI":
        profile = 0.35 + 0.65 * np.exp(-((u - eu) ** 2 + (v - ev) ** 2) / (2 * ew**2))
    else:
        c, s_ = math.cos(tang), math.sin(tang)
        du, dv = u - tu, v - tv
        ru, rv = du * c + dv * s_, -du * s_ + dv * c
        g = np.exp(-(ru**2) / (2 * twu**2) - rv**2 / (2 * twv**2))
        profile = 0.15 + 0.85 * g
    out = profile.astype(np.float32)
    out.setflags(write=False)
    return out


@dataclass
class _Band:
    """The rfft2 coefficients an objective passes: rows (both signs) x columns [0, ncols)."""

    shape: tuple[int, int]
    rows: np.ndarray
    ncols: int

    @classmethod
    def for_optics(cls, optics: Optics, shape: tuple[int, int]) -> _Band:
        ny, nx = shape
        cutoff = 2 * optics.na / optics.wavelength_um  # cycles / um
        ky = min(ny // 2, math.ceil(cutoff * ny * optics.pixel_size_um) + 1)
        kx = min(nx // 2, math.ceil(cutoff * nx * optics.pixel_size_um) + 1)
        if 2 * ky + 1 >= ny:
            rows = np.arange(ny)
        else:
            rows = np.concatenate([np.arange(ky + 1), np.arange(ny - ky, ny)])
        return cls(shape, rows, kx + 1)

    def freqs(self, pixel_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Spatial frequencies (cycles/um) of the band's rows (column vector) and columns."""
        ny, nx = self.shape
        fy = np.where(self.rows <= ny // 2, self.rows, self.rows - ny) / (ny * pixel_um)
        fx = np.arange(self.ncols) / (nx * pixel_um)
        return fy[:, None], fx[None, :]

    def extract(self, spectrum: np.ndarray) -> np.ndarray:
        return spectrum[..., self.rows, : self.ncols]

    def image(self, block: np.ndarray) -> np.ndarray:
        """Inverse rFFT of a band-limited block (zeros elsewhere)."""
        ny, nx = self.shape
        full = np.zeros((ny, nx // 2 + 1), np.complex64)
        full[self.rows, : self.ncols] = block
        return sfft.irfft2(full, s=(ny, nx), workers=_WORKERS)


class _OTFCache:
    """Band-limited OTFs per (emitter height, focus), times the specimen's transfer; LRU.

    "gibson_lanni": the depth-dependent PSF of an oil objective imaging into the aqueous
    sample (what the simulated camera sees); "born_wolf": the paraxial, index-matched
    PSF of the defocus alone (the idealised in-focus reference).
    """

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(
        self,
        optics: Optics,
        band: _Band,
        emitters_um: Sequence[float],
        focus_um: float,
        model: str = "gibson_lanni",
    ) -> list[np.ndarray]:
        keys = [self._key(optics, band, z, focus_um, model) for z in emitters_um]
        with self._lock:
            found = {k: self._items[k] for k in keys if k in self._items}
            for k in found:
                self._items.move_to_end(k)
        missing = sorted({k[-3] for k in keys if k not in found})
        for chunk in range(0, len(missing), _PLANE_CHUNK):
            zs = missing[chunk : chunk + _PLANE_CHUNK]
            otfs = self._compute(optics, band, zs, round(float(focus_um), 4), model)
            for z, otf in zip(zs, otfs, strict=True):
                key = self._key(optics, band, z, focus_um, model)
                found[key] = otf
                self._put(key, otf)
        return [found[k] for k in keys]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @staticmethod
    def _key(optics: Optics, band: _Band, z: float, focus: float, model: str) -> tuple:
        shape = (band.shape, band.rows.size, band.ncols)
        return (optics, shape, round(float(z), 4), round(float(focus), 4), model)

    def _put(self, key: tuple, otf: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = otf
            self._bytes += otf.nbytes
            while self._bytes > self._max and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    @staticmethod
    def _compute(
        optics: Optics, band: _Band, emitters: Sequence[float], focus: float, model: str
    ) -> list[np.ndarray]:
        """The PSF is even in x and y, so its DFT on the band is a folded cosine transform:
        two small matrix products per plane instead of a full-size FFT.

        The specimen's transfer multiplies every OTF: the filaments' Gaussian profile, and
        the camera pixel's box (sinc) in place of the bilinear splatting kernel (sinc^2)
        the specimen was deposited with.
        """
        ny, nx = band.shape
        p = optics.pixel_size_um
        half = min(math.ceil(PSF_MARGIN_UM / p), (min(ny, nx) - 1) // 2)
        size = 2 * half + 1
        if model == "born_wolf":
            psfs = list(born_wolf_psf(optics, size, [z - focus for z in emitters]))
        else:
            psfs = [depth_psf(optics, size, max(float(z), 0.0), focus) for z in emitters]
        fy, fx = band.freqs(p)
        lag = np.arange(half + 1) * p
        cos_y = np.cos(2 * np.pi * fy * lag[None, :]).astype(np.float32)
        cos_x = np.cos(2 * np.pi * fx.T * lag[None, :]).astype(np.float32).T.copy()
        profile = np.exp(-2 * (np.pi * FILAMENT_SIGMA_UM) ** 2 * (fy**2 + fx**2))
        profile = profile / (np.sinc(fy * p) * np.sinc(fx * p))
        out = []
        for psf in psfs:
            rows = psf[half:].copy()
            rows[1:] += psf[half - 1 :: -1]
            folded = rows[:, half:].copy()
            folded[:, 1:] += rows[:, half - 1 :: -1]
            otf = ((cos_y @ folded) @ cos_x * profile).astype(np.float32)
            otf.setflags(write=False)
            out.append(otf)
        return out


_OTFS = _OTFCache(_OTF_CACHE_BYTES)


@dataclass
class _Field:
    """One rendered field: band-limited plane spectra and where they sit on the sensor."""

    key: tuple
    optics: Optics
    origin: tuple[int, int]  # sensor (row, col) of the region's pixel (0, 0)
    band: _Band
    axial: AxialSampling
    spectra: np.ndarray  # (Z, rows, ncols) complex64
    active: np.ndarray  # (Z,) bool: planes holding anything
    volume: np.ndarray | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return self.spectra.nbytes + (0 if self.volume is None else self.volume.nbytes)


class SimulatedMicroscope:
    """State of a simulated EPI/TIRF rig and the frames its camera would record.

    `drift_px` (the constructor argument) is the standard deviation, in pixels, of the
    stage drift drawn at each EPI<->TIRF switch (clipped below 2 px); the attribute
    `drift_px` is the current drift (dy, dx): image content moves by it. `planes_um`:
    the heights the slide's specimen is rendered at (default `SAMPLE_PLANES_UM`; see
    `uniform_planes_um` for stacks focused through the cell).
    """

    def __init__(
        self,
        seed: int = 0,
        objectives: dict[str, Optics] | None = None,
        drift_px: float = 0.8,
        family: str = DEFAULT_FAMILY,
        rigs: dict[str, SimRig] | None = None,
        planes_um: Sequence[float] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self._planes = SAMPLE_PLANES_UM if planes_um is None else _checked_planes(planes_um)
        self.seed = int(seed)
        self.family = check_family(family)
        if rigs is None and objectives is None:
            rigs = dict(DEFAULT_RIGS)
        elif rigs is None:
            base = DEFAULT_RIGS["60X"]
            rigs = {k: replace(DEFAULT_RIGS.get(k, base), optics=o) for k, o in objectives.items()}
        if not rigs:
            raise ValueError("objectives must name at least one objective")
        self.rigs = dict(rigs)
        self.objectives = {k: r.optics for k, r in self.rigs.items()}
        self.drift_scale_px = float(drift_px)
        self.xy_um: tuple[float, float] = (0.0, 0.0)
        self.z_um = 0.0
        self._objective = "60X" if "60X" in self.objectives else next(iter(self.objectives))
        self._illumination = "EPI"
        self._tirf_angles: dict[str, float] = {}
        for name, rig in self.rigs.items():
            o = rig.optics
            angle = angle_for_depth_deg(
                rig.tirf_depth_um, o.excitation_wavelength_nm, o.immersion_index, o.sample_index
            )
            self._tirf_angles[name] = round(angle, 2)
            check_angle_within_na(angle, o.na, o.immersion_index)
        self.exposure_ms = 100.0
        self.shutter_open = True
        sh, sw = SENSOR_SHAPE
        self._roi = ((sw - 512) // 2, (sh - 512) // 2, 512, 512)
        self._binning = 1
        self._drift_um = (0.0, 0.0)
        self._switches = 0
        self.frames_rendered = 0
        self._fields: OrderedDict[tuple, _Field] = OrderedDict()
        self._override: tuple[np.ndarray, np.ndarray, int] | None = None
        self._override_count = 0

    @property
    def rig(self) -> SimRig:
        """The current objective's microscope: optics, camera, TIRF settings."""
        return self.rigs[self._objective]

    @property
    def camera(self) -> Camera:
        return self.rig.camera

    @property
    def tirf_angle_deg(self) -> float:
        """TIRF incidence angle in the immersion medium for the current objective."""
        return self._tirf_angles[self._objective]

    @tirf_angle_deg.setter
    def tirf_angle_deg(self, value: float) -> None:
        o = self.optics
        check_angle_within_na(float(value), o.na, o.immersion_index)
        self._tirf_angles[self._objective] = float(value)

    # ----------------------------------------------------------------- state
    @property
    def objective(self) -> str:
        return self._objective

    @objective.setter
    def objective(self, name: str) -> None:
        if name not in self.objectives:
            raise ValueError(f"unknown objective {name!r}; choose one of {list(self.objectives)}")
        self._objective = name

    @property
    def optics(self) -> Optics:
        """Optics of the current objective (pixel size of one unbinned sensor pixel)."""
        return self.objectives[self._objective]

    def pixel_size_um(self) -> float:
        """Pixel size in the sample of one output pixel (binning included)."""
        return self.optics.pixel_size_um * self._binning

    @property
    def illumination(self) -> str:
        return self._illumination

    @illumination.setter
    def illumination(self, mode: str) -> None:
        self.set_illumination(mode)

    def centre_roi(self, size: int) -> None:
        """A centred `size` x `size` ROI (sensor pixels), as the demo and data makers use."""
        self.roi = ((SENSOR_SHAPE[1] - size) // 2, (SENSOR_SHAPE[0] - size) // 2, size, size)

    def set_illumination(self, mode: str) -> None:
        """Switch EPI/TIRF; a real switch nudges the stage: a new drift below 2 px."""
        if mode not in MODES:
            raise ValueError(f"illumination must be one of {MODES}, got {mode!r}")
        with self.lock:
            if mode == self._illumination:
                return
            self._illumination = mode
            self._switches += 1
            rng = np.random.default_rng([self.seed & 0x7FFFFFFF, self._switches, 0xD71F7])
            d = np.clip(rng.normal(0.0, self.drift_scale_px, 2), -_DRIFT_LIMIT_PX, _DRIFT_LIMIT_PX)
            p = self.optics.pixel_size_um
            self._drift_um = (float(d[0]) * p, float(d[1]) * p)

    @property
    def drift_px(self) -> tuple[float, float]:
        """Current stage drift (dy, dx) in unbinned pixels of the current objective."""
        p = self.optics.pixel_size_um
        return (self._drift_um[0] / p, self._drift_um[1] / p)

    @property
    def roi(self) -> tuple[int, int, int, int]:
        return self._roi

    @roi.setter
    def roi(self, value: tuple[int, int, int, int]) -> None:
        x, y, w, h = (int(v) for v in value)
        sh, sw = SENSOR_SHAPE
        if x < 0 or y < 0 or w < 1 or h < 1 or x + w > sw or y + h > sh:
            raise ValueError(f"ROI ({x}, {y}, {w}, {h}) is outside the {sw}x{sh} sensor")
        self._roi = (x, y, w, h)

    @property
    def binning(self) -> int:
        return self._binning

    @binning.setter
    def binning(self, value: int) -> None:
        if int(value) not in BINNINGS:
            raise ValueError(f"binning must be one of {BINNINGS}, got {value}")
        self._binning = int(value)

    @property
    def penetration_depth_um(self) -> float:
        """1/e depth of the TIRF excitation; infinite below the critical angle."""
        o = self.optics
        try:
            return penetration_depth_um(
                self.tirf_angle_deg, o.excitation_wavelength_nm, o.immersion_index, o.sample_index
            )
        except ValueError:
            return math.inf

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(rows, cols) of a frame with the current ROI and binning."""
        _, _, w, h = self._roi
        return (h // self._binning, w // self._binning)

    def set_specimen_override(
        self, volume: np.ndarray | None, z_um: Sequence[float] | None = None
    ) -> None:
        """Image `volume` (Z, Y, X amounts at heights `z_um`) instead of the slide.

        The volume is in unbinned pixels of the current objective, centred on the sensor
        centre and fixed to it (the stage does not move it); None restores the slide.
        """
        with self.lock:
            if volume is None:
                self._override = None
                return
            vol = np.asarray(volume, dtype=np.float32)
            if vol.ndim == 2:
                vol = vol[None]
            z = np.atleast_1d(np.asarray([0.0] if z_um is None else z_um, float))
            if vol.ndim != 3 or z.size != vol.shape[0]:
                raise ValueError("volume must be (Z, Y, X) with one height in z_um per plane")
            AxialSampling(z)  # validates the heights
            self._override_count += 1
            self._override = (vol.copy(), z, self._override_count)

    @property
    def specimen_z_um(self) -> np.ndarray:
        """Heights of the planes of `specimen()`."""
        return self._planes.copy() if self._override is None else self._override[1].copy()

    # ---------------------------------------------------------------- fields
    def _field(self) -> _Field:
        optics = self.optics
        x, y, w, h = self._roi
        ov = None if self._override is None else self._override[2]
        x_um, y_um = (float(v) for v in self.xy_um)
        key = (self.seed, self.family, (x_um, y_um), optics, self._roi, ov)
        cached = self._fields.get(key)
        if cached is not None:
            self._fields.move_to_end(key)
            return cached
        p = optics.pixel_size_um
        margin = math.ceil(PSF_MARGIN_UM / p)
        ny = sfft.next_fast_len(h + 2 * margin, real=True)
        nx = sfft.next_fast_len(w + 2 * margin, real=True)
        origin = (y - margin, x - margin)
        band = _Band.for_optics(optics, (ny, nx))
        if self._override is None:
            z = self._planes
            cy, cx = (SENSOR_SHAPE[0] - 1) / 2, (SENSOR_SHAPE[1] - 1) / 2
            centre = (
                x_um + (origin[1] + (nx - 1) / 2 - cx) * p,
                y_um + (origin[0] + (ny - 1) / 2 - cy) * p,
            )
            renderer = SpecimenRenderer(self.seed, centre, (ny, nx), p, z, self.family)
            chunks = (
                renderer.render(slice(k, k + _PLANE_CHUNK), lateral_profile=False)
                for k in range(0, z.size, _PLANE_CHUNK)
            )
        else:
            vol, z, _ = self._override
            chunks = iter([self._override_region(vol, origin, (ny, nx))])
        spectra = np.zeros((z.size, band.rows.size, band.ncols), np.complex64)
        active = np.zeros(z.size, bool)
        k = 0
        for chunk in chunks:
            for plane in chunk:
                if plane.any():
                    active[k] = True
                    spectra[k] = band.extract(sfft.rfft2(plane, workers=_WORKERS))
                k += 1
        result = _Field(key, optics, origin, band, AxialSampling(z), spectra, active)
        self._remember(result)
        return result

    @staticmethod
    def _override_region(
        vol: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]
    ) -> np.ndarray:
        """The override volume's part under the region (sensor-centred), zeros elsewhere."""
        out = np.zeros((vol.shape[0], *shape), np.float32)
        top = SENSOR_SHAPE[0] // 2 - vol.shape[1] // 2 - origin[0]
        left = SENSOR_SHAPE[1] // 2 - vol.shape[2] // 2 - origin[1]
        r0, c0 = max(0, top), max(0, left)
        r1, c1 = min(shape[0], top + vol.shape[1]), min(shape[1], left + vol.shape[2])
        if r1 > r0 and c1 > c0:
            out[:, r0:r1, c0:c1] = vol[:, r0 - top : r1 - top, c0 - left : c1 - left]
        return out

    def _remember(self, f: _Field) -> None:
        self._fields[f.key] = f
        total = sum(v.nbytes for v in self._fields.values())
        while total > _FIELD_CACHE_BYTES and len(self._fields) > 1:
            _, old = self._fields.popitem(last=False)
            total -= old.nbytes

    # ------------------------------------------------------------- rendering
    def _plane_weights(self, f: _Field, mode: str) -> np.ndarray:
        """Relative excitation of each plane, averaged over the plane's axial profile.

        EPI excites everything alike. TIRF: (1 - s) exp(-z / d) + s exp(-z / L), the
        evanescent field of depth d plus the share s of light scattered out of the beam
        into the sample (decaying over L); below the critical angle everything is lit.
        """
        if mode == "EPI":
            return np.ones(f.axial.z.size)
        d = self.penetration_depth_um
        if not math.isfinite(d):
            return np.ones(f.axial.z.size)
        rig = self.rig
        return _tirf_plane_weights(
            tuple(f.axial.z.tolist()), d, rig.scatter_fraction, rig.scatter_length_um
        )

    def _scale(self, mode: str) -> float:
        if not self.exposure_ms >= 0:
            raise ValueError(f"exposure must be >= 0 ms, got {self.exposure_ms}")
        ratio = (REFERENCE_PIXEL_UM / self.optics.pixel_size_um) ** 2
        qe = self.camera.quantum_efficiency
        return PHOTONS_PER_UNIT_MS[mode] * self.exposure_ms * qe * ratio

    def _medium(self, mode: str) -> float:
        """Specimen amount per pixel that the autofluorescent medium adds (flat haze)."""
        column = MEDIUM_COLUMN_UM
        if mode == "TIRF" and math.isfinite(self.penetration_depth_um):
            rig = self.rig
            d = self.penetration_depth_um
            column = (1 - rig.scatter_fraction) * d + rig.scatter_fraction * rig.scatter_length_um
        return MEDIUM_PER_UM3 * column * self.optics.pixel_size_um**2

    def _finish(self, f: _Field, block: np.ndarray, mode: str, medium: bool = True) -> np.ndarray:
        """Band block -> expected photo-electrons of the binned ROI (plus the medium's glow)."""
        x, y, w, h = self._roi
        img = f.band.image(block)
        r0, c0 = y - f.origin[0], x - f.origin[1]
        img = img[r0 : r0 + h, c0 : c0 + w]
        img = np.maximum(img, 0.0, dtype=np.float32)
        if medium:
            img += np.float32(self._medium(mode))
        img *= illumination_profile(mode, self._roi, self.rig.profile)
        img *= np.float32(self._scale(mode))
        return _bin(img, self._binning)

    def _image(self, mode: str, drift: bool) -> np.ndarray:
        f = self._field()
        weights = self._plane_weights(f, mode)
        idx = np.flatnonzero(f.active & (weights > 1e-6))
        acc = np.zeros(f.spectra.shape[1:], np.complex64)
        if idx.size:
            otfs = _OTFS.get(f.optics, f.band, f.axial.z[idx].tolist(), self.z_um)
            tmp = np.empty(acc.shape, np.float32)
            prod = np.empty_like(acc)
            for k, otf in zip(idx, otfs, strict=True):
                np.multiply(otf, np.float32(weights[k]), out=tmp)
                np.multiply(f.spectra[k], tmp, out=prod)
                acc += prod
        if drift and self._drift_um != (0.0, 0.0):
            acc *= self._drift_ramp(f)
        return self._finish(f, acc, mode)

    def _drift_ramp(self, f: _Field) -> np.ndarray:
        fy, fx = f.band.freqs(f.optics.pixel_size_um)
        dy_um, dx_um = self._drift_um
        return np.exp(-2j * np.pi * (fy * dy_um + fx * dx_um)).astype(np.complex64)

    def noise_free(self, mode: str | None = None, camera_units: bool = False) -> np.ndarray:
        """Expected photo-electrons per output pixel (float32), EPI or TIRF, current state,
        or with `camera_units` what a noiseless camera would record (ADU, offset and gain
        maps included).

        Drift, illumination profile, exposure and binning included; zeros with the shutter
        closed.
        """
        mode = self._illumination if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self.lock:
            if not self.shutter_open:
                electrons = np.zeros(self.frame_shape, np.float32)
            else:
                electrons = self._image(mode, drift=True)
            return self._to_adu(electrons) if camera_units else electrons

    def ground_truth_tirf(self, camera_units: bool = False) -> np.ndarray:
        """Noise-free TIRF image of the current field at the current focus, without drift.

        In expected photo-electrons, or with `camera_units` as a noiseless camera would
        record it (ADU, offset included): the like-for-like reference for anything
        trained on or compared with measured TIRF frames.
        """
        with self.lock:
            electrons = self._image("TIRF", drift=False)
            return self._to_adu(electrons) if camera_units else electrons

    def _to_adu(self, electrons: np.ndarray) -> np.ndarray:
        """Photo-electrons as the camera reads them out: per-pixel gain, then offset."""
        offset, gain, _ = self._camera_maps()
        return electrons * gain / np.float32(self.camera.electrons_per_adu) + offset

    def _camera_maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offset, gain and read-noise maps under the ROI (first pixel of each bin)."""
        x, y, w, h = self._roi
        b = self._binning
        fh, fw = self.frame_shape
        return tuple(  # type: ignore[return-value]
            m[y : y + h : b, x : x + w : b][:fh, :fw] for m in self.camera.maps()
        )

    def in_focus_section(self) -> np.ndarray:
        """The specimen's `SECTION_THICKNESS_UM` section in focus, in-focus PSF, EPI scale.

        The section lies where the objective actually focuses: the stage height `z_um`
        times the focal-shift factor of the sample (about 0.8 into water), which is what
        a sectioning method should recover from a frame taken there. Plane amounts are
        interpolated between the planes around that height and rescaled to
        the section thickness; no drift; zeros outside the planes' span.
        """
        with self.lock:
            f = self._field()
            ax = f.axial
            acc = np.zeros(f.spectra.shape[1:], np.complex64)
            depth = max(self.z_um, 0.0) * focal_shift_factor(f.optics)
            coeff = np.array([ax.hat(k, depth) for k in range(ax.z.size)], float)
            coeff *= SECTION_THICKNESS_UM / ax.thickness
            (otf,) = _OTFS.get(f.optics, f.band, [0.0], 0.0, model="born_wolf")
            for k in np.flatnonzero(coeff > 0):
                acc += f.spectra[k] * np.float32(coeff[k])
            acc *= otf
            return self._finish(f, acc, "EPI", medium=False)

    def specimen(self) -> np.ndarray:
        """The specimen under the ROI: (Z, h, w) amounts, unbinned pixels, read-only.

        Heights in `specimen_z_um`; cached with the field.
        """
        with self.lock:
            f = self._field()
            if f.volume is None:
                x, y, w, h = self._roi
                if self._override is None:
                    p = f.optics.pixel_size_um
                    cy, cx = (SENSOR_SHAPE[0] - 1) / 2, (SENSOR_SHAPE[1] - 1) / 2
                    centre = (
                        self.xy_um[0] + (x + (w - 1) / 2 - cx) * p,
                        self.xy_um[1] + (y + (h - 1) / 2 - cy) * p,
                    )
                    vol = SpecimenRenderer(
                        self.seed, centre, (h, w), p, self._planes, self.family
                    ).render()
                else:
                    vol = self._override_region(self._override[0], (y, x), (h, w))
                vol.setflags(write=False)
                f.volume = vol
            return f.volume

    def snap(self) -> np.ndarray:
        """One camera frame (uint16, binned ROI) of the current state, with noise."""
        with self.lock:
            rng = np.random.default_rng([self.seed & 0x7FFFFFFF, self.frames_rendered, 0x5EED])
            self.frames_rendered += 1
            expected = self.noise_free()
            read = self._camera_maps()[2]
            electrons = rng.poisson(expected).astype(np.float32)
            electrons += rng.standard_normal(expected.shape, np.float32) * (read * self._binning)
            return np.clip(np.rint(self._to_adu(electrons)), 0, MAX_ADU).astype(np.uint16)

    def clear_cache(self, otfs: bool = False) -> None:
        """Forget rendered fields; `otfs=True` also empties the OTF cache all scopes share."""
        with self.lock:
            self._fields.clear()
            if otfs:
                _OTFS.clear()


def uniform_planes_um(step_um: float, top_um: float = TOP_UM) -> np.ndarray:
    """Specimen heights `SAMPLE_PLANES_UM` up to 0.5 um, every `step_um` from there to
    `top_um`, and the default planes above.

    For z-stacks that focus up through the cell: the default planes thin out above
    1.6 um (only haze when focus is on the coverslip), which caps the axial detail a
    stack focused up there can show at the planes' spacing (0.2-1.2 um), not the optics'.
    """
    if not 0 < step_um <= 1:
        raise ValueError(f"plane step must be in (0, 1] um, got {step_um}")
    low = SAMPLE_PLANES_UM[SAMPLE_PLANES_UM <= 0.5]
    mid = np.arange(low[-1] + step_um, top_um + 1e-6, step_um)
    top = mid[-1] if mid.size else low[-1]
    high = SAMPLE_PLANES_UM[SAMPLE_PLANES_UM > top + 1e-6]
    return np.round(np.concatenate([low, mid, high]), 4)


def _checked_planes(planes_um: Sequence[float]) -> np.ndarray:
    z = np.asarray(planes_um, float)
    AxialSampling(z)  # validates the heights
    return z


@functools.lru_cache(maxsize=32)
def _tirf_plane_weights(
    z: tuple[float, ...], depth_um: float, scatter: float, scatter_length_um: float
) -> np.ndarray:
    """TIRF excitation averaged over each plane's hat profile (64-point quadrature)."""
    ax = AxialSampling(z)
    out = np.empty(len(z))
    t = (np.arange(64) + 0.5) / 64
    for k in range(len(z)):
        zz = np.concatenate([ax.z[k] - ax.left[k] * (1 - t), ax.z[k] + ax.right[k] * t])
        hat = ax.hat(k, zz)
        zc = np.maximum(zz, 0.0)
        light = (1 - scatter) * np.exp(-zc / depth_um) + scatter * np.exp(-zc / scatter_length_um)
        out[k] = float((hat * light).sum() / hat.sum())
    out.setflags(write=False)
    return out


def _bin(img: np.ndarray, b: int) -> np.ndarray:
    if b == 1:
        return img
    h, w = img.shape[0] // b * b, img.shape[1] // b * b
    return img[:h, :w].reshape(h // b, b, w // b, b).sum(axis=(1, 3), dtype=np.float32)


_shared: SimulatedMicroscope | None = None
_shared_lock = threading.Lock()


def get_microscope() -> SimulatedMicroscope:
    """The process-wide microscope the pymmcore-plus devices share (created on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SimulatedMicroscope()
        return _shared


def reset_microscope(seed: int = 0, **kwargs: object) -> SimulatedMicroscope:
    """Replace the shared microscope with a fresh one (new slide, default state)."""
    global _shared
    with _shared_lock:
        _shared = SimulatedMicroscope(seed=seed, **kwargs)  # type: ignore[arg-type]
        return _shared
