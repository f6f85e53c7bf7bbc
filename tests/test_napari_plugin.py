"""The napari plugin: reader and writer as plain functions (no napari needed), the npe2
manifest, and the restore widget (only where napari is installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import useq

from ctirf_live.config import Optics
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.data.tiff import read_ome_tiff
from ctirf_live.inference.restorer import Restorer
from ctirf_live.inference.writers import OmeTiffResultWriter, OmeZarrResultWriter, read_result
from ctirf_live.models.etnet import ET2dNet
from ctirf_live.napari.reader import contrast_limits, get_reader, read_path
from ctirf_live.napari.widget import ctirf_layer, restore_array
from ctirf_live.napari.writer import write_ome_tiff_layer

MANIFEST = Path(__file__).resolve().parents[1] / "ctirf_live" / "napari.yaml"
PX = 0.0975


def _frame(seed: int, shape: tuple[int, int] = (32, 48)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(100, 4000, shape).astype(np.float32)


def _seq(positions: int = 1) -> useq.MDASequence:
    stage = [{"x": 10.0 * i, "y": 0.0, "name": f"cell{i}"} for i in range(positions)]
    return useq.MDASequence(
        time_plan={"interval": 0.5, "loops": 2},
        z_plan={"range": 0.4, "step": 0.2},
        channels=["EPI"],
        stage_positions=stage if positions > 1 else [],
        axis_order="tpgcz",
    )


def test_a_paired_dataset_opens_as_epi_and_tirf_layers(tmp_path: Path) -> None:
    ds = PairedDataset.create(tmp_path / "pairs", Optics())
    for i in range(2):
        ds.add_pair(_frame(i), _frame(10 + i), {"x": 0.0, "y": 0.0}, (0.0, 0.0), 1.0)
    assert get_reader(str(ds.folder)) is not None
    (epi, epi_kw, kind), (tirf, tirf_kw, _) = read_path(ds.folder)
    assert kind == "image" and epi.shape == tirf.shape == (2, 32, 48)
    assert epi_kw["name"] == "EPI (pairs)" and tirf_kw["name"] == "TIRF (pairs)"
    assert epi_kw["scale"] == pytest.approx((1.0, PX, PX))
    np.testing.assert_array_equal(tirf[1], ds.load_pair(1)[1])
    lo, hi = tirf_kw["contrast_limits"]
    assert np.percentile(tirf, 0.1) == pytest.approx(lo) and hi > lo


def test_a_ctirf_tiff_store_opens_with_its_channel_name_and_scale(tmp_path: Path) -> None:
    writer = OmeTiffResultWriter(tmp_path / "ctirf.ome.tiff")
    writer.open(_seq(), (32, 48), channels=("EPI",), pixel_size_um=PX)
    writer.write({"t": 1, "c": 0}, np.stack([_frame(z) for z in range(3)]))
    writer.close()
    [(data, kwargs, _)] = read_path(writer.path)
    expected, _ = read_result(writer.path)
    np.testing.assert_array_equal(data, expected[:, 0])  # C of size 1 dropped
    assert kwargs["name"] == "cTIRF EPI"
    assert kwargs["scale"] == pytest.approx((1.0, 0.2, PX, PX))  # T, Z, Y, X
    assert kwargs["metadata"]["axes"] == "TZYX"


def test_a_multi_position_zarr_store_gives_one_lazy_layer_per_series(tmp_path: Path) -> None:
    writer = OmeZarrResultWriter(tmp_path / "ctirf.ome.zarr")
    writer.open(_seq(2), (32, 48), channels=("EPI",), pixel_size_um=PX)
    writer.write({"t": 0, "p": 1, "c": 0, "z": 2}, _frame(5))
    writer.close()
    layers = read_path(writer.path)
    assert [kw["name"] for _, kw, _ in layers] == ["cTIRF EPI (cell0)", "cTIRF EPI (cell1)"]
    data, kwargs, _ = layers[1]
    assert not isinstance(data, np.ndarray)  # read on demand
    np.testing.assert_array_equal(np.asarray(data[0, 2]), _frame(5))
    assert kwargs["scale"] == pytest.approx((0.5, 0.2, PX, PX))
    lo, hi = kwargs["contrast_limits"]  # the window the writer recorded from the data
    assert 100 <= lo < hi <= 4000


def test_the_raw_zarr_store_of_pymmcore_plus_opens(tmp_path: Path) -> None:
    from ome_writers import AcquisitionSettings, create_stream, useq_to_acquisition_settings

    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 3}, channels=["EPI"])
    settings = AcquisitionSettings.model_validate(
        {
            "root_path": str(tmp_path / "raw.ome.zarr"),
            "dtype": "uint16",
            **useq_to_acquisition_settings(seq, image_width=48, image_height=32, pixel_size_um=PX),
        }
    )
    frames = [np.full((32, 48), 100 + k, np.uint16) for k in range(3)]
    with create_stream(settings) as stream:
        for f in frames:
            stream.append(f)
    [(data, kwargs, _)] = read_path(tmp_path / "raw.ome.zarr")
    np.testing.assert_array_equal(np.asarray(data).reshape(3, 32, 48), np.stack(frames))
    assert kwargs["scale"][-2:] == pytest.approx((PX, PX))


def test_unknown_paths_are_left_to_other_readers(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None
    with pytest.raises(ValueError, match="not a ctirf dataset"):
        read_path(tmp_path)


def test_the_writer_keeps_scale_and_name(tmp_path: Path) -> None:
    stack = np.stack([_frame(z) for z in range(4)])
    meta = {"name": "cTIRF EPI", "scale": (0.3, PX, PX), "metadata": {"axes": "ZYX"}}
    [written] = write_ome_tiff_layer(str(tmp_path / "out"), stack, meta)
    assert written.endswith(".ome.tiff")
    data, info = read_ome_tiff(written)
    np.testing.assert_array_equal(data, stack)
    assert info.pixel_size_um == pytest.approx(PX) and info.z_step_um == pytest.approx(0.3)
    assert info.channel_names == ["cTIRF EPI"]
    [(_, kwargs, _)] = read_path(written)
    assert kwargs["scale"] == pytest.approx((0.3, PX, PX)) and kwargs["name"] == "cTIRF EPI"


def test_the_writer_refuses_what_ome_tiff_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 to 5 dimensions"):
        write_ome_tiff_layer(str(tmp_path / "x.ome.tiff"), np.zeros((2,) * 6), {})


def test_contrast_limits_are_never_an_empty_range() -> None:
    assert contrast_limits(np.full((8, 8), 5.0)) == (5.0, 6.0)


def test_the_manifest_is_valid_and_its_commands_import() -> None:
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()
    assert manifest.name == "ctirf-live"
    assert {c.id for c in manifest.contributions.commands} >= {
        "ctirf-live.get_reader",
        "ctirf-live.write_ome_tiff",
        "ctirf-live.restore_widget",
    }


def test_the_widget_core_restores_every_frame_of_a_time_series() -> None:
    torch.manual_seed(0)
    restorer = Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)
    series = np.stack([[_frame(t, (64, 64))] for t in range(2)])  # (T, C, Y, X)
    out = restore_array(series, restorer)
    assert out.shape == series.shape
    np.testing.assert_allclose(out[1, 0], restorer.restore(series[1, 0]), rtol=1e-6)
    _, kwargs, kind = ctirf_layer("EPI", series, restorer, scale=(1, 1, PX, PX))
    assert kind == "image" and kwargs["name"] == "cTIRF EPI"
    assert kwargs["scale"] == (1, 1, PX, PX) and "ctirf" in kwargs["metadata"]


WIDGET_SCRIPT = """
import sys
import numpy as np, torch
from qtpy.QtWidgets import QApplication
from napari.layers import Image
from ctirf_live.config import Optics
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet, save_model
from ctirf_live.napari.widget import restore_widget

app = QApplication([])
torch.manual_seed(0)
checkpoint = save_model(ET2dNet(Optics(), "tiny"), sys.argv[1])
frame = np.random.default_rng(1).uniform(100, 4000, (64, 64)).astype(np.float32)
layer = Image(frame, name="EPI", scale=(0.0975, 0.0975))
widget = restore_widget()
# the widget's function without the viewer's handling of the returned worker (which
# starts its thread): run what the worker thread runs, here
worker = widget._function(layer=layer, model=str(checkpoint), device="cpu", tile=64)
data, kwargs, _ = worker.work()
expected = Restorer(checkpoint, device="cpu", tile=64).restore(frame)
assert np.allclose(data, expected, rtol=1e-6), "widget result differs from the Restorer"
assert kwargs["name"] == "cTIRF EPI", kwargs["name"]
assert np.allclose(kwargs["scale"], (0.0975, 0.0975)), kwargs["scale"]
print("widget ok")
"""


def test_the_napari_widget_restores_the_chosen_layer(tmp_path: Path) -> None:
    """In its own process: importing napari into the test process makes later Qt and
    pymmcore-plus tests crash at event processing."""
    if importlib.util.find_spec("napari") is None:
        pytest.skip("napari is not installed (pip install 'ctirf-live[napari]')")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(
        [sys.executable, "-c", WIDGET_SCRIPT, str(tmp_path / "tiny.safetensors")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0 and "widget ok" in proc.stdout, proc.stderr[-2000:]
