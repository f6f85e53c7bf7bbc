from pathlib import Path

import numpy as np
import pytest

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
