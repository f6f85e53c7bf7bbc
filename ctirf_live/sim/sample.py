"""Synthetic F-actin-labelled cells on a virtual slide, in physical coordinates.

The slide is an infinite jittered grid of cell sites `GRID_UM` apart. Everything about
the cell at site (i, j) is drawn from an RNG seeded by (slide seed, i, j), so a field's
content depends only on the seed and where it is, never on the order of visits, and the
same field renders consistently at any pixel size (60X: 97.5 nm, 100X: 58.5 nm). About
`EMPTY_FRACTION` of the sites hold no cell (the origin site always holds one, so the
home position shows a cell).

Each cell (heights above the coverslip, z = 0):

- a footprint (a wobbly ellipse with lobes, 24-38 um long) under a body whose top is a thin
  lamella (0.2-0.7 um) rising to a dome over the nucleus (3.6-6 um high);
- cortical actin meshwork: many short filaments at z 0.02-0.2 um, denser at the edge;
- stress fibres: long bundles near the bottom (z 0.03-0.3 um) along the long axis;
- arches: bundles whose ends sit at z ~ 0 and whose middle rises 0.5-1.5 um (the
  paper's test structure: continuous in EPI, broken in TIRF);
- perinuclear cap fibres following the top of the dome;
- a nucleus (ellipsoid, about 1-4 um up) and diffuse cytosol filling the body;
- a membrane (basal sheet at the coverslip + the body's top surface), dim;
- puncta (vesicles) at random depths.

Values are fluorophore amounts per voxel (arbitrary units: 1 = one micrometre of a
single filament), not densities: plane k holds everything within a linear-interpolation
("hat") axial profile around z_k, so summing over z gives the projected amount whatever
the plane spacing (planes may be non-uniform). Filaments are polylines sampled every
`FILAMENT_STEP_UM` and deposited with a Gaussian lateral profile of `FILAMENT_SIGMA_UM`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID_UM = 40.0
JITTER_UM = 4.0
EMPTY_FRACTION = 0.12
FILAMENT_STEP_UM = 0.04
FILAMENT_SIGMA_UM = 0.05
SINGLE_PLANE_HALF_WIDTH_UM = 0.1  # axial half-width of the hat when only one plane is asked

_MAX_SEMI_AXIS_UM = 19.0
_MAX_MODULATION = 1.65
_REACH_UM = _MAX_SEMI_AXIS_UM * _MAX_MODULATION + JITTER_UM + 1.0
_SALT = 0xC6  # C6 glioma cells
_BASAL_MEMBRANE_Z_UM = 0.01

# linear densities (amount per um of line) and volume/area densities
_MESH_PER_UM2 = 2.0
_MESH_LAMBDA = 1.0
_FIBRE_LAMBDA = 6.0
_ARCH_LAMBDA = 5.0
_CAP_LAMBDA = 3.0
_CYTOSOL_PER_UM3 = 2.5
_NUCLEUS_PER_UM3 = 4.0
_MEMBRANE_PER_UM2 = 0.8
_PUNCTUM_AMOUNT = 3.0


def _zig(n: int) -> int:
    """Map any integer to a non-negative one, one-to-one (SeedSequence wants >= 0)."""
    n = int(n)
    return 2 * n if n >= 0 else -2 * n - 1


@dataclass(frozen=True, eq=False)
class Cell:
    """One cell's geometry: footprint, body height and nucleus; filaments and puncta lazily.

    The shape comes from the site's RNG stream, the content (filaments, puncta) from a
    second stream of the same site, drawn only when a field first needs it.
    """

    seed: int
    site: tuple[int, int]
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
    lamella: float  # lamella thickness (um)
    brightness: float

    @functools.cached_property
    def bbox(self) -> tuple[float, float, float, float]:
        """Bounding box of the footprint: xmin, xmax, ymin, ymax (um)."""
        return _boundary_bbox(self)

    @functools.cached_property
    def content(self) -> tuple[np.ndarray, np.ndarray]:
        """Filament segments (n, 7: x0, y0, z0, x1, y1, z1, amount per um) and puncta
        (n, 4: x, y, z, amount), read-only."""
        i, j = self.site
        rng = np.random.default_rng([_zig(self.seed), _zig(i), _zig(j), _SALT, 1])
        parts = [_mesh(self, rng), *_stress_fibres(self, rng), *_arches(self, rng)]
        parts += _cap_fibres(self, rng)
        segments = np.concatenate(parts, 0)
        segments[:, 6] *= self.brightness
        puncta = _puncta(self, rng)
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
        """Height of the cell's top surface (0 outside the footprint)."""
        u, dist = self.footprint(x, y)
        taper = np.sqrt(np.clip(dist / 0.6, 0.0, 1.0))
        lamella = self.lamella * (1.0 + (1.0 - np.clip(u, 0.0, 1.0)))
        dn2 = self._nucleus_q(x, y, scale=1.7)
        dome = self.height * np.clip(1.0 - dn2, 0.0, 1.0) ** 0.75
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
    return float(x.min()), float(x.max()), float(y.min()), float(y.max())


def _to_world(cell: Cell, xr: np.ndarray, yr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(cell.theta), math.sin(cell.theta)
    return cell.cx + xr * c - yr * s, cell.cy + xr * s + yr * c


def _polyline_segments(xyz: np.ndarray, amount_per_um: float) -> np.ndarray:
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
    u0, _ = cell.footprint(segs[:, 0], segs[:, 1])
    u1, _ = cell.footprint(segs[:, 3], segs[:, 4])
    return segs[(u0 < limit) & (u1 < limit)]


def _random_inside(
    cell: Cell, rng: np.random.Generator, n: int, bias: float = 0.5
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
        keep = u < 0.97
        xs.append(x[keep])
        ys.append(y[keep])
        got += int(keep.sum())
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def _mesh(cell: Cell, rng: np.random.Generator) -> np.ndarray:
    n = int(_MESH_PER_UM2 * math.pi * cell.a * cell.b)
    x, y = _random_inside(cell, rng, n, bias=0.35)
    length = np.clip(rng.exponential(0.7, n) + 0.2, 0.2, 2.5)
    phi = rng.uniform(0, np.pi, n)
    z = rng.uniform(0.02, 0.2, n)
    dz = rng.normal(0.0, 0.03, n)
    hx, hy = 0.5 * length * np.cos(phi), 0.5 * length * np.sin(phi)
    seg = np.stack(
        [x - hx, y - hy, np.clip(z - dz, 0.0, 0.2), x + hx, y + hy, np.clip(z + dz, 0.0, 0.2)],
        1,
    )
    seg = np.concatenate([seg, np.full((n, 1), _MESH_LAMBDA)], 1)
    return _inside_runs(seg, cell, 1.0)


def _stress_fibres(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(int(rng.integers(5, 14))):
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
        amount = _FIBRE_LAMBDA * rng.lognormal(0.0, 0.35)
        for seg in _bundle(x, y, z, 3, 0.07, amount):
            out.append(_inside_runs(seg, cell, 0.97))
    return out


def _arches(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    """Bundles rising from the coverslip to 0.5-1.5 um and back, where the body is thick."""
    wanted = int(rng.integers(2, 6))
    n = 48
    top = rng.uniform(0.5, 1.5, n)
    length = rng.uniform(4.0, 9.0, n)
    phi = rng.uniform(0, np.pi, n)
    amount = _ARCH_LAMBDA * rng.lognormal(0.0, 0.2, n)
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


def _cap_fibres(cell: Cell, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    c, s = math.cos(cell.ntheta), math.sin(cell.ntheta)
    for _ in range(int(rng.integers(2, 5))):
        off = rng.uniform(-0.7, 0.7) * cell.nb
        dev = rng.normal(0.0, 0.15)
        along = np.linspace(-1.6, 1.6, 17) * cell.na
        ax = along * math.cos(dev) - off * math.sin(dev)
        ay = along * math.sin(dev) + off * math.cos(dev)
        x, y = cell.nx + ax * c - ay * s, cell.ny + ax * s + ay * c
        z = np.maximum(cell.body_height(x, y) - 0.25, 0.05)
        seg = _polyline_segments(np.stack([x, y, z], 1), _CAP_LAMBDA * rng.lognormal(0.0, 0.3))
        out.append(_inside_runs(seg, cell, 0.97))
    return out


def _puncta(cell: Cell, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(20, 60))
    x, y = _random_inside(cell, rng, n)
    z = rng.uniform(0.03, 0.97, n) * cell.body_height(x, y)
    amount = _PUNCTUM_AMOUNT * rng.lognormal(0.0, 0.5, n)
    return np.stack([x, y, z, amount], 1)


@functools.lru_cache(maxsize=1024)
def cell_at(seed: int, i: int, j: int) -> Cell | None:
    """The cell at grid site (i, j) of slide `seed`, or None for an empty site."""
    rng = np.random.default_rng([_zig(seed), _zig(i), _zig(j), _SALT])
    empty = rng.random() < EMPTY_FRACTION
    if empty and (i, j) != (0, 0):
        return None
    cx, cy = (np.array([i, j], float) * GRID_UM + rng.uniform(-JITTER_UM, JITTER_UM, 2)).tolist()
    theta = rng.uniform(0, np.pi)
    a = rng.uniform(12.0, _MAX_SEMI_AXIS_UM)
    b = a * rng.uniform(0.55, 0.85)
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
    along, across = rng.uniform(-0.25, 0.25) * a, rng.uniform(-0.15, 0.15) * b
    nx = cx + along * math.cos(theta) - across * math.sin(theta)
    ny = cy + along * math.sin(theta) + across * math.cos(theta)
    n_a = rng.uniform(4.0, 6.0)
    n_b = n_a * rng.uniform(0.65, 0.9)
    n_c = rng.uniform(1.2, 1.6)
    n_bottom = rng.uniform(0.8, 1.2)
    height = n_bottom + 2 * n_c + rng.uniform(0.4, 1.4)
    return Cell(
        seed=int(seed),
        site=(int(i), int(j)),
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
        lamella=rng.uniform(0.2, 0.35),
        brightness=float(rng.lognormal(0.0, 0.2)),
    )


def cells_in_box(seed: int, xmin: float, xmax: float, ymin: float, ymax: float) -> list[Cell]:
    """Cells whose footprint bounding box overlaps the rectangle (um)."""
    i0, i1 = math.floor((xmin - _REACH_UM) / GRID_UM), math.ceil((xmax + _REACH_UM) / GRID_UM)
    j0, j1 = math.floor((ymin - _REACH_UM) / GRID_UM), math.ceil((ymax + _REACH_UM) / GRID_UM)
    out = []
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            cell = cell_at(seed, i, j)
            if cell is None:
                continue
            bx0, bx1, by0, by1 = cell.bbox
            if bx1 >= xmin and bx0 <= xmax and by1 >= ymin and by0 <= ymax:
                out.append(cell)
    return out


def field_has_cells(seed: int, center_um: tuple[float, float], size_um: float) -> bool:
    """Whether any cell's footprint reaches into the square field (side `size_um`)."""
    half = size_um / 2.0
    xmin, xmax = center_um[0] - half, center_um[0] + half
    ymin, ymax = center_um[1] - half, center_um[1] + half
    for cell in cells_in_box(seed, xmin, xmax, ymin, ymax):
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
    ) -> None:
        if pixel_size_um <= 0:
            raise ValueError("pixel_size_um must be positive")
        self.shape = (int(shape_yx[0]), int(shape_yx[1]))
        if min(self.shape) < 1:
            raise ValueError(f"shape_yx must be positive, got {shape_yx}")
        self.pixel = float(pixel_size_um)
        self.axial = AxialSampling(z_um)
        h, w = self.shape
        # physical position of pixel (0, 0)'s centre; the centre lies between pixels when even
        self.x0 = center_um[0] - (w - 1) / 2 * self.pixel
        self.y0 = center_um[1] - (h - 1) / 2 * self.pixel
        reach = 3 * FILAMENT_SIGMA_UM + 2 * self.pixel
        xmax, ymax = self.x0 + (w - 1) * self.pixel, self.y0 + (h - 1) * self.pixel
        self.cells = cells_in_box(
            seed, self.x0 - reach, xmax + reach, self.y0 - reach, ymax + reach
        )
        self._points = self._sample_points()
        self._column_cache: dict[tuple[int, int], _Columns | None] = {}

    def _sample_points(self) -> np.ndarray:
        """All filament samples and puncta in the field: (n, 4) x, y, z, amount."""
        if not self.cells:
            return np.zeros((0, 4))
        seg = np.concatenate([c.content[0] for c in self.cells], 0)
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
        if lateral_profile:
            sigma = FILAMENT_SIGMA_UM / self.pixel
            for i, plane in enumerate(vol):
                if plane.any():
                    vol[i] = ndimage.gaussian_filter(plane, sigma, mode="constant", truncate=3.0)
        return vol

    def _deposit(self, vol: np.ndarray, k0: int, k1: int) -> None:
        p = self._points
        if p.size == 0:
            return
        h, w = self.shape
        fx = (p[:, 0] - self.x0) / self.pixel
        fy = (p[:, 1] - self.y0) / self.pixel
        keep = (fx > -1) & (fx < w) & (fy > -1) & (fy < h)
        p, fx, fy = p[keep], fx[keep], fy[keep]
        lo, w_lo, hi, w_hi = self.axial.point_weights(p[:, 2])
        ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
        tx, ty = fx - ix, fy - iy
        flat = vol.reshape(-1)
        for plane, wz in ((lo, w_lo), (hi, w_hi)):
            sel = (plane >= k0) & (plane < k1) & (wz > 0)
            base_amount = p[sel, 3] * wz[sel]
            base = (plane[sel] - k0) * (h * w)
            for oy, wy in ((0, 1.0 - ty[sel]), (1, ty[sel])):
                for ox, wx in ((0, 1.0 - tx[sel]), (1, tx[sel])):
                    yy, xx = iy[sel] + oy, ix[sel] + ox
                    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                    index = base[ok] + yy[ok] * w + xx[ok]
                    np.add.at(flat, index, (base_amount * wy * wx)[ok].astype(np.float32))

    def _columns(self, cell: Cell) -> _Columns | None:
        """The cell's columns in this field (computed once, reused by every plane chunk)."""
        if cell.site in self._column_cache:
            return self._column_cache[cell.site]
        self._column_cache[cell.site] = cols = _Columns.build(cell, self)
        return cols

    def _add_diffuse(self, vol: np.ndarray, k0: int, k1: int, cell: Cell) -> None:
        """Cytosol, nucleus and membrane of one cell, integrated over each plane's profile."""
        cols = self._columns(cell)
        if cols is None:
            return
        area = self.pixel**2 * cell.brightness
        cyto = _CYTOSOL_PER_UM3 * area
        extra = (_NUCLEUS_PER_UM3 - _CYTOSOL_PER_UM3) * area
        membrane = _MEMBRANE_PER_UM2 * area
        ax = self.axial
        r0, r1, c0, c1 = cols.box
        for k in range(k0, k1):
            if ax.z[k] - ax.left[k] >= cols.z_top:
                break
            amount = cyto * (ax.cumulative(k, cols.top) - ax.cumulative(k, 0.0))
            amount += membrane * (cols.slope * ax.hat(k, cols.top))
            amount += membrane * ax.hat(k, _BASAL_MEMBRANE_Z_UM)
            if cols.n_lo.size:
                amount[cols.in_nucleus] += extra * (
                    ax.cumulative(k, cols.n_hi) - ax.cumulative(k, cols.n_lo)
                )
            sub = vol[k - k0, r0:r1, c0:c1]
            sub[cols.inside] += amount.astype(np.float32)


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
        return cls(
            box=(r0, r1, c0, c1),
            inside=inside,
            top=top,
            slope=np.sqrt(1.0 + gx * gx + gy * gy)[inside],
            in_nucleus=in_nucleus,
            n_lo=n_lo[in_nucleus],
            n_hi=n_hi[in_nucleus],
            z_top=float(top.max()),
        )


def render_volume(
    seed: int,
    center_um: tuple[float, float],
    shape_yx: tuple[int, int],
    pixel_size_um: float,
    z_um: np.ndarray,
) -> np.ndarray:
    """Fluorophore amounts of slide `seed` as float32 (Z, Y, X) at plane heights `z_um`.

    `center_um` is the (x, y) of the field's centre; x grows with the column index, y
    with the row index. Only cells overlapping the field are rasterised.
    """
    return SpecimenRenderer(seed, center_um, shape_yx, pixel_size_um, z_um).render()
