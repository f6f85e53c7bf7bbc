"""The line-ladder ablation lays filaments with the intended mass and place."""

import numpy as np

from benchmarks.ablate_line_ladder import splat_line


def test_splat_line_conserves_mass_along_its_length() -> None:
    plane = np.zeros((64, 64), np.float32)
    splat_line(plane, (10.3, 20.7), (50.1, 40.2), density=2.0)
    length = np.hypot(50.1 - 10.3, 40.2 - 20.7)
    n = int(2 * length) + 1  # samples every half pixel, both ends included
    assert np.isclose(plane.sum(), 2.0 * length * n / (n - 1), rtol=1e-4)
    assert abs(plane.sum() - 2.0 * length) < 2.0 * 0.51


def test_splat_line_lies_on_the_segment() -> None:
    plane = np.zeros((32, 32), np.float32)
    splat_line(plane, (4.0, 16.0), (28.0, 16.0), density=1.0)
    rows = np.nonzero(plane.sum(axis=1))[0]
    cols = np.nonzero(plane.sum(axis=0))[0]
    assert set(rows) == {16}
    assert cols.min() == 4 and cols.max() == 28


def test_splat_line_clips_outside_the_plane() -> None:
    plane = np.zeros((16, 16), np.float32)
    splat_line(plane, (-20.0, 8.0), (8.0, 8.0), density=1.0)
    assert np.isclose(plane.sum(), 9.0, atol=0.6)
