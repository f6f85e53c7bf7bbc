"""TIRF geometry: critical angle, penetration depth and its inverse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctirf_live.optics.tirf import angle_for_depth_deg, critical_angle_deg, penetration_depth_um

N_GLASS, N_CELL, EXCITATION_NM = 1.518, 1.33, 638.0


def test_critical_angle_glass_water() -> None:
    assert critical_angle_deg(N_GLASS, N_CELL) == pytest.approx(61.19, abs=0.01)
    assert critical_angle_deg(1.5, 1.0) == pytest.approx(math.degrees(math.asin(1 / 1.5)))
    with pytest.raises(ValueError, match="n1 > n2"):
        critical_angle_deg(1.33, 1.518)


def test_penetration_depth_known_value() -> None:
    # d = lambda / (4 pi sqrt(n1^2 sin^2 - n2^2)) at 70 deg: 0.638 / (4 pi * 0.5158) um
    assert penetration_depth_um(70.0, EXCITATION_NM, N_GLASS, N_CELL) == pytest.approx(
        0.0984, abs=5e-4
    )


def test_penetration_depth_range_and_monotonic_above_critical() -> None:
    theta_c = critical_angle_deg(N_GLASS, N_CELL)
    angles = theta_c + np.array([2.5, 4.0, 6.0, 8.0, 10.0])
    depths = np.array([penetration_depth_um(a, EXCITATION_NM, N_GLASS, N_CELL) for a in angles])
    assert np.all((depths > 0.05) & (depths < 0.2))
    assert np.all(np.diff(depths) < 0)
    assert penetration_depth_um(theta_c + 0.05, EXCITATION_NM, N_GLASS, N_CELL) > 0.5


@pytest.mark.parametrize("angle", [30.0, 61.0, 61.18])
def test_penetration_depth_below_critical_is_an_error(angle: float) -> None:
    with pytest.raises(ValueError, match="critical angle"):
        penetration_depth_um(angle, EXCITATION_NM, N_GLASS, N_CELL)


@pytest.mark.parametrize("depth_um", [0.08, 0.1, 0.15, 0.3])
def test_angle_for_depth_inverts_penetration_depth(depth_um: float) -> None:
    angle = angle_for_depth_deg(depth_um, EXCITATION_NM, N_GLASS, N_CELL)
    assert critical_angle_deg(N_GLASS, N_CELL) < angle < 90
    assert penetration_depth_um(angle, EXCITATION_NM, N_GLASS, N_CELL) == pytest.approx(depth_um)


def test_unreachable_depth_is_an_error() -> None:
    with pytest.raises(ValueError, match="not reachable"):
        angle_for_depth_deg(0.03, EXCITATION_NM, N_GLASS, N_CELL)
    with pytest.raises(ValueError, match="positive"):
        angle_for_depth_deg(0.0, EXCITATION_NM, N_GLASS, N_CELL)
