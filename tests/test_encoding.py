"""cTIRF value encoding: float32 / float16 / uint16 with a recorded scale, clipping counted,
undone by every reader; through `process` and `acquire` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import useq

from ctirf_live.config import Optics
from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff
from ctirf_live.inference.encoding import (
    Encoding,
    decode,
    default_scale,
    encoding_of,
    make_encoding,
    scale_for,
)
from ctirf_live.inference.process import process_file
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.writers import read_result
from ctirf_live.models.etnet import ET2dNet


def _values(seed: int = 0, shape=(64, 64), top: float = 3000.0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape, dtype=np.float32) * top).astype(np.float32)


def test_default_scale_follows_the_camera_bit_depth() -> None:
    assert default_scale(16) == 1.0 and default_scale(14) == 1.0  # the camera's own counts
    assert default_scale(12) == 0.25 and default_scale(8) == 1 / 64  # two bits of headroom
    assert default_scale(18) == 4.0
    assert scale_for(np.uint8) == 1 / 64 and scale_for(np.uint16) == 1.0
    assert scale_for(np.uint16, bits=12) == 0.25
    assert scale_for(np.float32, peak=200_000.0) == 4.0  # float input: fits its peak
    with pytest.raises(ValueError, match="positive"):
        default_scale(0)


@pytest.mark.parametrize("scale", [1.0, 0.25, 4.0])
def test_uint16_round_trip_is_within_half_a_step(scale: float) -> None:
    enc = Encoding("uint16", scale=scale)
    values = _values(1, top=60000 * scale)
    stored = enc.encode(values)
    assert stored.dtype == np.dtype("<u2")
    back = enc.decode(stored)
    assert back.dtype == np.float32
    assert np.abs(back - values).max() <= scale / 2 + 1e-3 * scale
    assert enc.clipped_pixels == 0 and enc.describe()["clipped_pixels"] == 0


def test_uint16_clipping_is_counted_per_pixel_and_plane() -> None:
    enc = Encoding("uint16", scale=1.0)
    values = _values(2, top=1000)
    values[0, :5] = 70000.0  # 5 over the top
    values[1, 0] = -3.0  # 1 under zero
    values[2, 0] = 65535.4  # rounds to 65535: not clipped
    stored = enc.encode(values)
    enc.encode(_values(3, top=1000))  # a clean plane
    assert stored[0, 0] == 65535 and stored[1, 0] == 0 and stored[2, 0] == 65535
    record = enc.describe()
    assert record["clipped_pixels"] == 6 and record["planes_clipped"] == 1
    assert record["values_seen"] == [-3.0, 70000.0]
    assert record["clipped_fraction"] == pytest.approx(6 / (2 * 64 * 64))
    warning = enc.clip_warning()
    assert warning and "6 cTIRF pixels" in warning and "--ctirf-scale 2" in warning


def test_float16_range_and_precision() -> None:
    enc = Encoding("float16")
    values = _values(4, top=30000)
    values[0, 0] = 1e6  # beyond float16: clipped to its largest value, never inf
    stored = enc.encode(values)
    assert stored.dtype == np.dtype("<f2") and np.isfinite(stored).all()
    assert float(stored[0, 0]) == 65504.0 and enc.clipped_pixels == 1
    back, ok = enc.decode(stored), values < 65504
    assert np.all(np.abs(back - values)[ok] <= np.abs(values[ok]) * 2.0**-11 + 1e-7)


def test_nan_is_stored_as_zero_and_counted() -> None:
    enc = Encoding("uint16")
    values = _values(5)
    values[3, 3] = np.nan
    stored = enc.encode(values)
    assert stored[3, 3] == 0 and enc.clipped_pixels == 1


def test_bad_encodings_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="use one of float32, float16, uint16"):
        make_encoding("int8")
    with pytest.raises(ValueError, match="uint16 only"):
        make_encoding("float16", 2.0)
    with pytest.raises(ValueError, match="positive"):
        Encoding("uint16", scale=0.0)
    assert make_encoding("UINT16", bits=12).scale == 0.25
    assert make_encoding("float32").describe()["dtype"] == "float32"


def test_decode_without_a_record_and_lazily() -> None:
    import dask.array as da

    stored = np.arange(6, dtype=np.uint16).reshape(2, 3)
    assert decode(stored, None) is stored
    record = {"dtype": "uint16", "scale": 0.5, "offset": 10.0}
    lazy = decode(da.from_array(stored), record)
    assert isinstance(lazy, da.Array) and lazy.dtype == np.float32
    np.testing.assert_array_equal(lazy.compute(), stored * 0.5 + 10)
    assert encoding_of({"encoding": record}) == record and encoding_of({}) is None


# -- through the offline and live paths -------------------------------------------------


@pytest.fixture(scope="module")
def tiny2d() -> Restorer:
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)


@pytest.fixture
def epi(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).poisson(800, (2, 64, 64)).astype(np.uint16)
    return write_ome_tiff(tmp_path / "epi.ome.tiff", data, "TYX", pixel_size_um=0.0975)


def test_process_uint16_round_trip_on_a_tiny_model(epi: Path, tmp_path: Path, tiny2d) -> None:
    ref, _ = process_file(epi, tmp_path / "f32.ome.tiff", tiny2d, consistency=False)
    out, warnings = process_file(epi, tmp_path / "u16.ome.tiff", tiny2d, consistency=False,
                                 ctirf_dtype="uint16")
    assert not any("clipped" in w for w in warnings)
    with tifffile.TiffFile(out) as tif:
        assert tif.series[0].dtype == np.uint16 and tif.is_ome  # Fiji opens it as 16-bit
    stored, info = read_ome_tiff(out)
    record = info.metadata["encoding"]
    assert record["dtype"] == "uint16" and record["scale"] == 1.0 and record["offset"] == 0
    assert record["clipped_pixels"] == 0
    expected, _ = read_ome_tiff(ref)
    values = decode(stored, record)
    assert np.abs(values - expected).max() <= 0.5 + 1e-3
    assert read_ome_tiff(ref)[1].metadata["encoding"]["dtype"] == "float32"


class Doubling:
    """A model surface returning twice its input: a cTIRF above a 16-bit camera's range."""

    dims, optics = 2, Optics()

    def restore(self, image: np.ndarray) -> np.ndarray:
        return image.astype(np.float32) * 2

    def describe(self) -> dict:
        return {"model": "doubling"}


def test_process_reports_and_records_clipping(tmp_path: Path) -> None:
    data = np.full((2, 32, 32), 1000, np.uint16)
    data[1, :3, :4] = 40000  # 12 pixels of plane 1 end above 65535 after doubling
    src = write_ome_tiff(tmp_path / "bright.ome.tiff", data, "TYX")
    out, warnings = process_file(src, tmp_path / "out.ome.tiff", Doubling(),  # type: ignore[arg-type]
                                 ctirf_dtype="uint16")
    assert any("12 cTIRF pixels" in w and "clipped" in w for w in warnings)
    stored, info = read_ome_tiff(out)
    record = info.metadata["encoding"]
    assert record["clipped_pixels"] == 12 and record["planes_clipped"] == 1
    assert record["values_seen"] == [2000.0, 80000.0]
    assert stored[1, 0, 0] == 65535 and stored[0, 0, 0] == 2000
    assert any("clipped" in w for w in info.metadata["ctirf_processing"]["warnings"])


def test_process_refuses_float16_tiff_before_any_work(epi: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float16 is not an OME pixel type"):
        process_file(epi, tmp_path / "o.ome.tiff", Doubling(),  # type: ignore[arg-type]
                     ctirf_dtype="float16")
    assert not (tmp_path / "o.ome.tiff").exists()


@pytest.mark.parametrize(("fmt", "dtype"), [("ome-tiff", "uint16"), ("ome-zarr", "float16")])
def test_acquire_stores_the_chosen_dtype_and_readers_undo_it(
    demo_core, tiny2d, tmp_path: Path, fmt: str, dtype: str
) -> None:
    from ctirf_live.inference.acquire import acquire
    from ctirf_live.napari.reader import read_path

    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 3},
                           channels=[{"config": "EPI", "exposure": 20}])
    result = acquire(demo_core, seq, tiny2d, tmp_path / "run", fmt=fmt, ctirf_dtype=dtype,
                     consistency=False)
    assert result.ctirf_planes_saved == 3
    stored, meta = read_result(result.ctirf_path, decoded=False)
    values, _ = read_result(result.ctirf_path)
    assert stored.dtype == np.dtype(dtype) and values.dtype == np.float32
    record = meta["encoding"]
    assert record["dtype"] == dtype and record["clipped_pixels"] == 0
    assert record["scale"] == 1.0  # uint16: the 16-bit demo camera's own counts
    summary = json.loads(result.summary_path.read_text())
    assert summary["ctirf_encoding"]["dtype"] == dtype
    if fmt == "ome-tiff":  # the raw frames restored again: what the store holds, to a step
        raw = tifffile.imread(result.raw_path).reshape(3, 128, 128)
        again = np.stack([tiny2d.restore(frame) for frame in raw])
        assert np.abs(values.reshape(again.shape) - again).max() <= 0.5 + 1e-2
    else:
        doc = json.loads((result.ctirf_path / "0" / "zarr.json").read_text())
        assert doc["data_type"] == "float16"
    layer = read_path(result.ctirf_path)[0]  # napari shows input counts, not stored steps
    shown = np.asarray(layer[0])
    assert shown.dtype == np.float32
    np.testing.assert_allclose(shown.reshape(values.shape), values, rtol=0, atol=1e-6)


def test_process_command_ctirf_dtype_options(epi: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctirf_live.cli import app
    from ctirf_live.models.etnet import save_model

    torch.manual_seed(0)
    model = save_model(ET2dNet(Optics(), "tiny"), tmp_path / "tiny.safetensors")
    out = tmp_path / "u16.ome.tiff"
    args = ["process", str(epi), "-m", str(model), "-o", str(out), "--scheduler", "none"]
    done = CliRunner().invoke(app, [*args, "--ctirf-dtype", "uint16", "--ctirf-scale", "0.5"])
    assert done.exit_code == 0, done.output
    assert read_ome_tiff(out)[1].metadata["encoding"]["scale"] == 0.5
    for bad, says in ((["--ctirf-dtype", "int8"], "use one of float32, float16, uint16"),
                      (["--ctirf-dtype", "float16"], "not an OME pixel type"),
                      (["--ctirf-dtype", "uint16", "--ctirf-scale", "-1"], "positive")):
        wrong = CliRunner().invoke(app, [*args, "--overwrite", *bad])
        assert wrong.exit_code == 2 and says in wrong.output, wrong.output
    chunked = CliRunner().invoke(app, ["process", str(epi), "-m", str(model), "-o",
                                       str(tmp_path / "c.ome.zarr"), "--ctirf-dtype", "float16"])
    assert chunked.exit_code == 2 and "chunk-wise" in chunked.output, chunked.output
