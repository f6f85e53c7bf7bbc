from pathlib import Path

import pytest

from ctirf_live.config import ConfigError, Optics, load_optics_file, make_optics


def test_defaults_are_the_paper_60x_objective() -> None:
    o = Optics()
    assert o.na == 1.5 and o.pixel_size_um == pytest.approx(0.0975)
    assert o.supports_tirf
    assert hash(o) == hash(Optics())  # frozen: usable as a cache key


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"na": 1.6}, "smaller than the immersion index"),
        ({"na": -1}, "na"),
        ({"pixel_size_um": 0}, "pixel_size_um"),
        ({"emission_wavelength_nm": 50}, "emission_wavelength_nm"),
    ],
)
def test_impossible_optics_give_one_clear_line(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_optics(**kwargs)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg


def test_demo_optics_file_loads_both_objectives() -> None:
    cfg = Path(__file__).parents[1] / "acquisition_configs" / "ctirf_demo.optics.yaml"
    objectives = load_optics_file(cfg)
    assert set(objectives) == {"60X", "100X"}
    assert objectives["100X"].pixel_size_um == pytest.approx(0.065)
    assert objectives["100X"].na == pytest.approx(1.45)
    assert objectives["100X"].emission_wavelength_nm == pytest.approx(600)
    assert objectives["60X"].immersion_index == pytest.approx(1.518)


def test_optics_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.optics.yaml"
    bad.write_text("objectives:\n  60X: {na: 1.7}\n")
    with pytest.raises(ConfigError, match="60X"):
        load_optics_file(bad)
    bad.write_text("just: [a, list")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_optics_file(bad)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="objectives"):
        load_optics_file(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_optics_file(tmp_path / "missing.yaml")
