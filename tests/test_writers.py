"""cTIRF result stores: layout from the useq sequence, OME-TIFF and OME-Zarr, crash safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import useq

from ctirf_live.data.tiff import read_ome_tiff
from ctirf_live.inference.writers import (
    OmeTiffResultWriter,
    OmeZarrResultWriter,
    ResultLayout,
    ResultWriter,
    make_result_writer,
    raw_output_path,
    read_result,
    result_output_path,
)

CHANNELS = [{"config": "EPI", "group": "Illumination"}, {"config": "TIRF", "group": "Illumination"}]
META = {"model": "tiny.safetensors", "psf": {"model": "born_wolf"}, "optics": {"na": 1.5}}


def _seq(positions: int = 1, **kw) -> useq.MDASequence:
    stage = [{"x": 10.0 * i, "y": 0.0} for i in range(positions)] if positions > 1 else []
    return useq.MDASequence(
        time_plan={"interval": 0.5, "loops": 3},
        z_plan={"range": 1.0, "step": 0.2},
        channels=CHANNELS,
        stage_positions=stage,
        axis_order="tpgcz",
        **kw,
    )


def _frame(seed: int, shape=(32, 48)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32) * 100 + 1


def test_layout_keeps_processed_channels_in_ome_order() -> None:
    layout = ResultLayout.from_sequence(_seq(2), (32, 48), channels=("EPI",), pixel_size_um=0.1)
    assert layout.axes == ("t", "c", "z")
    assert layout.shape == (3, 1, 6, 32, 48)
    assert layout.positions == 2 and layout.channel_names == ("EPI",)
    assert layout.z_step_um == pytest.approx(0.2) and layout.t_interval_s == pytest.approx(0.5)
    pos, planes = layout.locate({"t": 2, "p": 1, "c": 0, "z": 4}, _frame(0))
    assert pos == 1 and planes[0][0] == (2, 0, 4)
    # a whole stack (index without z) fills every plane
    pos, planes = layout.locate({"t": 1, "p": 0, "c": 0}, np.zeros((6, 32, 48), np.float32))
    assert [idx for idx, _ in planes] == [(1, 0, z) for z in range(6)]
    with pytest.raises(KeyError):
        layout.locate({"t": 0, "c": 1, "z": 0}, _frame(0))  # TIRF is not stored
    with pytest.raises(IndexError):
        layout.locate({"t": 3, "c": 0, "z": 0}, _frame(0))
    with pytest.raises(ValueError, match="does not fit"):
        layout.locate({"t": 0, "c": 0, "z": 0}, np.zeros((16, 16), np.float32))


def test_layout_without_channels_or_z() -> None:
    layout = ResultLayout.from_sequence(useq.MDASequence(time_plan={"interval": 0, "loops": 4}),
                                        (32, 32))
    assert layout.axes == ("t",) and layout.shape == (4, 32, 32)
    with pytest.raises(ValueError, match="MDASequence"):
        ResultLayout.from_sequence(iter([]), (32, 32))


def test_output_paths() -> None:
    assert raw_output_path("out", "ome-zarr") == Path("out/raw.ome.zarr")
    assert result_output_path("out") == Path("out/ctirf.ome.tiff")
    assert isinstance(make_result_writer("out", "ome-zarr"), OmeZarrResultWriter)
    assert isinstance(make_result_writer("out"), ResultWriter)
    with pytest.raises(ValueError, match="unknown format"):
        raw_output_path("out", "png")


def test_tiff_writer_round_trip_with_metadata(tmp_path: Path) -> None:
    writer = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    writer.open(_seq(), (32, 48), channels=("EPI",), metadata=META, pixel_size_um=0.0975)
    frame, stack = _frame(1), np.stack([_frame(10 + z) for z in range(6)])
    writer.write({"t": 0, "c": 0, "z": 2}, frame)
    writer.write({"t": 2, "c": 0}, stack)
    writer.close()
    writer.close()  # idempotent
    data, meta = read_result(writer.path)
    assert data.shape == (3, 1, 6, 32, 48) and data.dtype == np.float32
    np.testing.assert_array_equal(data[0, 0, 2], frame)
    np.testing.assert_array_equal(data[2, 0], stack)
    assert data[1].max() == 0  # never written: zeros
    assert meta["model"] == META and meta["layout"]["channels"] == ["EPI"]
    _, info = read_ome_tiff(writer.path)  # what Fiji/napari see
    assert info.pixel_size_um == pytest.approx(0.0975) and info.z_step_um == pytest.approx(0.2)
    assert info.channel_names == ["cTIRF EPI"]
    with tifffile.TiffFile(writer.path) as tif:
        assert tif.is_ome and tif.series[0].axes == "TZYX"  # C of size 1 squeezed


def test_tiff_writer_one_file_per_position(tmp_path: Path) -> None:
    writer = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    writer.open(_seq(2), (32, 48), channels=("EPI", "TIRF"), metadata=META)
    writer.write({"t": 1, "p": 1, "c": 1, "z": 0}, _frame(3))
    writer.close()
    assert writer.path == tmp_path / "ctirf"  # as the raw store's raw/raw_p000.ome.tiff
    files = ["ctirf_p000.ome.tiff", "ctirf_p001.ome.tiff"]
    assert sorted(p.name for p in writer.path.iterdir()) == files
    for where in (writer.path, tmp_path / "ctirf.ome.tiff"):
        data, meta = read_result(where, position=1)
        assert data.shape == (3, 2, 6, 32, 48) and meta["position"] == 1
        np.testing.assert_array_equal(data[1, 1, 0], _frame(3))
    with tifffile.TiffFile(writer.path / files[1]) as tif:
        assert len(tif.series) == 1 and tif.series[0].name == "1"  # the raw image's name
    again = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    with pytest.raises(FileExistsError, match="ctirf exists"):
        again.open(_seq(2), (32, 48))


def test_tiff_writer_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "ctirf.ome.tiff"
    path.write_bytes(b"x")
    with pytest.raises(FileExistsError):
        OmeTiffResultWriter(path).open(_seq(), (32, 48))
    OmeTiffResultWriter(path, overwrite=True).open(_seq(), (32, 48))


def test_tiff_store_survives_a_killed_process(tmp_path: Path) -> None:
    """No close, no flush, hard exit: what was written is in a valid OME-TIFF."""
    path = tmp_path / "ctirf.ome.tiff"
    script = f"""
import os, numpy as np, useq
from ctirf_live.inference.writers import OmeTiffResultWriter
w = OmeTiffResultWriter({str(path)!r})
w.open(useq.MDASequence(time_plan={{"interval": 0, "loops": 3}}), (32, 48))
w.write({{"t": 1}}, np.full((32, 48), 7, np.float32))
os._exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 3, proc.stderr.decode()[-500:]
    data, meta = read_result(path)
    assert data.shape == (3, 32, 48) and meta["kind"] == "ctirf"
    assert data[1].min() == 7 and data[0].max() == 0 and data[2].max() == 0


@pytest.mark.parametrize("positions", [1, 2])
def test_zarr_writer_round_trip(tmp_path: Path, positions: int) -> None:
    writer = OmeZarrResultWriter(tmp_path / "ctirf.ome.zarr")
    writer.open(_seq(positions), (32, 48), channels=("EPI",), metadata=META, pixel_size_um=0.1)
    stack = np.stack([_frame(20 + z) for z in range(6)])
    writer.write({"t": 1, "p": positions - 1, "c": 0}, stack)
    writer.close()
    data, meta = read_result(writer.path, position=positions - 1)
    assert data.shape == (3, 1, 6, 32, 48)
    np.testing.assert_array_equal(data[1, 0], stack)
    assert data[0].max() == 0
    assert meta["model"] == META and meta["layout"]["positions"] == positions
    image_group = writer.path if positions == 1 else writer.path / str(positions - 1)
    ome = json.loads((image_group / "zarr.json").read_text())["attributes"]["ome"]
    window = ome["omero"]["channels"][0]["window"]  # from the data, not 0-65535
    lo, start, end, hi = (window[k] for k in ("min", "start", "end", "max"))
    assert stack.min() <= lo <= start < end <= hi <= stack.max() and hi > 90
    axes = [a["name"] for a in ome["multiscales"][0]["axes"]]
    assert axes == ["t", "c", "z", "y", "x"]
    scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[-1] == pytest.approx(0.1) and scale[2] == pytest.approx(0.2)


@pytest.mark.parametrize("cls", [OmeTiffResultWriter, OmeZarrResultWriter])
def test_stores_record_which_planes_were_processed(tmp_path: Path, cls) -> None:
    writer = cls(tmp_path / f"ctirf{'.ome.tiff' if cls is OmeTiffResultWriter else '.ome.zarr'}")
    writer.open(_seq(), (32, 48), channels=("EPI",), metadata=META)
    writer.write({"t": 0, "c": 0, "z": 1}, _frame(1))
    writer.write({"t": 2, "c": 0}, np.stack([_frame(z) for z in range(6)]))
    writer.close()
    _, meta = read_result(writer.path)
    mask = meta["processed"]
    assert len(mask) == 18 and mask == "010000" + "000000" + "111111"
    assert meta["planes_processed"] == writer.frames_written == 7 == mask.count("1")
    assert meta["model"] == META  # the rest of the metadata survives the rewrite


def test_tiff_writer_uses_ordinary_writes_and_reports_a_full_disk(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """ENOSPC is an OSError the caller can handle (a memory map would SIGBUS instead)."""
    import errno
    import os

    writer = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    writer.open(_seq(), (32, 48), channels=("EPI",))
    writer.write({"t": 0, "c": 0, "z": 0}, _frame(1))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as err:
        writer.write({"t": 1, "c": 0, "z": 0}, _frame(2))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    writer.close()
    data, meta = read_result(writer.path)
    np.testing.assert_array_equal(data[0, 0, 0], _frame(1))
    assert meta["processed"].count("1") == 1


def test_grid_sub_sequence_on_a_position_gets_its_own_images(tmp_path: Path) -> None:
    """What pymmcore-widgets saves: a position with a grid plan beside a plain position."""
    seq = useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        channels=CHANNELS[:1],
        stage_positions=[{"x": 0, "y": 0, "sequence": {"grid_plan": {"rows": 1, "columns": 2}}},
                         {"x": 50, "y": 0}],
    )
    layout = ResultLayout.from_sequence(seq, (32, 48))
    assert layout.position_keys == ((0, 0), (0, 1), (1, 0)) and layout.shape == (2, 1, 32, 48)
    writer = OmeZarrResultWriter(tmp_path / "ctirf.ome.zarr")
    writer.open(seq, (32, 48))
    for event in seq:
        writer.write(dict(event.index), _frame(len(event.index)))
    writer.close()
    for pos in range(3):
        data, meta = read_result(writer.path, position=pos)
        assert data.shape == (2, 1, 32, 48) and meta["processed"] == "11"
    with pytest.raises(IndexError, match="grid point 5"):
        layout.position({"p": 0, "g": 5})


@pytest.mark.parametrize(
    ("cls", "dtype", "scale"),
    [
        (OmeTiffResultWriter, "uint16", 0.25),
        (OmeTiffResultWriter, "float32", 1.0),
        (OmeZarrResultWriter, "uint16", 0.25),
        (OmeZarrResultWriter, "float16", 1.0),
    ],
)
def test_stores_keep_the_chosen_dtype_and_its_scale(tmp_path: Path, cls, dtype: str,
                                                    scale: float) -> None:
    from ctirf_live.inference.encoding import Encoding

    suffix = ".ome.tiff" if cls is OmeTiffResultWriter else ".ome.zarr"
    writer = cls(tmp_path / f"ctirf{suffix}", encoding=Encoding(dtype, scale=scale))
    writer.open(_seq(), (32, 48), channels=("EPI",), metadata=META, pixel_size_um=0.1)
    assert writer.bytes_per_pixel == (4 if dtype == "float32" else 2)
    bright = _frame(7) * 200  # up to ~20000 counts: over uint16 at a 0.25 step (16384)
    writer.write({"t": 0, "c": 0, "z": 0}, _frame(6))
    writer.write({"t": 1, "c": 0, "z": 3}, bright)
    writer.close()
    stored, meta = read_result(writer.path, decoded=False)
    values, _ = read_result(writer.path)
    assert stored.dtype == np.dtype(dtype) and values.dtype == np.float32
    record = meta["encoding"]
    assert record["dtype"] == dtype and record["scale"] == scale and record["offset"] == 0
    tolerance = {"uint16": scale / 2, "float16": 100 * 2.0**-11, "float32": 0}[dtype]
    np.testing.assert_allclose(values[0, 0, 0], _frame(6), rtol=0, atol=tolerance + 1e-6)
    over = int(np.count_nonzero(bright > 65535.5 * scale)) if dtype == "uint16" else 0
    assert over > 0 or dtype != "uint16"
    assert record.get("clipped_pixels", 0) == over
    assert record.get("planes_clipped", 0) == int(over > 0)
    if dtype == "uint16":
        assert values[1, 0, 3].max() == pytest.approx(65535 * scale)  # clipped at the top
        np.testing.assert_allclose(values[1, 0, 3][bright < 16000], bright[bright < 16000],
                                   atol=scale / 2 + 1e-3)
    if cls is OmeZarrResultWriter and dtype == "uint16":  # CF packing for xarray-like readers
        attrs = json.loads((writer.path / "0" / "zarr.json").read_text())["attributes"]
        assert attrs["scale_factor"] == scale and attrs["add_offset"] == 0
        ome = json.loads((writer.path / "zarr.json").read_text())["attributes"]["ome"]
        window = ome["omero"]["channels"][0]["window"]
        assert window["max"] == 65535  # the display window is in stored steps


def test_float16_tiff_store_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from ctirf_live.inference.encoding import Encoding

    with pytest.raises(ValueError, match=r"not an OME pixel type.*use OME-Zarr"):
        make_result_writer(tmp_path, "ome-tiff", encoding=Encoding("float16"))
    assert isinstance(make_result_writer(tmp_path, "ome-zarr", encoding=Encoding("float16")),
                      OmeZarrResultWriter)
