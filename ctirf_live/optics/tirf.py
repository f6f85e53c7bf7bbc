"""Total internal reflection geometry: critical angle and evanescent penetration depth.

Angles are incidence angles in the high-index medium (glass, `n1`) measured from the
optical axis, in degrees; the sample (`n2`) is the low-index medium. The intensity
penetration depth is d = lambda / (4 pi sqrt(n1^2 sin^2(theta) - n2^2)).
"""

from __future__ import annotations

import math


def _check_indices(n1: float, n2: float) -> None:
    if not (n1 > 0 and n2 > 0):
        raise ValueError(f"refractive indices must be positive, got n1={n1}, n2={n2}")
    if n1 <= n2:
        raise ValueError(
            f"total internal reflection needs n1 > n2 (glass above sample), got n1={n1}, n2={n2}"
        )


def critical_angle_deg(n1: float, n2: float) -> float:
    """Incidence angle in the glass (`n1`) above which light is totally reflected at `n2`."""
    _check_indices(n1, n2)
    return math.degrees(math.asin(n2 / n1))


def penetration_depth_um(angle_deg: float, excitation_nm: float, n1: float, n2: float) -> float:
    """1/e depth of the evanescent intensity, in micrometres, at incidence `angle_deg`."""
    _check_indices(n1, n2)
    if excitation_nm <= 0:
        raise ValueError(f"excitation wavelength must be positive, got {excitation_nm} nm")
    if not 0 <= angle_deg < 90:
        raise ValueError(f"incidence angle must be in [0, 90) degrees, got {angle_deg}")
    theta_c = critical_angle_deg(n1, n2)
    arg = (n1 * math.sin(math.radians(angle_deg))) ** 2 - n2**2
    if angle_deg <= theta_c or arg <= 0:
        raise ValueError(
            f"incidence angle {angle_deg:.2f} deg is not above the critical angle "
            f"{theta_c:.2f} deg (n1={n1}, n2={n2}): no total internal reflection"
        )
    return excitation_nm / 1000.0 / (4 * math.pi * math.sqrt(arg))


def angle_for_depth_deg(depth_um: float, excitation_nm: float, n1: float, n2: float) -> float:
    """Incidence angle (degrees) that gives the requested penetration depth."""
    _check_indices(n1, n2)
    if depth_um <= 0 or excitation_nm <= 0:
        raise ValueError(
            f"depth and wavelength must be positive, got {depth_um} um, {excitation_nm} nm"
        )
    sin_theta = math.sqrt((excitation_nm / 1000.0 / (4 * math.pi * depth_um)) ** 2 + n2**2) / n1
    if sin_theta >= 1:
        shallowest = penetration_depth_um(89.999, excitation_nm, n1, n2)
        raise ValueError(
            f"a penetration depth of {depth_um * 1000:.0f} nm is not reachable with n1={n1}: "
            f"the shallowest is about {shallowest * 1000:.0f} nm at grazing incidence"
        )
    return math.degrees(math.asin(sin_theta))


def max_tirf_angle_deg(na: float, n1: float) -> float:
    """Steepest incidence angle an objective of numerical aperture `na` can deliver."""
    if not 0 < na < n1:
        raise ValueError(f"NA must be between 0 and the immersion index {n1}, got {na}")
    return math.degrees(math.asin(na / n1))


def check_angle_within_na(angle_deg: float, na: float, n1: float) -> None:
    """Refuse a TIRF angle the objective cannot deliver: n1 sin(theta) must be <= NA."""
    if not 0 <= angle_deg < 90:
        raise ValueError(f"incidence angle must be in [0, 90) degrees, got {angle_deg}")
    reach = n1 * math.sin(math.radians(angle_deg))
    if reach > na + 1e-9:
        raise ValueError(
            f"a TIRF angle of {angle_deg:.2f} deg needs n1 sin(theta) = {reach:.3f} > NA {na}: "
            f"this objective reaches at most {max_tirf_angle_deg(na, n1):.2f} deg; "
            "choose a smaller angle (a deeper penetration depth) or an objective of higher NA"
        )
