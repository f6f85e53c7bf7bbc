"""EPI z-stacks for ET3dNet: simulated stacks with a sectioned truth, and stacks from files."""

from pathlib import Path

import numpy as np
import pytest

from ctirf_live.data.stacks import StackError, stacks_from_files, synthetic_stacks
from ctirf_live.data.tiff import write_ome_tiff


def test_simulated_stacks_start_inside_cells_with_a_sectioned_truth() -> None:
    reported: list[tuple[int, int]] = []
    data = synthetic_stacks(2, size=64, seed=3, planes=3, progress=lambda *a: reported.append(a))
    assert reported == [(1, 2), (2, 2)]  # one progress step per stack
    assert len(data) == 2 and data.planes == 3 and data.z_step_um == pytest.approx(0.2)
    for s in data.stacks:
        assert s.epi.shape == s.truth.shape == (3, 64, 64)
        assert 0.0 <= s.start_um <= 2.0
        assert np.isclose(s.start_um / 0.2, round(s.start_um / 0.2))  # on the z grid
        # the truth is sharp in-focus content: far more contrast than the hazy EPI planes
        epi_contrast = s.epi.std(axis=(1, 2)) / s.epi.mean(axis=(1, 2))
        truth_contrast = s.truth.std(axis=(1, 2)) / (s.truth.mean(axis=(1, 2)) + 1e-6)
        assert np.all(truth_contrast > 1.5 * epi_contrast)
    assert data.stacks[0].field != data.stacks[1].field
    with pytest.raises(StackError, match="at least 1 stack"):
        synthetic_stacks(0)


def test_stacks_are_read_from_acquired_files_in_windows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tz = rng.random((2, 13, 32, 32)).astype(np.float32)  # 2 time points, 13 planes
    path = write_ome_tiff(tmp_path / "run.ome.tif", tz, "TZYX", pixel_size_um=0.0975, z_step_um=0.2)
    data = stacks_from_files([path], planes=6)
    assert len(data) == 4  # 2 windows of 6 planes per time point; the 13th plane is left
    np.testing.assert_array_equal(data.stacks[1].epi, tz[0, 6:12])
    assert data.optics.pixel_size_um == pytest.approx(0.0975)
    assert data.z_step_um == pytest.approx(0.2)
    flat = write_ome_tiff(tmp_path / "frame.ome.tif", tz[0, 0], "YX")
    with pytest.raises(StackError, match="no Z axis"):
        stacks_from_files([flat])
    short = write_ome_tiff(tmp_path / "short.ome.tif", tz[0, :3], "ZYX", z_step_um=0.2)
    with pytest.raises(StackError, match="needs 6"):
        stacks_from_files([short])
