import numpy as np
import pytest

from ctirf_live.sim import sample
from ctirf_live.sim.sample import (
    EMPTY_FRACTION,
    GRID_UM,
    AxialSampling,
    cell_at,
    field_has_cells,
    render_volume,
)

PLANES = np.array([0.0, 0.1, 0.2, 0.4, 0.8, 1.5, 2.5, 4.0, 5.5, 7.0])
PX = 0.0975


def _empty_site(seed: int) -> tuple[float, float]:
    """Centre of an empty grid site with no neighbour reaching within 5 um of it."""
    for i in range(1, 40):
        for j in range(-3, 4):
            if cell_at(seed, i, j) is None:
                centre = (i * GRID_UM, j * GRID_UM)
                if not field_has_cells(seed, centre, 10.0):
                    return centre
    raise AssertionError("no empty site found")


def test_same_seed_and_position_give_the_same_volume_in_any_visit_order() -> None:
    a = render_volume(1, (3.0, -2.0), (48, 64), PX, PLANES)
    render_volume(1, (300.0, 120.0), (48, 64), PX, PLANES)  # visit elsewhere in between
    cell_at.cache_clear()
    b = render_volume(1, (3.0, -2.0), (48, 64), PX, PLANES)
    assert a.shape == (PLANES.size, 48, 64) and a.dtype == np.float32
    assert a.sum() > 0
    np.testing.assert_array_equal(a, b)


def test_different_positions_and_seeds_differ() -> None:
    a = render_volume(1, (0.0, 0.0), (48, 48), PX, PLANES)
    b = render_volume(1, (2.0, 1.0), (48, 48), PX, PLANES)
    c = render_volume(2, (0.0, 0.0), (48, 48), PX, PLANES)
    assert not np.allclose(a, b) and not np.allclose(a, c)


def test_some_sites_are_empty_and_give_blank_fields() -> None:
    empty = [cell_at(5, i, j) is None for i in range(20) for j in range(20)]
    assert 0.5 * EMPTY_FRACTION < np.mean(empty) < 1.6 * EMPTY_FRACTION
    centre = _empty_site(5)
    assert not field_has_cells(5, centre, 10.0)
    vol = render_volume(5, centre, (80, 80), PX, PLANES)
    assert vol.sum() < 1e-3
    assert field_has_cells(5, (0.0, 0.0), 10.0)  # the origin site always holds a cell


def test_projection_does_not_depend_on_plane_spacing() -> None:
    fine = np.round(np.arange(0.0, 7.0001, 0.05), 4)
    a = render_volume(0, (1.0, 1.0), (40, 40), PX, fine).sum(0)
    b = render_volume(0, (1.0, 1.0), (40, 40), PX, PLANES).sum(0)
    assert a.sum() > 0
    assert b.sum() == pytest.approx(a.sum(), rel=0.01)
    np.testing.assert_allclose(b, a, atol=0.02 * a.max())


def test_the_same_physical_field_at_two_pixel_sizes_holds_the_same_amount() -> None:
    a = render_volume(0, (2.0, -1.0), (60, 60), 0.0975, PLANES)  # 5.85 um
    b = render_volume(0, (2.0, -1.0), (100, 100), 0.0585, PLANES)  # 5.85 um
    assert b.sum() == pytest.approx(a.sum(), rel=0.02)


def test_cells_are_deep_with_arches_rising_from_the_coverslip() -> None:
    cell = cell_at(0, 0, 0)
    assert cell is not None and 3.5 < cell.height < 6.5
    segments, puncta = cell.content
    z_mid = 0.5 * (segments[:, 2] + segments[:, 5])
    assert np.any(z_mid < 0.2) and np.any((z_mid > 0.5) & (z_mid < 1.6))
    assert np.any(z_mid > 2.0)  # cap fibres over the nucleus
    assert len(puncta) >= 20 and np.all(puncta[:, 2] >= 0)
    vol = render_volume(0, (cell.nx, cell.ny), (64, 64), PX, PLANES)
    deep = vol[PLANES > 1.0].sum() / vol.sum()
    assert deep > 0.3  # most EPI haze comes from above the coverslip layer


def test_axial_profiles_partition_unity_and_integrate_to_the_plane_thickness() -> None:
    ax = AxialSampling(PLANES)
    z = np.linspace(0.0, 7.0, 301)
    total = sum(ax.hat(k, z) for k in range(PLANES.size))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    for k in range(PLANES.size):
        full = ax.cumulative(k, 100.0)
        assert full == pytest.approx(ax.thickness[k])
    _, w_lo, _, w_hi = ax.point_weights(np.array([0.05, 3.0]))
    np.testing.assert_allclose(w_lo + w_hi, 1.0)
    with pytest.raises(ValueError):
        AxialSampling([0.0, 0.0])


def test_field_rendering_only_touches_overlapping_cells() -> None:
    r = sample.SpecimenRenderer(0, (0.0, 0.0), (32, 32), PX, PLANES)
    assert 1 <= len(r.cells) <= 4


@pytest.mark.parametrize("family", sample.FAMILIES)
def test_every_family_renders_its_own_deterministic_specimen(family: str) -> None:
    a = render_volume(2, (1.0, 2.0), (48, 48), PX, PLANES, family)
    b = render_volume(2, (1.0, 2.0), (48, 48), PX, PLANES, family)
    assert a.sum() > 0
    np.testing.assert_array_equal(a, b)
    other = next(f for f in sample.FAMILIES if f != family)
    assert not np.allclose(a, render_volume(2, (1.0, 2.0), (48, 48), PX, PLANES, other))


def test_dense_factin_cells_fill_the_frame_and_are_thick() -> None:
    stats = [
        sample.field_statistics(3, (37.0 * i, 41.0 * j), 50.0, "factin")
        for i in range(3)
        for j in range(2)
    ]
    assert np.mean([s["cell_fraction"] for s in stats]) > 0.7
    assert np.mean([s["mean_height_um"] for s in stats]) > 2.0
    cell = cell_at(3, 1, 1, "factin")
    segments, puncta = cell.content
    z_mid = 0.5 * (segments[:, 2] + segments[:, 5])
    # ventral meshwork and fibres, structure 0.3-1.5 um up, cap fibres 3-5 um up
    assert np.mean(z_mid < 0.3) > 0.1 and np.mean((z_mid > 0.3) & (z_mid < 1.5)) > 0.2
    assert np.any((z_mid > 3.0) & (z_mid < 5.5))
    assert np.any(puncta[:, 2] > 7.0)  # floating cells / debris above the cells


def test_membrane_and_tissue_families_have_structure_at_every_depth() -> None:
    cell = cell_at(4, 0, 0, "membrane")
    _, puncta = cell.content
    inside = puncta[puncta[:, 2] < 7.0]
    assert np.any(inside[:, 2] < 0.05) and np.any(inside[:, 2] > 1.5)  # basal + vesicles
    depth = sample.tissue_thickness_um(4)
    assert 5.0 <= depth <= 10.0
    z = np.concatenate(
        [cell_at(4, i, j, "tissue").content[0][:, 2] for i in range(3) for j in range(3)]
    )
    assert z.min() < 0.3 and z.max() > 0.6 * depth
    vol = render_volume(4, (0.0, 0.0), (40, 40), PX, PLANES, "tissue")
    assert vol[PLANES > depth + 1.5].sum() < vol[PLANES <= depth].sum()  # slab ends at its top
    with pytest.raises(ValueError, match="choose one of"):
        cell_at(4, 0, 0, "yeast")


def test_cells_end_at_the_edge_of_the_specimen_area() -> None:
    edge = sample.SPECIMEN_RADIUS_UM
    assert not sample.field_has_cells(0, (edge + 1000.0, 0.0), 50.0)
    assert sample.field_has_cells(0, (edge - 1000.0, 0.0), 50.0)


def test_lamellar_bundles_are_level_inside_the_body_at_every_height_to_1_um() -> None:
    cell = cell_at(3, 1, 1, "factin")
    parts = sample._lamellar_bundles(cell, np.random.default_rng(0), 0.06)
    kept = [p for p in parts if len(p)]
    assert len(kept) > 20
    segs = np.concatenate(kept)
    z_mid = 0.5 * (segs[:, 2] + segs[:, 5])
    assert z_mid.min() >= 0.03 and z_mid.max() <= 1.0 + 0.2
    # filaments at every height between the glass and 1 um, not only on it
    counts, _ = np.histogram(z_mid, bins=[0.0, 0.25, 0.5, 0.75, 1.2])
    assert np.all(counts > 0.1 * len(z_mid))
    # nearly level: a bundle 2-7 um long climbs well under 0.5 um
    assert np.percentile(np.abs(segs[:, 5] - segs[:, 2]), 95) < 0.1
    roof = cell.body_height(segs[:, 0], segs[:, 1])
    assert np.all(segs[:, 2] < roof - 0.05)  # under the top surface
