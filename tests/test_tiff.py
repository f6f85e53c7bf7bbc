from pathlib import Path

import numpy as np
import pytest
import tifffile

from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff


def test_round_trip_keeps_pixels_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65535, size=(2, 32, 48), dtype=np.uint16)
    path = write_ome_tiff(
        tmp_path / "x.ome.tif",
        data,
        "CYX",
        pixel_size_um=0.0975,
        channel_names=["EPI", "TIRF"],
        metadata={"mode": "pair", "shift_px": [0.5, -1.25]},
    )
    out, info = read_ome_tiff(path)
    np.testing.assert_array_equal(out, data)
    assert info.pixel_size_um == pytest.approx(0.0975)
    assert info.channel_names == ["EPI", "TIRF"]
    assert info.metadata == {"mode": "pair", "shift_px": [0.5, -1.25]}
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_ome_tiff(tmp_path / "x.ome.tif", np.ones((8, 8), np.uint16), "YX")
    import tifffile

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        write_ome_tiff(path, np.zeros((8, 8), np.uint16), "YX")
    monkeypatch.undo()
    out, _ = read_ome_tiff(path)
    assert out.sum() == 64
    assert not list(tmp_path.glob(".*tmp"))


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="not a readable TIFF"):
        read_ome_tiff(bad)
    with pytest.raises(FileNotFoundError):
        read_ome_tiff(tmp_path / "nope.tif")


def test_ome_metadata_a_microscopist_expects_validates(tmp_path: Path) -> None:
    from datetime import datetime

    import ome_types

    from ctirf_live.config import Optics

    optics = Optics(objective="60X", na=1.5, pixel_size_um=0.0975)
    when = datetime(2026, 12, 1, 15, 0, 0)
    path = write_ome_tiff(
        tmp_path / "pair.ome.tif", np.zeros((2, 32, 32), np.uint16), "CYX",
        pixel_size_um=0.0975, channel_names=["EPI", "TIRF"], modes=["EPI", "TIRF"],
        optics=optics, exposure_ms=50.0, acquired=when, metadata={"k": 1},
    )  # fmt: skip
    ome_types.validate_xml(tifffile.tiffcomment(path))  # against the OME 2016-06 schema
    ome = ome_types.from_tiff(path)
    image = ome.images[0]
    objective = ome.instruments[0].objectives[0]
    assert objective.lens_na == 1.5 and objective.nominal_magnification == 60
    assert objective.immersion.value == "Oil"
    assert image.instrument_ref.id == ome.instruments[0].id
    modes = [c.acquisition_mode.value for c in image.pixels.channels]
    assert modes == ["WideField", "TotalInternalReflection"]
    assert image.pixels.channels[0].emission_wavelength == 670
    assert image.pixels.channels[0].excitation_wavelength == 638
    assert [p.exposure_time for p in image.pixels.planes] == [50.0, 50.0]
    assert image.acquisition_date == when
    with tifffile.TiffFile(path) as tif:  # plain TIFF readers see the scale too
        page = tif.pages[0]
        assert round(
            page.tags["XResolution"].value[0] / page.tags["XResolution"].value[1], 2
        ) == round(1 / 0.0975, 2)
    _, info = read_ome_tiff(path)
    assert info.channel_names == ["EPI", "TIRF"] and info.metadata == {"k": 1}
