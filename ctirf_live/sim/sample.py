"""Synthetic fluorescent specimens on a virtual slide, in physical coordinates.

A slide holds one specimen *family* (what a user labels and mounts), on an infinite
jittered grid of sites. Everything about the site (i, j) is drawn from an RNG seeded by
(slide seed, family, i, j), so a field's content depends only on the seed, the family
and where it is, never on the order of visits, and the same field renders consistently
at any pixel size. Heights are above the coverslip (z = 0), in micrometres.

Families (`FAMILIES`), each posing the paper's problem: structure that EPI shows at all
depths and TIRF sees only in the bottom ~100-200 nm:

- ``factin``: dense phalloidin-stained F-actin cells (the paper's C6 glioma cells),
  packed so that frames are mostly cell with overlapping edges. Thick bodies (lamella
  0.5-1.5 um, dome 3.5-6 um over the nucleus); ventral meshwork and stress fibres at the
  coverslip; a textured dorsal cortex under the whole top surface; dorsal stress fibres
  rising from the edge to 1-2.5 um; transverse arcs at 1-2.5 um; long, level bundles
  and single filaments at every height inside the lamella (0.05-1 um); a perinuclear actin cap
  at 3-5 um; ruffles, filopodia and many arches (continuous in EPI, broken in TIRF); a
  dim nucleus (phalloidin does not stain it) and little diffuse cytosol.
- ``membrane``: a WGA-like membrane stain: bright, patchy basal membrane, apical
  membrane with microvilli, endosomes/vesicles at all depths, retraction fibres.
- ``tissue``: a thick tissue section (GFAP-like astrocytes) 5-10 um deep: somata at
  all depths with branching processes wandering through the whole section, in a dim
  autofluorescent slab; TIRF sees only the processes that touch the coverslip.

Every family also has emitters above the cells (rounded or dead cells floating in the
medium, debris) up to `TOP_UM`: out-of-volume background that reaches EPI as haze.

Values are fluorophore amounts per voxel (arbitrary units: 1 = one micrometre of a
single filament), not densities: plane k holds everything within a linear-interpolation
("hat") axial profile around z_k, so summing over z gives the projected amount whatever
the plane spacing. Filaments are polylines sampled every `FILAMENT_STEP_UM`, deposited
with a bilinear kernel (the microscope divides its transfer out and applies the camera
pixel's box instead) and given a Gaussian lateral profile of `FILAMENT_SIGMA_UM`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FAMILIES = ("factin", "membrane", "tissue")
DEFAULT_FAMILY = "factin"
FILAMENT_STEP_UM = 0.06
FILAMENT_SIGMA_UM = 0.05
SINGLE_PLANE_HALF_WIDTH_UM = 0.1  # axial half-width of the hat when only one plane is asked
TOP_UM = 15.0  # highest emitter of any family (floating cells, debris)
# cells cover a disc of this radius around the slide centre; beyond is bare glass (a
# place to find blank fields, as on a real slide)
SPECIMEN_RADIUS_UM = 25000.0

_SALT = 0xC6  # C6 glioma cells
_BASAL_MEMBRANE_Z_UM = 0.01
_MAX_MODULATION = 1.65


@dataclass(frozen=True)
class FamilySpec:
    """Layout and diffuse stain densities of one specimen family.

    Densities: `cytosol`/`nucleus` per um^3, `basal`/`apical` membrane per um^2.
    `has_body` is False for the tissue family, whose sites are astrocytes without a
    cell body on the coverslip.
    """

    grid_um: float
    jitter_um: float
    empty_fraction: float
    semi_axis_um: tuple[float, float]
    cytosol: float
    nucleus: float
    basal: float
    apical: float
    has_body: bool = True
    floating_probability: float = 0.35


FAMILY_SPECS: dict[str, FamilySpec] = {
    "factin": FamilySpec(26.0, 3.5, 0.03, (13.0, 18.0), 0.4, 0.1, 0.15, 0.15, True, 0.5),
    "membrane": FamilySpec(26.0, 3.5, 0.04, (12.0, 17.0), 0.12, 0.03, 2.0, 1.4),
    "tissue": FamilySpec(16.0, 6.0, 0.0, (12.0, 12.0), 0.0, 0.0, 0.0, 0.0, False, 0.2),
}
GRID_UM = FAMILY_SPECS[DEFAULT_FAMILY].grid_um
EMPTY_FRACTION = FAMILY_SPECS[DEFAULT_FAMILY].empty_fraction
TISSUE_BACKGROUND_PER_UM3 = 0.12  # autofluorescence and unresolved GFAP of the section
_REACH_UM = max(s.semi_axis_um[1] for s in FAMILY_SPECS.values()) * _MAX_MODULATION + 8.0


def check_family(family: str) -> str:
    """The family name, or a one-line error listing the families."""
    if family not in FAMILY_SPECS:
        raise ValueError(f"unknown specimen family {family!r}; choose one of {', '.join(FAMILIES)}")
    return family


def _zig(n: int) -> int:
    """Map any integer to a non-negative one, one-to-one (SeedSequence wants >= 0)."""
    n = int(n)
    return 2 * n if n >= 0 else -2 * n - 1


def _family_index(family: str) -> int:
    return FAMILIES.index(family)


@functools.lru_cache(maxsize=64)
def tissue_thickness_um(seed: int) -> float:
    """Thickness of the tissue section on slide `seed` (5-10 um)."""
    rng = np.random.default_rng([_zig(seed), _SALT, 7])
    return float(rng.uniform(5.0, 10.0))


@dataclass(frozen=True, eq=False)
class Cell:
    """One site's geometry: footprint, body height and nucleus; content lazily.

    The shape comes from the site's RNG stream, the content (filaments, puncta) from a
    second stream of the same site, drawn only when a field first needs it.
    """

    seed: int
    site: tuple[int, int]
    family: str
    cx: float
    cy: float
    theta: float  # long axis angle (rad)
    a: float  # footprint semi-axes (um)
    b: float
    harmonics: np.ndarray  # (m, amplitude, phase) rows: boundary wobble
    lobes: np.ndarray  # (angle, amplitude, width) rows: protrusions
    nx: float  # nucleus centre
    ny: float
    ntheta: float
    na: float  # nucleus semi-axes (um)
    nb: float
    nc: float  # nucleus half-height
    nz: float  # nucleus centre height
    height: float  # dome top (um)
    lamella: float  # body thickness at the edge (um)
    lamella_inner: float  # body thickness where the lamella meets the dome
    brightness: float

    @functools.cached_property
    def bbox(self) -> tuple[float, float, float, float]:
        """Bounding box of the footprint: xmin, xmax, ymin, ymax (um)."""
        return _boundary_bbox(self)

    @property
    def spec(self) -> FamilySpec:
        return FAMILY_SPECS[self.family]

    @functools.cached_property
    def content(self) -> tuple[np.ndarray, np.ndarray]:
        """Filament segments (n, 7: x0, y0, z0, x1, y1, z1, amount per um) and puncta
        (n, 4: x, y, z, amount), read-only."""
        i, j = self.site
        fam = _family_index(self.family)
        rng = np.random.default_rng([_zig(self.seed), _zig(i), _zig(j), _SALT, 1, fam])
        parts, puncta = _CONTENT[self.family](self, rng)
        parts = [p for p in parts if len(p)]
        segments = np.concatenate(parts, 0) if parts else np.zeros((0, 7))
        segments[:, 6] *= self.brightness
        puncta = np.concatenate([puncta, _floating(self, rng)], 0)
        puncta[:, 3] *= self.brightness
        for arr in (segments, puncta):
            arr.setflags(write=False)
        return segments, puncta

    def _local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = math.cos(self.theta), math.sin(self.theta)
        dx, dy = x - self.cx, y - self.cy
        return dx * c + dy * s, -dx * s + dy * c

    def _modulation(self, psi: np.ndarray) -> np.ndarray:
        m = np.ones_like(psi)
        for order, amp, phase in self.harmonics:
            m += amp * np.cos(order * psi + phase)
        for angle, amp, width in self.lobes:
            d = (psi - angle + np.pi) % (2 * np.pi) - np.pi
            m += amp * np.exp(-0.5 * (d / width) ** 2)
        return np.minimum(m, _MAX_MODULATION)

    def footprint(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius u (< 1 inside) and approximate distance to the edge (um)."""
        xr, yr = self._local(x, y)
        ex, ey = xr / self.a, yr / self.b
        psi = np.arctan2(ey, ex)
        m = self._modulation(psi)
        u = np.hypot(ex, ey) / m
        edge_radius = np.hypot(self.a * np.cos(psi), self.b * np.sin(psi)) * m
        return u, (1.0 - u) * edge_radius

    def body_height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the cell's top surface (0 outside the footprint or without a body)."""
        u, dist = self.footprint(x, y)
        if not self.spec.has_body:
            return np.zeros_like(u)
        taper = np.sqrt(np.clip(dist / 0.6, 0.0, 1.0))
        inward = np.clip(1.0 - u, 0.0, 1.0) ** 0.6
        lamella = self.lamella + (self.lamella_inner - self.lamella) * inward
        dn2 = self._nucleus_q(x, y, scale=2.1)
        dome = self.height * np.clip(1.0 - dn2, 0.0, 1.0) ** 0.6
        return np.maximum(lamella, dome) * taper

    def _nucleus_q(self, x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
        c, s = math.cos(self.ntheta), math.sin(self.ntheta)
        dx, dy = x - self.nx, y - self.ny
        xr, yr = dx * c + dy * s, -dx * s + dy * c
        return (xr / (scale * self.na)) ** 2 + (yr / (scale * self.nb)) ** 2

    def nucleus_span(
        self, x: np.ndarray, y: np.ndarray, top: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bottom and top height of the nucleus in each column (equal where there is none)."""
        q = self._nucleus_q(x, y)
        half = self.nc * np.sqrt(np.clip(1.0 - q, 0.0, None))
        lo = self.nz - half
        hi = np.maximum(np.minimum(self.nz + half, top - 0.2), lo)
        return lo, hi


def _boundary_bbox(cell_like: Cell) -> tuple[float, float, float, float]:
    psi = np.linspace(0, 2 * np.pi, 128, endpoint=False)
    m = cell_like._modulation(psi)
    xr, yr = cell_like.a * m * np.cos(psi), cell_like.b * m * np.sin(psi)
    c, s = math.cos(cell_like.theta), math.sin(cell_like.theta)
    x = cell_like.cx + xr * c - yr * s
    y = cell_like.cy + xr * s + yr * c
    pad = 6.0 if cell_like.family in ("factin", "membrane") else 0.0  # filopodia
    return float(x.min()) - pad, float(x.max()) + pad, float(y.min()) - pad, float(y.max()) + pad


def _to_world(cell: Cell, xr: np.ndarray, yr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(cell.theta), math.sin(cell.theta)
    return cell.cx + xr * c - yr * s, cell.cy + xr * s + yr * c


def _polyline_segments(xyz: np.ndarray, amount_per_um: float | np.ndarray) -> np.ndarray:
    """(k, 3) vertices -> (k - 1, 7) segments."""
    seg = np.empty((len(xyz) - 1, 7))
    seg[:, 0:3] = xyz[:-1]
    seg[:, 3:6] = xyz[1:]
    seg[:, 6] = amount_per_um
    return seg


def _bundle(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, lines: int, spacing: float, amount: float
) -> list[np.ndarray]:
    """Parallel copies of a polyline, offset sideways: a sub-resolution filament bundle."""
    tx, ty = np.gradient(x), np.gradient(y)
    norm = np.hypot(tx, ty) + 1e-12
    px, py = -ty / norm, tx / norm
    out = []
    for k in range(lines):
        off = (k - (lines - 1) / 2) * spacing
        out.append(_polyline_segments(np.stack([x + off * px, y + off * py, z], 1), amount / lines))
    return out


def _inside_runs(segs: np.ndarray, cell: Cell, limit: float) -> np.ndarray:
    """Keep only segments whose both ends lie inside the footprint (u < limit)."""
    if not len(segs):
        return segs
    u0, _ = cell.footprint(segs[:, 0], segs[:, 1])
    u1, _ = cell.footprint(segs[:, 3], segs[:, 4])
    return segs[(u0 < limit) & (u1 < limit)]


def _random_inside(
    cell: Cell, rng: np.random.Generator, n: int, bias: float = 0.5, limit: float = 0.97
) -> tuple[np.ndarray, np.ndarray]:
    """n points inside the footprint; bias < 0.5 crowds them towards the edge."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    got = 0
    while got < n:
        k = max(16, int(1.5 * (n - got)))
        r = rng.random(k) ** bias * _MAX_MODULATION
        phi = rng.uniform(0, 2 * np.pi, k)
        x, y = _to_world(cell, cell.a * r * np.cos(phi), cell.b * r * np.sin(phi))
        u, _ = cell.footprint(x, y)
        keep = u < limit
        xs.append(x[keep])
        ys.append(y[keep])
        got += int(keep.sum())
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def _edge_points(
    cell: Cell, rng: np.random.Generator, n: int, u: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n points at normalised radius `u` and their outward angle in the cell frame."""
    psi = rng.uniform(0, 2 * np.pi, n)
    m = cell._modulation(psi)
    xr, yr = cell.a * m * u * np.cos(psi), cell.b * m * u * np.sin(psi)
    x, y = _to_world(cell, xr, yr)
    return x, y, psi


def _short_filaments(
    x: np.ndarray,
    y: np.ndarray,
    z0: np.ndarray,
    z1: np.ndarray,
    length: np.ndarray,
    phi: np.ndarray,
    amount: float,
) -> np.ndarray:
    hx, hy = 0.5 * length * np.cos(phi), 0.5 * length * np.sin(phi)
    seg = np.stack([x - hx, y - hy, z0, x + hx, y + hy, z1, np.full(x.shape, amount)], 1)
    return seg


# ----------------------------------------------------------------- F-actin (C6)
def _ventral_mesh(cell: Cell, rng: np.random.Generator, per_um2: float) -> np.ndarray:
    n = int(per_um2 * math.pi * cell.a * cell.b)
    x, y = _random_inside(cell, rng, n, bias=0.35)
    length = np.clip(rng.exponential(0.6, n) + 0.2, 0.2, 2.0)
    phi = rng.uniform(0, np.pi, n)
    z = rng.uniform(0.02, 0.2, n)
    dz = rng.normal(0.0, 0.03, n)
    seg = _short_filaments(
        x, y, np.clip(z - dz, 0.01, 0.22), np.clip(z + dz, 0.01, 0.22), length, phi, 1.0
    )
    return _inside_runs(seg, cell, 1.0)


def _dorsal_cortex(cell: Cell, rng: np.random.Generator, per_um2: float) -> np.ndarray:
    """Short filaments just under the top surface, following its slope."""
    n = int(per_um2 * math.pi * cell.a * cell.b)
    x, y = _random_inside(cell, rng, n, bias=0.5)
    length = np.clip(rng.exponential(0.5, n) + 0.25, 0.25, 1.5)
    phi = rng.uniform(0, np.pi, n)
    hx, hy = 0.5 * length * np.cos(phi), 0.5 * length * np.sin(phi)
    depth = rng.uniform(0.05, 0.2, n)
    z0 = cell.body_height(x - hx, y - hy) - depth
    z1 = cell.body_height(x + hx, y + hy) - depth
    seg = _short_filaments(x, y, z0, z1, length, phi, 1.5)
    keep = (np.minimum(z0, z1) > 0.3) & (np.abs(z1 - z0) < 0.6)
    return _inside_runs(seg[keep], cell, 0.97)


def _stress_fibres(
    cell: Cell, rng: np.random.Generator, count: tuple[int, int], amount_scale: float
) -> list[np.ndarray]:
    out = []
    for _ in range(int(rng.integers(*count))):
        off = rng.uniform(-0.75, 0.75) * cell.b
        dev = rng.normal(0.0, 0.2)
        chord = 2 * cell.a * math.sqrt(max(0.0, 1 - (off / cell.b) ** 2))
        length = chord * rng.uniform(0.6, 0.95)
        shift = rng.uniform(-0.1, 0.1) * length
        bow = rng.normal(0.0, 0.03) * length
        s = np.linspace(-0.5, 0.5, 12)
        along, across = s * length, bow * (1 - 4 * s**2)
        xr = shift + along * math.cos(dev) - across * math.sin(dev)
        yr = off + along * math.sin(dev) + across * math.cos(dev)
        x, y = _to_world(cell, xr, yr)
        z0 = rng.uniform(0.03, 0.3)
        z = np.clip(z0 + rng.normal(0, 0.03) * (s * 2), 0.02, 0.32)
        amount = 6.0 * amount_scale * rng.lognormal(0.0, 0.35)
        for seg in _bundle(x, y, z, 3, 0.07, amount):
            out.append(_inside_runs(seg, cell, 0.97))
    return out


def _dorsal_fibres(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    """Bundles from a focal adhesion at the edge (z ~ 0) up to 1-2.5 um towards the nucleus."""
    out = []
    n = int(rng.integers(5, 12))
    x0, y0, _ = _edge_points(cell, rng, n, rng.uniform(0.8, 0.93))
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for k in range(n):
        frac = rng.uniform(0.45, 0.75)
        x1 = x0[k] + frac * (cell.nx - x0[k])
        y1 = y0[k] + frac * (cell.ny - y0[k])
        x, y = (x0[k] + t * (x1 - x0[k]))[:, 0], (y0[k] + t * (y1 - y0[k]))[:, 0]
        rise = rng.uniform(1.0, 2.5)
        z = rise * (3 * t[:, 0] ** 2 - 2 * t[:, 0] ** 3)
        z = np.minimum(np.maximum(z, 0.03), cell.body_height(x, y) - 0.15)
        if z[-1] < 0.8:
            continue
        for seg in _bundle(x, y, np.maximum(z, 0.03), 2, 0.07, 8.0 * rng.lognormal(0.0, 0.3)):
            out.append(_inside_runs(seg, cell, 0.97))
    return out


def _transverse_arcs(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    """Curved bundles parallel to the edge, 1-2.5 um up under the dorsal surface."""
    out = []
    for _ in range(int(rng.integers(3, 8))):
        u = rng.uniform(0.5, 0.85)
        psi0 = rng.uniform(0, 2 * np.pi)
        psi = psi0 + np.linspace(0.0, rng.uniform(0.6, 1.6), 30)
        m = cell._modulation(psi)
        x, y = _to_world(cell, cell.a * m * u * np.cos(psi), cell.b * m * u * np.sin(psi))
        z = np.minimum(rng.uniform(0.6, 2.5), cell.body_height(x, y) - 0.15)
        if z.min() < 0.4:
            continue
        for seg in _bundle(x, y, z, 2, 0.08, 6.0 * rng.lognormal(0.0, 0.3)):
            out.append(_inside_runs(seg, cell, 0.97))
    return out


def _arches(cell: Cell, rng: np.random.Generator, wanted: int) -> list[np.ndarray]:
    """Bundles rising from the coverslip to 0.5-2.5 um and back, where the body is thick."""
    n = 8 * wanted
    top = rng.uniform(0.5, 2.5, n)
    length = rng.uniform(4.0, 10.0, n)
    phi = rng.uniform(0, np.pi, n)
    amount = 5.0 * rng.lognormal(0.0, 0.2, n)
    mx, my = _random_inside(cell, rng, n, bias=0.6)
    t = np.linspace(0.0, 1.0, 25)
    x = mx[:, None] + (t - 0.5) * (length * np.cos(phi))[:, None]
    y = my[:, None] + (t - 0.5) * (length * np.sin(phi))[:, None]
    u, _ = cell.footprint(x, y)
    roof = cell.body_height(x, y)
    ok = (roof[:, 12] >= top + 0.3) & (u.max(1) < 0.95)
    out = []
    for k in np.flatnonzero(ok)[:wanted]:
        z = np.minimum(top[k] * np.sin(np.pi * t), np.maximum(roof[k] - 0.1, 0.0))
        out.extend(_bundle(x[k], y[k], np.maximum(z, 0.02), 2, 0.06, amount[k]))
    return out


def _lamellar_bundles(cell: Cell, rng: np.random.Generator, per_um2: float) -> list[np.ndarray]:
    """Long, nearly level bundles and single filaments at any height inside the lamella.

    Contractile and branched actin of the lamella runs at every height between the
    ventral and dorsal membranes, so the body holds filaments as bright as a stress fibre
    0.1-1 um up: seen sharp and bright in EPI, dimmed or gone in TIRF.
    """
    n = int(per_um2 * math.pi * cell.a * cell.b)
    mx, my = _random_inside(cell, rng, n, bias=0.45, limit=0.93)
    length = rng.uniform(2.0, 7.0, n)
    phi = rng.uniform(0, np.pi, n)
    bend = rng.normal(0.0, 0.08, n) * length
    z_mid = rng.uniform(0.05, 1.0, n)
    slope = rng.normal(0.0, 0.02, n)
    lines = rng.integers(1, 4, n)
    amount = rng.lognormal(math.log(2.5), 0.6, n) * lines / 2
    t = np.linspace(-0.5, 0.5, 9)
    out = []
    for k in range(n):
        along, across = t * length[k], bend[k] * (1 - 4 * t**2)
        c, s = math.cos(phi[k]), math.sin(phi[k])
        x, y = mx[k] + along * c - across * s, my[k] + along * s + across * c
        z = z_mid[k] + slope[k] * along
        roof = cell.body_height(x, y)
        if np.any(z > roof - 0.1) or z.min() < 0.03:
            continue
        for seg in _bundle(x, y, z, int(lines[k]), 0.06, float(amount[k])):
            out.append(_inside_runs(seg, cell, 0.97))
    return out


def _cap_fibres(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    """Perinuclear actin cap: bundles over the dome, 3-5 um up."""
    out = []
    c, s = math.cos(cell.ntheta), math.sin(cell.ntheta)
    for _ in range(int(rng.integers(5, 12))):
        off = rng.uniform(-0.8, 0.8) * cell.nb
        dev = rng.normal(0.0, 0.15)
        along = np.linspace(-1.4, 1.4, 17) * cell.na
        ax = along * math.cos(dev) - off * math.sin(dev)
        ay = along * math.sin(dev) + off * math.cos(dev)
        x, y = cell.nx + ax * c - ay * s, cell.ny + ax * s + ay * c
        z = np.maximum(cell.body_height(x, y) - 0.25, 0.05)
        seg = _polyline_segments(np.stack([x, y, z], 1), 8.0 * rng.lognormal(0.0, 0.3))
        out.append(_inside_runs(seg, cell, 0.97))
    return out


def _ruffles(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    """Curtains of near-vertical filaments along stretches of the edge, up to ~2 um."""
    out = []
    for _ in range(int(rng.integers(1, 4))):
        u = rng.uniform(0.85, 0.94)
        psi = rng.uniform(0, 2 * np.pi) + np.linspace(0.0, rng.uniform(0.2, 0.6), 40)
        m = cell._modulation(psi)
        x, y = _to_world(cell, cell.a * m * u * np.cos(psi), cell.b * m * u * np.sin(psi))
        tops = cell.body_height(x, y) + rng.uniform(0.3, 1.0, x.size)
        lean = rng.normal(0.0, 0.15, x.size)
        seg = np.stack(
            [x, y, np.full(x.shape, 0.05), x + lean, y + lean, tops, np.full(x.shape, 3.0)], 1
        )
        out.append(seg)
    return out


def _filopodia(
    cell: Cell, rng: np.random.Generator, count: tuple[int, int], amount: float
) -> list[np.ndarray]:
    """Thin bundles sticking out of the edge, near the coverslip."""
    n = int(rng.integers(*count))
    x0, y0, psi = _edge_points(cell, rng, n, 0.97)
    out = []
    for k in range(n):
        ang = cell.theta + math.atan2(cell.b * math.sin(psi[k]), cell.a * math.cos(psi[k]))
        ang += rng.normal(0.0, 0.3)
        length = rng.uniform(2.0, 6.0)
        t = np.linspace(0.0, 1.0, 10)
        x = x0[k] + t * length * math.cos(ang)
        y = y0[k] + t * length * math.sin(ang)
        z = 0.05 + t * rng.uniform(0.0, 0.4)
        out.append(_polyline_segments(np.stack([x, y, z], 1), amount * rng.lognormal(0.0, 0.3)))
    return out


def _puncta(
    cell: Cell, rng: np.random.Generator, count: tuple[int, int], amount: float
) -> np.ndarray:
    n = int(rng.integers(*count))
    x, y = _random_inside(cell, rng, n)
    z = rng.uniform(0.03, 0.97, n) * cell.body_height(x, y)
    return np.stack([x, y, z, amount * rng.lognormal(0.0, 0.5, n)], 1)


def _factin(cell: Cell, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    parts = [_ventral_mesh(cell, rng, 0.6), _dorsal_cortex(cell, rng, 4.0)]
    parts += _stress_fibres(cell, rng, (4, 10), 0.5)
    parts += _dorsal_fibres(cell, rng)
    parts += _transverse_arcs(cell, rng)
    parts += _arches(cell, rng, int(rng.integers(8, 20)))
    parts += _lamellar_bundles(cell, rng, 0.06)
    parts += _cap_fibres(cell, rng)
    parts += _ruffles(cell, rng)
    parts += _filopodia(cell, rng, (10, 30), 3.0)
    return parts, _puncta(cell, rng, (10, 30), 2.0)


# ----------------------------------------------------------------- WGA membrane
def _membrane(cell: Cell, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Patchy basal membrane, apical microvilli, retraction fibres; vesicles at all depths."""
    area = math.pi * cell.a * cell.b
    n = int(1.5 * area)
    x, y = _random_inside(cell, rng, n, bias=0.45)
    patches = np.stack([x, y, rng.uniform(0.005, 0.04, n), 0.6 * rng.lognormal(0.0, 0.6, n)], 1)
    n = int(0.8 * area)
    x, y = _random_inside(cell, rng, n, bias=0.5, limit=0.9)
    top = cell.body_height(x, y)
    length = rng.uniform(0.3, 0.9, n)
    lean = rng.normal(0.0, 0.2, (2, n))
    villi = np.stack([x, y, top, x + lean[0], y + lean[1], top + length, np.full(n, 1.2)], 1)
    villi = villi[top > 0.3]
    vesicles = _puncta(cell, rng, (250, 600), 3.0)
    parts = [villi, *_filopodia(cell, rng, (8, 24), 2.0), *_ruffles(cell, rng)]
    return parts, np.concatenate([patches, vesicles], 0)


# ----------------------------------------------------------------- GFAP tissue
def _tissue(cell: Cell, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """An astrocyte: a soma at any depth and branching processes through the section."""
    depth = tissue_thickness_um(cell.seed)
    soma = np.array([cell.cx, cell.cy, rng.uniform(0.3, depth - 0.3)])
    parts: list[np.ndarray] = []
    starts = [(soma, int(rng.integers(4, 9)), (8.0, 22.0), 6.0)]
    for origin, count, (lmin, lmax), amount in starts:
        for _ in range(count):
            path = _random_walk(rng, origin, rng.uniform(lmin, lmax), depth)
            taper = np.linspace(1.0, 0.35, len(path) - 1)
            seg = _polyline_segments(path, 0.0)
            seg[:, 6] = amount * rng.lognormal(0.0, 0.3) * taper
            parts.append(seg)
            for _ in range(int(rng.integers(0, 3))):
                k = int(rng.integers(len(path) // 3, len(path)))
                branch = _random_walk(rng, path[k], rng.uniform(3.0, 10.0), depth)
                bseg = _polyline_segments(branch, 0.0)
                bseg[:, 6] = 0.5 * amount * rng.lognormal(0.0, 0.3)
                parts.append(bseg)
    n = 120
    offs = rng.normal(0.0, 1.5, (n, 3))
    body = np.column_stack([soma + offs, np.full(n, 1.0)])
    body[:, 2] = np.clip(body[:, 2], 0.02, depth)
    return parts, body


def _random_walk(
    rng: np.random.Generator, origin: np.ndarray, length: float, depth: float
) -> np.ndarray:
    """A persistent 3D walk of `length` um in 0.5 um steps, reflected inside [0.02, depth]."""
    steps = max(2, int(length / 0.5))
    d = rng.normal(0.0, 1.0, 3)
    d[2] *= 0.6
    d /= np.linalg.norm(d)
    pts = [np.asarray(origin, float)]
    for _ in range(steps):
        d = d + rng.normal(0.0, 0.25, 3)
        d /= np.linalg.norm(d)
        p = pts[-1] + 0.5 * d
        if not 0.02 <= p[2] <= depth:
            d[2] = -d[2]
            p[2] = np.clip(p[2], 0.02, depth)
        pts.append(p)
    return np.asarray(pts)


_CONTENT = {"factin": _factin, "membrane": _membrane, "tissue": _tissue}


def _floating(cell: Cell, rng: np.random.Generator) -> np.ndarray:
    """Out-of-volume emitters above the cells: a floating rounded cell (sometimes) and debris."""
    floor = tissue_thickness_um(cell.seed) + 1.0 if cell.family == "tissue" else 7.0
    out = []
    if rng.random() < cell.spec.floating_probability:
        r = rng.uniform(2.5, 5.0)
        n = int(40 * r**2)
        v = rng.normal(0.0, 1.0, (n, 3))
        v *= (r * rng.random(n) ** (1 / 3) / np.linalg.norm(v, axis=1))[:, None]
        cx, cy = cell.cx + rng.normal(0, 5), cell.cy + rng.normal(0, 5)
        centre = np.array([cx, cy, rng.uniform(min(floor + r, TOP_UM - 0.5), TOP_UM)])
        pts = centre + v
        pts[:, 2] = np.clip(pts[:, 2], floor, TOP_UM)
        out.append(np.column_stack([pts, np.full(n, 1.0)]))
    n = int(rng.integers(3, 12))
    x, y = cell.cx + rng.uniform(-12, 12, n), cell.cy + rng.uniform(-12, 12, n)
    debris = np.stack([x, y, rng.uniform(floor, TOP_UM, n), 15.0 * rng.lognormal(0, 0.6, n)], 1)
    out.append(debris)
    return np.concatenate(out, 0)


@functools.lru_cache(maxsize=2048)
def cell_at(seed: int, i: int, j: int, family: str = DEFAULT_FAMILY) -> Cell | None:
    """The cell at grid site (i, j) of slide `seed` of `family`, or None for an empty site."""
    spec = FAMILY_SPECS[check_family(family)]
    if math.hypot(i, j) * spec.grid_um > SPECIMEN_RADIUS_UM:
        return None
    rng = np.random.default_rng([_zig(seed), _zig(i), _zig(j), _SALT, _family_index(family)])
    empty = rng.random() < spec.empty_fraction
    if empty and (i, j) != (0, 0):
        return None
    jit = rng.uniform(-spec.jitter_um, spec.jitter_um, 2)
    cx, cy = (np.array([i, j], float) * spec.grid_um + jit).tolist()
    theta = rng.uniform(0, np.pi)
    a = rng.uniform(*spec.semi_axis_um)
    b = a * (rng.uniform(0.6, 0.85) if spec.has_body else 1.0)
    orders = np.arange(2, 6)
    harmonics = np.stack(
        [orders, rng.normal(0.0, 0.08, 4) / (orders - 1), rng.uniform(0, 2 * np.pi, 4)], 1
    )
    harmonics[:, 1] = np.clip(harmonics[:, 1], -0.1, 0.1)
    n_lobes = int(rng.integers(0, 4))
    lobes = np.stack(
        [
            rng.uniform(0, 2 * np.pi, n_lobes),
            rng.uniform(0.15, _MAX_MODULATION - 1.2, n_lobes),
            rng.uniform(0.12, 0.3, n_lobes),
        ],
        1,
    )
    if not spec.has_body:
        harmonics[:, 1] = 0.0
        lobes = lobes[:0]
    along, across = rng.uniform(-0.25, 0.25) * a, rng.uniform(-0.15, 0.15) * b
    nx = cx + along * math.cos(theta) - across * math.sin(theta)
    ny = cy + along * math.sin(theta) + across * math.cos(theta)
    n_a = rng.uniform(4.0, 6.0)
    n_b = n_a * rng.uniform(0.65, 0.9)
    n_c = rng.uniform(1.2, 1.7)
    n_bottom = rng.uniform(0.6, 1.0)
    height = n_bottom + 2 * n_c + rng.uniform(0.4, 1.2)
    return Cell(
        seed=int(seed),
        site=(int(i), int(j)),
        family=family,
        cx=cx,
        cy=cy,
        theta=theta,
        a=a,
        b=b,
        harmonics=harmonics,
        lobes=lobes,
        nx=nx,
        ny=ny,
        ntheta=theta + rng.normal(0.0, 0.2),
        na=n_a,
        nb=n_b,
        nc=n_c,
        nz=n_bottom + n_c,
        height=height,
        lamella=rng.uniform(0.35, 0.7),
        lamella_inner=rng.uniform(2.6, 3.6),
        brightness=float(rng.lognormal(0.0, 0.2)),
    )


def cells_in_box(
    seed: int, xmin: float, xmax: float, ymin: float, ymax: float, family: str = DEFAULT_FAMILY
) -> list[Cell]:
    """Cells whose bounding box (footprint plus filopodia) overlaps the rectangle (um)."""
    grid = FAMILY_SPECS[check_family(family)].grid_um
    i0, i1 = math.floor((xmin - _REACH_UM) / grid), math.ceil((xmax + _REACH_UM) / grid)
    j0, j1 = math.floor((ymin - _REACH_UM) / grid), math.ceil((ymax + _REACH_UM) / grid)
    out = []
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            cell = cell_at(seed, i, j, family)
            if cell is None:
                continue
            bx0, bx1, by0, by1 = cell.bbox
            if bx1 >= xmin and bx0 <= xmax and by1 >= ymin and by0 <= ymax:
                out.append(cell)
    return out


def field_has_cells(
    seed: int, center_um: tuple[float, float], size_um: float, family: str = DEFAULT_FAMILY
) -> bool:
    """Whether any cell's footprint reaches into the square field (side `size_um`)."""
    half = size_um / 2.0
    xmin, xmax = center_um[0] - half, center_um[0] + half
    ymin, ymax = center_um[1] - half, center_um[1] + half
    for cell in cells_in_box(seed, xmin, xmax, ymin, ymax, family):
        bx0, bx1, by0, by1 = cell.bbox
        xs = np.arange(max(xmin, bx0), min(xmax, bx1) + 0.25, 0.25)
        ys = np.arange(max(ymin, by0), min(ymax, by1) + 0.25, 0.25)
        u, _ = cell.footprint(xs[None, :], ys[:, None])
        if np.any(u < 1.0):
            return True
    return False


class AxialSampling:
    """Hat (linear-interpolation) axial profiles of a set of plane heights.

    Plane k collects what lies between its neighbours, weighted linearly; the end planes
    mirror their one neighbour's gap. Inside the planes' span the profiles sum to 1, so
    the sum over planes of a rendered volume is the projected amount.
    """

    def __init__(self, z_um: Sequence[float] | np.ndarray) -> None:
        z = np.asarray(z_um, dtype=np.float64).ravel()
        if z.size == 0 or not np.all(np.isfinite(z)):
            raise ValueError("z_um must be a non-empty sequence of finite plane heights")
        if np.any(np.diff(z) <= 0):
            raise ValueError("z_um must be strictly increasing")
        gaps = np.diff(z)
        if z.size == 1:
            left = right = np.array([SINGLE_PLANE_HALF_WIDTH_UM])
        else:
            left = np.concatenate([[gaps[0]], gaps])
            right = np.concatenate([gaps, [gaps[-1]]])
        self.z, self.left, self.right = z, left, right

    @property
    def thickness(self) -> np.ndarray:
        """Integral of each plane's profile (um): the slab a plane stands for."""
        return 0.5 * (self.left + self.right)

    def hat(self, k: int, z: np.ndarray | float) -> np.ndarray:
        """Profile of plane k at heights z."""
        up = (np.asarray(z) - (self.z[k] - self.left[k])) / self.left[k]
        down = ((self.z[k] + self.right[k]) - np.asarray(z)) / self.right[k]
        return np.clip(np.minimum(up, down), 0.0, 1.0)

    def cumulative(self, k: int, z: np.ndarray | float) -> np.ndarray:
        """Integral of plane k's profile from -inf to z (um)."""
        a, b = self.left[k], self.right[k]
        t1 = np.clip((np.asarray(z) - (self.z[k] - a)) / a, 0.0, 1.0)
        t2 = np.clip((np.asarray(z) - self.z[k]) / b, 0.0, 1.0)
        return 0.5 * a * t1 * t1 + 0.5 * b * t2 * (2.0 - t2)

    def point_weights(
        self, zp: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The two planes around each height and their profile weights."""
        n = self.z.size
        lo = np.clip(np.searchsorted(self.z, zp, side="right") - 1, 0, n - 1)
        hi = np.minimum(lo + 1, n - 1)
        w_lo = self._hat_many(lo, zp)
        w_hi = np.where(hi != lo, self._hat_many(hi, zp), 0.0)
        return lo, w_lo, hi, w_hi

    def _hat_many(self, k: np.ndarray, zp: np.ndarray) -> np.ndarray:
        up = (zp - (self.z[k] - self.left[k])) / self.left[k]
        down = ((self.z[k] + self.right[k]) - zp) / self.right[k]
        return np.clip(np.minimum(up, down), 0.0, 1.0)


class SpecimenRenderer:
    """Rasterises the slide over one field; planes can be rendered in chunks."""

    def __init__(
        self,
        seed: int,
        center_um: tuple[float, float],
        shape_yx: tuple[int, int],
        pixel_size_um: float,
        z_um: Sequence[float] | np.ndarray,
        family: str = DEFAULT_FAMILY,
    ) -> None:
        if pixel_size_um <= 0:
            raise ValueError("pixel_size_um must be positive")
        self.shape = (int(shape_yx[0]), int(shape_yx[1]))
        if min(self.shape) < 1:
            raise ValueError(f"shape_yx must be positive, got {shape_yx}")
        self.family = check_family(family)
        self.seed = int(seed)
        self.pixel = float(pixel_size_um)
        self.axial = AxialSampling(z_um)
        h, w = self.shape
        # physical position of pixel (0, 0)'s centre; the centre lies between pixels when even
        self.x0 = center_um[0] - (w - 1) / 2 * self.pixel
        self.y0 = center_um[1] - (h - 1) / 2 * self.pixel
        reach = 3 * FILAMENT_SIGMA_UM + 2 * self.pixel
        xmax, ymax = self.x0 + (w - 1) * self.pixel, self.y0 + (h - 1) * self.pixel
        self.cells = cells_in_box(
            seed, self.x0 - reach, xmax + reach, self.y0 - reach, ymax + reach, family
        )
        self._points = self._sample_points()
        self._column_cache: dict[tuple[int, int], _Columns | None] = {}

    def _sample_points(self) -> np.ndarray:
        """All filament samples and puncta in the field: (n, 4) x, y, z, amount."""
        if not self.cells:
            return np.zeros((0, 4))
        seg = np.concatenate([c.content[0] for c in self.cells], 0)
        h, w = self.shape
        margin = 1.0
        xlo, xhi = self.x0 - margin, self.x0 + (w - 1) * self.pixel + margin
        ylo, yhi = self.y0 - margin, self.y0 + (h - 1) * self.pixel + margin
        near = ~(
            (np.maximum(seg[:, 0], seg[:, 3]) < xlo)
            | (np.minimum(seg[:, 0], seg[:, 3]) > xhi)
            | (np.maximum(seg[:, 1], seg[:, 4]) < ylo)
            | (np.minimum(seg[:, 1], seg[:, 4]) > yhi)
        )
        seg = seg[near]
        d = seg[:, 3:6] - seg[:, 0:3]
        length = np.sqrt((d * d).sum(1))
        n = np.maximum(1, np.ceil(length / FILAMENT_STEP_UM).astype(np.int64))
        idx = np.repeat(np.arange(len(seg)), n)
        first = np.repeat(np.cumsum(n) - n, n)
        t = (np.arange(idx.size) - first + 0.5) / n[idx]
        xyz = seg[idx, 0:3] + t[:, None] * d[idx]
        amount = seg[idx, 6] * length[idx] / n[idx]
        lines = np.concatenate([xyz, amount[:, None]], 1)
        puncta = np.concatenate([c.content[1] for c in self.cells], 0)
        return np.concatenate([lines, puncta], 0)

    def render(self, planes: slice | None = None, lateral_profile: bool = True) -> np.ndarray:
        """Planes `planes` (default all) as float32 (k, Y, X) amounts.

        `lateral_profile=False` skips the Gaussian filament profile (a caller that filters
        in Fourier space applies it there: `FILAMENT_SIGMA_UM`).
        """
        k0, k1, _ = (planes or slice(None)).indices(self.axial.z.size)
        h, w = self.shape
        vol = np.zeros((max(k1 - k0, 0), h, w), np.float32)
        if vol.shape[0] == 0:
            return vol
        self._deposit(vol, k0, k1)
        for cell in self.cells:
            self._add_diffuse(vol, k0, k1, cell)
        if self.family == "tissue":
            self._add_slab(vol, k0, k1)
        if lateral_profile:
            sigma = FILAMENT_SIGMA_UM / self.pixel
            for i, plane in enumerate(vol):
                if plane.any():
                    vol[i] = ndimage.gaussian_filter(plane, sigma, mode="constant", truncate=3.0)
        return vol

    def _deposit(self, vol: np.ndarray, k0: int, k1: int) -> None:
        """Bilinear splatting of every point into its two planes (one bincount per chunk)."""
        plane, index, weight = self._splat
        if plane.size == 0:
            return
        hw = self.shape[0] * self.shape[1]
        sel = (plane >= k0) & (plane < k1)
        if sel.any():
            flat = vol.reshape(-1)
            where = index[sel] + (plane[sel] - k0).astype(np.int64) * hw
            flat += np.bincount(where, weight[sel], minlength=flat.size).astype(np.float32)

    @functools.cached_property
    def _splat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plane, in-plane pixel index and amount of every (point, plane, corner) share."""
        p = self._points
        h, w = self.shape
        fx = (p[:, 0] - self.x0) / self.pixel
        fy = (p[:, 1] - self.y0) / self.pixel
        keep = (fx > -1) & (fx < w) & (fy > -1) & (fy < h)
        p, fx, fy = p[keep], fx[keep], fy[keep]
        lo, w_lo, hi, w_hi = self.axial.point_weights(p[:, 2])
        ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        tx, ty = fx - ix, fy - iy
        planes, indices, weights = [], [], []
        amount = p[:, 3]
        for pl, wz in ((lo, w_lo), (hi, w_hi)):
            for oy, wy in ((0, 1.0 - ty), (1, ty)):
                yy = iy + oy
                for ox, wx in ((0, 1.0 - tx), (1, tx)):
                    xx = ix + ox
                    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                    planes.append(pl.astype(np.int32))
                    indices.append(np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1))
                    weights.append(np.where(ok, amount * wz * wy * wx, 0.0))
        return np.concatenate(planes), np.concatenate(indices), np.concatenate(weights)

    def _add_slab(self, vol: np.ndarray, k0: int, k1: int) -> None:
        """The tissue section's dim, uniform background between the coverslip and its top."""
        depth = tissue_thickness_um(self.seed)
        ax = self.axial
        per_voxel = TISSUE_BACKGROUND_PER_UM3 * self.pixel**2
        for k in range(k0, k1):
            amount = per_voxel * float(ax.cumulative(k, depth) - ax.cumulative(k, 0.0))
            if amount > 0:
                vol[k - k0] += np.float32(amount)

    def _columns(self, cell: Cell) -> _Columns | None:
        """The cell's columns in this field (computed once, reused by every plane chunk)."""
        if cell.site in self._column_cache:
            return self._column_cache[cell.site]
        self._column_cache[cell.site] = cols = _Columns.build(cell, self)
        return cols

    def _add_diffuse(self, vol: np.ndarray, k0: int, k1: int, cell: Cell) -> None:
        """Cytosol, nucleus and membranes of one cell, integrated over each plane's profile."""
        spec = cell.spec
        if not spec.has_body:
            return
        cols = self._columns(cell)
        if cols is None:
            return
        area = self.pixel**2 * cell.brightness
        cyto = spec.cytosol * area
        extra = (spec.nucleus - spec.cytosol) * area
        ax = self.axial
        apical = spec.apical * area
        r0, r1, c0, c1 = cols.box
        for k in range(k0, k1):
            lo, hi = ax.z[k] - ax.left[k], ax.z[k] + ax.right[k]
            if lo >= cols.z_top:
                break
            sub = vol[k - k0, r0:r1, c0:c1]
            below = float(ax.cumulative(k, 0.0))
            basal = spec.basal * area * float(ax.hat(k, _BASAL_MEMBRANE_Z_UM))
            # columns whose top is above the plane's profile hold a full slab of cytosol
            full = cyto * (float(ax.thickness[k]) - below) + basal
            np.add(sub, np.float32(full), out=sub, where=cols.top2d >= hi)
            if basal:
                np.add(sub, np.float32(basal), out=sub, where=cols.inside & (cols.top2d <= lo))
            # columns whose top lies within the profile: partial slab and the apical membrane
            i0 = np.searchsorted(cols.sorted_top, lo, side="right")
            i1 = np.searchsorted(cols.sorted_top, hi, side="left")
            if i1 > i0:
                t = cols.sorted_top[i0:i1]
                vals = cyto * (ax.cumulative(k, t) - below) + basal
                vals += apical * cols.sorted_slope[i0:i1] * ax.hat(k, t)
                rows, cs = cols.sorted_index[0][i0:i1], cols.sorted_index[1][i0:i1]
                sub[rows, cs] += vals.astype(np.float32)
            if cols.n_lo.size and cols.n_span[0] < hi and cols.n_span[1] > lo:
                nuc = extra * (ax.cumulative(k, cols.n_hi) - ax.cumulative(k, cols.n_lo))
                sub[cols.nucleus_index] += nuc.astype(np.float32)


@dataclass
class _Columns:
    """Per-pixel body top, membrane slope and nucleus span of one cell inside one field."""

    box: tuple[int, int, int, int]  # r0, r1, c0, c1 in field pixels
    inside: np.ndarray  # bool (r1 - r0, c1 - c0)
    top: np.ndarray  # body height of the inside pixels
    slope: np.ndarray  # membrane area factor sqrt(1 + |grad top|^2)
    in_nucleus: np.ndarray  # bool over the inside pixels
    n_lo: np.ndarray  # nucleus span where in_nucleus
    n_hi: np.ndarray
    z_top: float
    top2d: np.ndarray  # body height over the box, -1 outside the footprint
    sorted_top: np.ndarray  # inside pixels' heights, ascending
    sorted_slope: np.ndarray
    sorted_index: tuple[np.ndarray, np.ndarray]  # their (row, col) in the box
    nucleus_index: tuple[np.ndarray, np.ndarray]  # (row, col) of the nucleus columns
    n_span: tuple[float, float]

    @classmethod
    def build(cls, cell: Cell, r: SpecimenRenderer) -> _Columns | None:
        h, w = r.shape
        bx0, bx1, by0, by1 = cell.bbox
        c0 = max(0, math.floor((bx0 - r.x0) / r.pixel))
        c1 = min(w, math.ceil((bx1 - r.x0) / r.pixel) + 1)
        r0 = max(0, math.floor((by0 - r.y0) / r.pixel))
        r1 = min(h, math.ceil((by1 - r.y0) / r.pixel) + 1)
        if c1 - c0 < 2 or r1 - r0 < 2:  # np.gradient needs two samples per axis
            return None
        xx, yy = np.meshgrid(r.x0 + np.arange(c0, c1) * r.pixel, r.y0 + np.arange(r0, r1) * r.pixel)
        u, _ = cell.footprint(xx, yy)
        inside = u < 1.0
        if not inside.any():
            return None
        top2d = cell.body_height(xx, yy)
        gy, gx = np.gradient(top2d, r.pixel)
        top = top2d[inside]
        n_lo, n_hi = cell.nucleus_span(xx[inside], yy[inside], top)
        in_nucleus = n_hi > n_lo
        slope = np.sqrt(1.0 + gx * gx + gy * gy)[inside]
        rr, cc = np.nonzero(inside)
        order = np.argsort(top, kind="stable")
        n_lo, n_hi = n_lo[in_nucleus], n_hi[in_nucleus]
        span = (float(n_lo.min()), float(n_hi.max())) if n_lo.size else (0.0, 0.0)
        return cls(
            box=(r0, r1, c0, c1),
            inside=inside,
            top=top,
            slope=slope,
            in_nucleus=in_nucleus,
            n_lo=n_lo,
            n_hi=n_hi,
            z_top=float(top.max()),
            top2d=np.where(inside, top2d, -1.0),
            sorted_top=top[order],
            sorted_slope=slope[order],
            sorted_index=(rr[order], cc[order]),
            nucleus_index=(rr[in_nucleus], cc[in_nucleus]),
            n_span=span,
        )


def render_volume(
    seed: int,
    center_um: tuple[float, float],
    shape_yx: tuple[int, int],
    pixel_size_um: float,
    z_um: np.ndarray,
    family: str = DEFAULT_FAMILY,
) -> np.ndarray:
    """Fluorophore amounts of slide `seed` as float32 (Z, Y, X) at plane heights `z_um`.

    `center_um` is the (x, y) of the field's centre; x grows with the column index, y
    with the row index. Only cells overlapping the field are rasterised.
    """
    return SpecimenRenderer(seed, center_um, shape_yx, pixel_size_um, z_um, family).render()


def field_statistics(
    seed: int,
    center_um: tuple[float, float],
    size_um: float,
    family: str = DEFAULT_FAMILY,
    step_um: float = 0.25,
) -> dict[str, float]:
    """Coverage and height of the cells over a square field: what a frame is made of.

    `cell_fraction`: the share of the field under some cell's footprint (the tissue
    family counts as fully covered); `mean_height_um`: the mean top height under cells.
    """
    n = max(2, int(size_um / step_um))
    xs = center_um[0] + (np.arange(n) - (n - 1) / 2) * step_um
    ys = center_um[1] + (np.arange(n) - (n - 1) / 2) * step_um
    xx, yy = np.meshgrid(xs, ys)
    half = size_um / 2
    top = np.zeros_like(xx)
    covered = np.zeros(xx.shape, bool)
    cells = cells_in_box(
        seed,
        center_um[0] - half,
        center_um[0] + half,
        center_um[1] - half,
        center_um[1] + half,
        family,
    )
    for cell in cells:
        u, _ = cell.footprint(xx, yy)
        covered |= u < 1.0
        top = np.maximum(top, cell.body_height(xx, yy))
    if family == "tissue":
        return {"cell_fraction": 1.0, "mean_height_um": tissue_thickness_um(seed)}
    mean = float(top[covered].mean()) if covered.any() else 0.0
    return {"cell_fraction": float(covered.mean()), "mean_height_um": mean}
