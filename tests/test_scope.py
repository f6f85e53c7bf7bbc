from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from ctirf_live.optics.psf import focal_shift_factor
from ctirf_live.sim.sample import cell_at
from ctirf_live.sim.scope import (
    DEFAULT_RIGS,
    MAX_ADU,
    OFFSET_ADU,
    SAMPLE_PLANES_UM,
    SENSOR_SHAPE,
    SimulatedMicroscope,
    _tirf_plane_weights,
    get_microscope,
    reset_microscope,
    uniform_planes_um,
)

SIDE = 160


def _scope(seed: int = 0, side: int = SIDE) -> SimulatedMicroscope:
    s = SimulatedMicroscope(seed=seed)
    s.roi = ((SENSOR_SHAPE[1] - side) // 2, (SENSOR_SHAPE[0] - side) // 2, side, side)
    return s


def _layer(scope: SimulatedMicroscope, z_um: float, value: float = 1.0) -> None:
    """A uniform thin layer at one height, wider than the ROI plus the PSF margin."""
    scope.set_specimen_override(np.full((1, 600, 600), value, np.float32), [z_um])


def _centre_mean(img: np.ndarray) -> float:
    h, w = img.shape
    return float(img[h // 2 - 8 : h // 2 + 8, w // 2 - 8 : w // 2 + 8].mean())


def test_same_seed_and_calls_give_bit_identical_frames() -> None:
    frames = []
    for _ in range(2):
        s = _scope(seed=7)
        seq = [s.snap()]
        s.set_illumination("TIRF")
        seq.append(s.snap())
        s.z_um = 0.4
        seq.append(s.snap())
        frames.append(seq)
    for a, b in zip(*frames, strict=True):
        assert a.dtype == np.uint16
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(frames[0][0], frames[0][1])


def _no_scatter(scope: SimulatedMicroscope) -> SimulatedMicroscope:
    """The same rig with a purely evanescent TIRF field (no scattered excitation)."""
    name = scope.objective
    scope.rigs[name] = replace(scope.rigs[name], scatter_fraction=0.0)
    return scope


def _medium_level(scope: SimulatedMicroscope, mode: str) -> float:
    """What the autofluorescent medium alone gives (an empty specimen)."""
    scope.set_specimen_override(np.zeros((1, 8, 8), np.float32), [0.0])
    return _centre_mean(scope.noise_free(mode))


def test_deep_specimen_shows_in_epi_but_not_in_tirf() -> None:
    s = _scope()
    m_epi, m_tirf = _medium_level(s, "EPI"), _medium_level(s, "TIRF")
    assert m_epi > 10 * m_tirf > 0  # EPI excites the whole medium column, TIRF a thin layer
    vol = np.zeros((1, 400, 400), np.float32)
    vol[0, 150:250, 150:250] = 5.0
    s.set_specimen_override(vol, [3.0])
    epi, tirf = s.noise_free("EPI") - m_epi, s.noise_free("TIRF") - m_tirf
    assert _centre_mean(epi) > 50.0  # out-of-focus haze: photo-electrons per pixel
    # only the ~10% of scattered TIRF excitation reaches 3 um
    assert 0.0 < _centre_mean(tirf) < 0.1 * _centre_mean(epi)
    _no_scatter(s)
    assert (s.noise_free("TIRF") - m_tirf).max() < 1e-6 * epi.max()


def test_a_filament_1um_up_shows_in_epi_and_not_in_tirf() -> None:
    s = _no_scatter(_scope(side=320))
    vol = np.zeros((4, 400, 400), np.float32)
    vol[0, 120, 100:300] = 1.0  # on the coverslip
    vol[2, 280, 100:300] = 1.0  # 1 um up (thin planes around it: no axial smearing)
    s.set_specimen_override(vol, [0.0, 0.9, 1.0, 1.1])
    off = (400 - 320) // 2
    for mode, lo, hi in (("EPI", 0.05, 0.5), ("TIRF", 0.0, 1e-3)):
        img = s.noise_free(mode)
        bg = np.median(img)
        low = img[120 - off - 2 : 120 - off + 3, 100:200].max(0).mean() - bg
        up = img[280 - off - 2 : 280 - off + 3, 100:200].max(0).mean() - bg
        assert lo <= up / low <= hi, mode


def test_tirf_signal_of_a_thin_layer_decays_with_the_penetration_depth() -> None:
    s = _no_scatter(_scope())
    m_epi, m_tirf = _medium_level(s, "EPI"), _medium_level(s, "TIRF")
    heights = np.array([0.1, 0.15, 0.2, 0.25, 0.3, 0.4])
    tirf, epi = [], []
    for z in heights:
        _layer(s, z)
        tirf.append(_centre_mean(s.noise_free("TIRF")) - m_tirf)
        epi.append(_centre_mean(s.noise_free("EPI")) - m_epi)
    slope = np.polyfit(heights, np.log(tirf), 1)[0]
    assert -1.0 / slope == pytest.approx(s.penetration_depth_um, rel=0.05)
    assert 0.05 <= s.penetration_depth_um <= 0.2
    # EPI excites every height alike; the objective collects less light from higher up
    # (no supercritical-angle emission reaches it from there): a gentle, steady loss
    np.testing.assert_allclose(epi, epi[0], rtol=0.15)
    assert np.all(np.diff(epi) < 0)


def test_tirf_weights_average_the_evanescent_field_over_each_plane() -> None:
    s = _scope()
    z = SAMPLE_PLANES_UM
    d = s.penetration_depth_um
    w = _tirf_plane_weights(tuple(z.tolist()), d, 0.0, 5.0)
    # a convex exp averaged over a hat is above its value at the centre
    assert np.all(w[1:10] > np.exp(-z[1:10] / d))
    scattered = _tirf_plane_weights(tuple(z.tolist()), d, 0.1, 5.0)
    assert scattered[-1] > 0.1 * np.exp(-z[-1] / 5.0) * 0.9
    assert scattered[z == 1.0][0] == pytest.approx(0.1 * np.exp(-0.2), rel=0.05)


def test_tirf_angle_sets_the_depth_and_subcritical_angles_excite_everything() -> None:
    s = _scope()
    d_default = s.penetration_depth_um
    s.tirf_angle_deg += 3.0
    assert s.penetration_depth_um < d_default
    s.tirf_angle_deg = 45.0
    assert s.penetration_depth_um == np.inf
    _layer(s, 1.0)
    np.testing.assert_allclose(s.noise_free("TIRF") > 0, True)


def test_a_tirf_angle_beyond_the_objectives_na_is_refused() -> None:
    s = _scope()
    o = s.optics
    limit = np.degrees(np.arcsin(o.na / o.immersion_index))
    with pytest.raises(ValueError, match="reaches at most"):
        s.tirf_angle_deg = limit + 0.5
    s.objective = "100X"  # NA 1.45: a smaller limit, its own angle
    assert s.penetration_depth_um == pytest.approx(0.15, rel=0.02)
    with pytest.raises(ValueError, match=r"NA 1\.45"):
        s.tirf_angle_deg = limit - 0.1
    optics = DEFAULT_RIGS["60X"].optics.model_copy(update={"na": 1.4})
    rig = replace(DEFAULT_RIGS["60X"], optics=optics, tirf_depth_um=0.08)
    with pytest.raises(ValueError, match="needs n1 sin"):
        SimulatedMicroscope(rigs={"60X": rig})


def test_switching_illumination_drifts_the_stage_deterministically() -> None:
    a, b = _scope(seed=3), _scope(seed=3)
    assert a.drift_px == (0.0, 0.0)
    drifts = []
    for mode in ("TIRF", "EPI", "TIRF", "EPI"):
        a.set_illumination(mode)
        b.set_illumination(mode)
        assert a.drift_px == b.drift_px
        drifts.append(a.drift_px)
    assert len(set(drifts)) == len(drifts)
    assert all(0 < np.hypot(*d) and max(map(abs, d)) < 2.0 for d in drifts)
    before = a.drift_px
    a.set_illumination("EPI")  # not a switch: no new drift
    assert a.drift_px == before


def test_the_frame_is_shifted_by_the_recorded_drift() -> None:
    s = _scope(seed=3)
    s.set_illumination("TIRF")
    s.set_illumination("EPI")
    s.set_illumination("TIRF")
    shift, _, _ = phase_cross_correlation(
        s.noise_free("TIRF"), s.ground_truth_tirf(), upsample_factor=20, normalization=None
    )
    np.testing.assert_allclose(shift, s.drift_px, atol=0.15)
    assert np.hypot(*s.drift_px) > 0.2


def test_exposure_scales_signal_linearly() -> None:
    s = _scope()
    a = s.noise_free()
    s.exposure_ms *= 2
    np.testing.assert_allclose(s.noise_free(), 2 * a, rtol=1e-5, atol=1e-3)
    bright = s.snap().astype(float) - OFFSET_ADU
    s.exposure_ms /= 2
    dim = s.snap().astype(float) - OFFSET_ADU
    assert bright.mean() == pytest.approx(2 * dim.mean(), rel=0.03)
    assert a.max() * 2 > 1000  # a cell at 100 ms: thousands of ADU


def test_long_exposures_saturate_at_16_bits() -> None:
    s = _scope()
    s.exposure_ms = 20000.0
    frame = s.snap()
    assert frame.max() == MAX_ADU and np.mean(frame == MAX_ADU) > 0.05


def test_closed_shutter_gives_the_cameras_offset_map_and_read_noise() -> None:
    s = _scope()
    s.shutter_open = False
    frames = np.stack([s.snap().astype(float) for _ in range(8)])
    cam = s.camera
    x, y, w, h = s.roi
    offset, _, read = (m[y : y + h, x : x + w] for m in cam.maps())
    assert frames.mean() == pytest.approx(OFFSET_ADU, abs=0.2)
    # fixed pattern: the per-pixel mean follows the offset map, not a flat level
    assert np.corrcoef(frames.mean(0).ravel(), offset.ravel())[0, 1] > 0.6
    expected = np.sqrt(np.mean(read**2)) / cam.electrons_per_adu
    assert (frames - frames.mean(0)).std() * np.sqrt(8 / 7) == pytest.approx(expected, rel=0.1)
    s.objective = "100X"  # the second rig's camera: other offset, gain and noise
    assert s.snap().mean() == pytest.approx(s.camera.offset_adu, abs=1.0)
    assert s.camera.offset_adu != OFFSET_ADU


def test_roi_and_binning_set_the_frame_shape_and_binning_sums_pixels() -> None:
    s = _scope()
    s.roi = (900, 950, 192, 128)
    assert s.snap().shape == (128, 192)
    full = s.noise_free()
    for b in (2, 4):
        s.binning = b
        assert s.snap().shape == (128 // b, 192 // b) == s.frame_shape
        assert s.pixel_size_um() == pytest.approx(0.0975 * b)
        binned = full.reshape(128 // b, b, 192 // b, b).sum(axis=(1, 3))
        np.testing.assert_allclose(s.noise_free(), binned, rtol=1e-5, atol=1e-2)
    with pytest.raises(ValueError):
        s.binning = 3
    with pytest.raises(ValueError):
        s.roi = (2000, 0, 100, 100)


def test_60x_and_100x_render_the_same_physical_field() -> None:
    s = _scope(side=231)
    s.objective = "100X"
    hi = s.specimen().sum(0)  # 231 px x 65 nm = 15 um
    hi_img = s.noise_free("EPI")
    s.objective = "60X"
    s.roi = ((SENSOR_SHAPE[1] - 154) // 2, (SENSOR_SHAPE[0] - 154) // 2, 154, 154)
    lo = s.specimen().sum(0)  # 154 px x 97.5 nm = 15 um
    lo_img = s.noise_free("EPI")
    zoomed = ndimage.zoom(ndimage.gaussian_filter(hi, 2.0), 154 / 231, order=1)
    assert np.corrcoef(zoomed.ravel(), ndimage.gaussian_filter(lo, 1.3).ravel())[0, 1] > 0.9
    assert lo.sum() == pytest.approx(hi.sum(), rel=0.03)
    # other optics and camera, the same cells
    img = ndimage.zoom(hi_img, 154 / 231, order=1)
    assert np.corrcoef(img.ravel(), lo_img.ravel())[0, 1] > 0.7


def test_focus_moves_reuse_the_field_and_blur_the_bottom_layer() -> None:
    s = _scope()
    rng = np.random.default_rng(0)
    s.set_specimen_override(rng.random((1, 300, 300)).astype(np.float32) ** 8, [0.0])
    s.z_um = 0.0
    sharp = s.noise_free("EPI")
    s.z_um = 1.5
    blurred = s.noise_free("EPI")
    assert len(s._fields) == 1
    assert blurred.std() < sharp.std()
    assert s.frames_rendered == 0


def test_in_focus_section_and_specimen_follow_the_focal_plane() -> None:
    s = _scope()
    vol = np.zeros((2, 300, 300), np.float32)
    vol[0, 100:140, 100:140] = 1.0
    vol[1, 160:200, 160:200] = 1.0
    s.set_specimen_override(vol, [0.0, 2.0])
    s.z_um = 0.0
    low = s.in_focus_section()
    shift = focal_shift_factor(s.optics)  # oil into water: the focus moves less than the stage
    assert 0.75 < shift < 0.9
    s.z_um = 2.0 / shift  # the stage height that focuses 2 um into the sample
    high = s.in_focus_section()
    # sensor-centred: override row r lies at ROI row r - (300 - SIDE) // 2
    off = (300 - SIDE) // 2
    assert low[120 - off, 120 - off] > 0 and high[120 - off, 120 - off] < 1e-3 * low.max()
    assert high[180 - off, 180 - off] > 0
    spec = s.specimen()
    assert spec.shape == (2, SIDE, SIDE) and not spec.flags.writeable
    np.testing.assert_array_equal(s.specimen_z_um, [0.0, 2.0])
    s.set_specimen_override(None)
    assert s.specimen().shape[0] > 20  # back to the slide, many planes


def test_real_field_epi_has_haze_from_deep_structure_that_tirf_lacks() -> None:
    s = _scope(side=320)
    epi, tirf = s.noise_free("EPI"), s.noise_free("TIRF")
    spec = s.specimen()
    z = s.specimen_z_um
    deep, bottom = spec[z > 1.0].sum(0), spec[z <= 0.2].sum(0)
    thick = deep > np.percentile(deep[deep > 0], 50)
    thin = (deep == 0) & (ndimage.uniform_filter(bottom, 9) > 0.5 * bottom.mean())
    assert thick.sum() > 500 and thin.sum() > 500

    def ratio(mask: np.ndarray) -> float:
        return float(epi[mask].mean() / tirf[mask].mean())

    assert ratio(thick) > 1.3 * ratio(thin)


def test_shared_microscope_can_be_replaced() -> None:
    first = reset_microscope(seed=4)
    assert get_microscope() is first and first.seed == 4
    second = reset_microscope(seed=5, drift_px=0.5)
    assert get_microscope() is second and second is not first
    with pytest.raises(ValueError):
        second.objective = "40X"
    with pytest.raises(ValueError):
        second.set_illumination("HILO")


def test_uniform_planes_keep_axial_detail_where_the_default_planes_thin_out() -> None:
    planes = uniform_planes_um(0.1)
    assert np.all(np.diff(planes) <= 0.1 + 1e-9) and planes[0] == 0.0
    np.testing.assert_array_equal(planes[planes <= 0.5], SAMPLE_PLANES_UM[SAMPLE_PLANES_UM <= 0.5])
    cell = cell_at(0, 0, 0)
    assert cell is not None
    fine, coarse = (SimulatedMicroscope(seed=0, drift_px=0.0, planes_um=p) for p in (planes, None))
    for s in (fine, coarse):
        s.centre_roi(64)
        s.xy_um = (cell.cx, cell.cy)
    np.testing.assert_array_equal(fine.specimen_z_um, planes)
    assert fine.specimen().shape[0] == planes.size
    # focused on the coverslip both renderings agree (the low planes are the same)
    epi = [s.noise_free("EPI") for s in (fine, coarse)]
    assert np.abs(epi[0] - epi[1]).mean() < 0.05 * epi[1].mean()

    def sections(s: SimulatedMicroscope) -> np.ndarray:
        """In-focus sections every 0.1 um of focus, 2.5-5 um up (the cell's nucleus)."""
        out = []
        for z in np.arange(2.5, 5.0, 0.1):
            s.z_um = float(z)
            out.append(s.in_focus_section())
        return np.array(out)

    a, b = sections(fine), sections(coarse)
    assert a.sum() == pytest.approx(b.sum(), rel=0.15)  # the same specimen
    # where the default planes are 0.2-0.4 um apart, sections slide smoothly between them;
    # the fine planes keep the specimen's own axial detail (curvature along Z)
    curvature = [float((np.diff(x, 2, axis=0) ** 2).sum() / (x**2).sum()) for x in (a, b)]
    assert curvature[0] > 10 * curvature[1]


def test_bad_specimen_planes_are_refused() -> None:
    with pytest.raises(ValueError, match="increasing"):
        SimulatedMicroscope(planes_um=[0.0, 0.2, 0.1])
    with pytest.raises(ValueError, match="plane step"):
        uniform_planes_um(0.0)
