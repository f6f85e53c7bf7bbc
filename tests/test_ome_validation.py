"""Every OME file the package writes is valid OME and opens with the right scale.

OME-TIFF: each file's OME-XML is validated against the OME schema (ome-types + lxml) and
read back with ome-types: image sizes as tifffile reads them, pixel size as OME fields,
and the TIFF resolution tags (what plain ImageJ and napari's tifffile reader use).
The raw and cTIRF stores of a run and `process` outputs also carry what a microscopist
expects: the objective (NA, immersion, magnification), each channel's AcquisitionMode
(cTIRF: Other, explained in the ctirf annotation) and wavelengths, AcquisitionDate, and
Plane DeltaT/positions; OME-Zarr stores the same facts in a `ctirf` attribute block.
OME-Zarr: ome-zarr-py's Reader (what napari-ome-zarr uses) finds the raw and cTIRF
images with the right axes and physical scale, and the cTIRF display range comes from
the data. The README workflow test validates the files of that workflow the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ome_types
import pytest
import tifffile
import torch
import useq
from conftest import DEMO_CFG
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from ctirf_live.acquisition.core import check_rig, open_core
from ctirf_live.acquisition.snap import save_snap, snap
from ctirf_live.config import Optics
from ctirf_live.data.dataset import PairedDataset
from ctirf_live.inference.acquire import acquire
from ctirf_live.inference.process import process_file
from ctirf_live.inference.rawstore import repair_raw_tiff
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.etnet import ET2dNet

ROI = 64
PIXEL_60X = 0.0975  # the demo rig's active objective at start-up


RAW_MODES = {"EPI": "WideField", "TIRF": "TotalInternalReflection"}


def check_acquisition(ome: ome_types.OME, modes: dict[str, str], what: str) -> None:
    """The demo rig's 60X objective (NA 1.5, oil) linked from every image, each channel's
    AcquisitionMode and wavelengths, an AcquisitionDate, and per channel Plane DeltaT
    present and increasing over time (the runs are time-lapses)."""
    objectives = {o.id: o for i in ome.instruments for o in i.objectives}
    images = [i for i in ome.images if i.pixels.planes]
    assert images, f"{what}: no image with Plane elements"
    for image in ome.images:
        assert image.acquisition_date is not None, what
        assert image.instrument_ref is not None and image.objective_settings is not None, what
        objective = objectives[image.objective_settings.id]
        assert objective.lens_na == pytest.approx(1.5), what
        assert objective.immersion.value == "Oil" and objective.nominal_magnification == 60
        for channel in image.pixels.channels:
            assert channel.acquisition_mode.value == modes[channel.name], (what, channel.name)
            assert channel.emission_wavelength == pytest.approx(670.0), what
            assert channel.excitation_wavelength == pytest.approx(638.0), what
    for image in images:
        for c in range(image.pixels.size_c):
            planes = sorted((p for p in image.pixels.planes if p.the_c == c), key=lambda p: p.the_t)
            times = [p.delta_t for p in planes]
            assert len(times) == image.pixels.size_t * image.pixels.size_z, what
            assert None not in times, what
            per_t = [times[i] for i in range(0, len(times), image.pixels.size_z)]
            assert per_t == sorted(per_t) and per_t[0] < per_t[-1], (what, times)
            assert all(p.position_x is not None for p in planes), what


def check_ome_tiff(path: Path, pixel_size_um: float, tiff_scale: bool = True) -> ome_types.OME:
    """Schema-valid OME-XML whose images match the pixels tifffile reads; the pixel size
    in OME and (with `tiff_scale`) in the TIFF resolution tags, in micrometres."""
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
        assert xml, f"{path.name} has no OME-XML"
        shapes = [s.shape for s in tif.series]
        page = tif.pages.first
        resolution = page.get_resolution(tifffile.RESUNIT.MICROMETER)
        unit = page.resolutionunit
    ome_types.validate_xml(xml)
    ome = ome_types.from_xml(xml)
    images = [i for i in ome.images if i.pixels.tiff_data_blocks or i.pixels.bin_data_blocks]
    assert images, f"{path.name}: no image in its OME-XML"
    for image in images:
        pixels = image.pixels
        assert pixels.physical_size_x == pytest.approx(pixel_size_um), path.name
        assert pixels.physical_size_y == pytest.approx(pixel_size_um), path.name
        assert (pixels.size_y, pixels.size_x) in {shape[-2:] for shape in shapes}
        planes = pixels.size_t * pixels.size_c * pixels.size_z
        assert planes in {int(np.prod(shape[:-2])) for shape in shapes}
    if tiff_scale:
        assert unit == tifffile.RESUNIT.MICROMETER, f"{path.name}: resolution unit {unit!r}"
        assert 1 / resolution[0] == pytest.approx(pixel_size_um, rel=1e-3), path.name
    return ome


@pytest.fixture(scope="module")
def tiny2d() -> Restorer:
    torch.manual_seed(0)
    return Restorer(ET2dNet(Optics(), "tiny"), device="cpu", tile=64, overlap=16)


@pytest.fixture(scope="module")
def core() -> Iterator:
    with open_core(DEMO_CFG) as core:
        core.setProperty("Camera", "RealTime", "0")
        core.setROI(992, 992, ROI, ROI)
        yield core


@pytest.fixture(scope="module")
def runs(core, tiny2d, tmp_path_factory) -> dict[str, Path]:
    """One z-stack time-lapse and one two-position EPI+TIRF run, as OME-TIFF and OME-Zarr."""
    folder = tmp_path_factory.mktemp("runs")
    stack = useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        z_plan={"range": 0.4, "step": 0.2},
        channels=[{"config": "EPI", "exposure": 2}],
        axis_order="tpcz",
    )
    positions = useq.MDASequence(
        time_plan={"interval": 0, "loops": 2},
        stage_positions=[{"name": "field_1", "x": 0, "y": 0}, {"x": 30, "y": 0}],
        channels=[{"config": "EPI", "exposure": 2}, {"config": "TIRF", "exposure": 2}],
        axis_order="tpcz",
    )
    out = {}
    for name, seq in (("stack", stack), ("positions", positions)):
        for fmt in ("ome-tiff", "ome-zarr"):
            out[f"{name}-{fmt}"] = acquire(core, seq, tiny2d, folder / f"{name}-{fmt}", fmt=fmt)
    return out


def test_snap_is_valid_ome_with_the_objective(core, tmp_path: Path) -> None:
    rig = check_rig(core, DEMO_CFG)
    image, meta = snap(core, rig, "TIRF", exposure_ms=5)
    ome = check_ome_tiff(save_snap(tmp_path / "snap.ome.tif", image, meta), PIXEL_60X)
    (channel,) = ome.images[0].pixels.channels
    assert channel.acquisition_mode.value == "TotalInternalReflection"
    assert ome.instruments[0].objectives[0].lens_na == pytest.approx(1.5)


def test_calibration_pairs_and_stacks_are_valid_ome(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ds = PairedDataset.create(tmp_path / "pairs", Optics(objective="60X", pixel_size_um=0.1))
    frames = rng.integers(100, 4000, (4, 48, 48)).astype(np.uint16)
    ds.add_pair(
        frames[0],
        frames[1],
        {"x": 0.0, "y": 0.0, "z": 0.0},
        (0.1, -0.2),
        0.9,
        stack=frames[1:],
        stack_info={"z_step_um": 0.2},
    )
    files = sorted((tmp_path / "pairs").glob("*.ome.tif"))
    assert len(files) == 2  # the pair and its z-stack
    for file in files:
        ome = check_ome_tiff(file, 0.1)
        assert ome.images[0].pixels.channels[0].acquisition_mode.value == "WideField"
    pair = ome_types.from_tiff(tmp_path / "pairs" / ds.pairs[0].file)
    modes = [c.acquisition_mode.value for c in pair.images[0].pixels.channels]
    assert modes == ["WideField", "TotalInternalReflection"]


@pytest.mark.parametrize("run", ["stack-ome-tiff", "positions-ome-tiff"])
def test_run_stores_are_valid_ome(runs, run: str) -> None:
    result = runs[run]
    for store in (result.raw_path, result.ctirf_path):
        files = [store] if store.is_file() else sorted(store.glob("*.ome.tiff"))
        assert files
        for file in files:
            ome = check_ome_tiff(file, PIXEL_60X)
            if store == result.ctirf_path:
                assert [c.name for c in ome.images[0].pixels.channels] == ["cTIRF EPI"]
                check_acquisition(ome, {"cTIRF EPI": "Other"}, file.name)
                assert "cTIRF" in _ctirf_json(ome)["acquisition"]["channels"][0]["name"]
            else:
                check_acquisition(ome, RAW_MODES, file.name)


@pytest.mark.parametrize("run", ["stack-ome-tiff", "positions-ome-tiff"])
def test_process_outputs_are_valid_ome(runs, tiny2d, tmp_path: Path, run: str) -> None:
    path, _ = process_file(runs[run].raw_path, tmp_path / "offline.ome.tiff", tiny2d)
    files = [path] if path.is_file() else sorted(path.glob("*.ome.tiff"))
    assert len(files) == (1 if run.startswith("stack") else 2)
    for file in files:
        ome = check_ome_tiff(file, PIXEL_60X)
        assert [c.name for c in ome.images[0].pixels.channels] == ["cTIRF EPI"]
        check_acquisition(ome, {"cTIRF EPI": "Other"}, file.name)


def _ctirf_json(ome: ome_types.OME) -> dict:
    import json

    (ann,) = [a for a in ome.structured_annotations.map_annotations if a.namespace == "ctirf-live"]
    return json.loads(dict((m.k, m.value) for m in ann.value.ms)["ctirf"])


def test_a_repaired_raw_file_is_valid_ome(tmp_path: Path) -> None:
    """`ctirf repair` of a raw OME-TIFF whose writer was SIGKILLed (pixel size 0.1 um)."""
    from test_rawstore import WRITTEN, _kill_writer

    crashed = tmp_path / "raw.ome.tiff"
    _kill_writer(crashed)
    result = repair_raw_tiff(crashed)
    assert result.output is not None and result.frames_recovered == WRITTEN
    check_ome_tiff(result.output, 0.1)


def _nodes(path: Path) -> list:
    """The image nodes ome-zarr-py's Reader (napari-ome-zarr's) finds at `path`."""
    return [n for n in Reader(parse_url(str(path)))() if n.data]


def _axes_and_scale(node) -> tuple[list[str], list[float]]:
    axes = [a["name"] for a in node.metadata["axes"]]
    (transform,) = [t for t in node.metadata["coordinateTransformations"][0] if "scale" in t]
    return axes, transform["scale"]


@pytest.mark.parametrize("run", ["stack-ome-zarr", "positions-ome-zarr"])
def test_zarr_stores_open_with_ome_zarr_with_axes_and_scale(runs, run: str) -> None:
    result = runs[run]
    multi = run.startswith("positions")
    groups = ["field_1", "1"] if multi else [""]
    for group in groups:
        (raw,) = _nodes(result.raw_path / group)
        (ctirf,) = _nodes(result.ctirf_path / group)
        for node in (raw, ctirf):
            axes, scale = _axes_and_scale(node)
            if multi:
                assert axes == ["t", "c", "y", "x"]
            else:
                assert axes == ["t", "c", "z", "y", "x"]
                assert scale[axes.index("z")] == pytest.approx(0.2)
            assert scale[-1] == scale[-2] == pytest.approx(PIXEL_60X)
        raw_shape, ctirf_shape = raw.data[0].shape, ctirf.data[0].shape
        assert ctirf_shape[0] == raw_shape[0] == 2 and ctirf_shape[-2:] == raw_shape[-2:]
        assert raw_shape[1] == (2 if multi else 1) and ctirf_shape[1] == 1  # EPI restored
        pixels = np.asarray(ctirf.data[0])
        low, high = ctirf.metadata["contrast_limits"][0]
        assert pixels.min() <= low < high <= pixels.max()  # from the data, not 0-65535
        assert ctirf.metadata["channel_names"] == ["cTIRF EPI"]
        raw_facts = _zarr_attrs(result.raw_path / group)["ctirf"]
        assert raw_facts["objective"]["lens_na"] == pytest.approx(1.5)
        assert raw_facts["objective"]["immersion"] == "Oil"
        expected = ["WideField", "TotalInternalReflection"] if multi else ["WideField"]
        assert [c["acquisition_mode"] for c in raw_facts["channels"]] == expected
        assert all(c["emission_wavelength_nm"] == 670.0 for c in raw_facts["channels"])
    facts = _zarr_attrs(result.ctirf_path)["ctirf"]
    (channel,) = facts["acquisition"]["channels"]
    assert channel["name"] == "cTIRF EPI" and channel["acquisition_mode"] == "Other"
    assert facts["acquisition"]["objective"]["lens_na"] == pytest.approx(1.5)
    assert facts["acquisition"]["acquired"]
    for planes in facts["planes"]:
        times = [p["DeltaT"] for p in planes if p["TheZ"] == 0]
        assert len(times) == 2 and times[0] < times[1]


def _zarr_attrs(group: Path) -> dict:
    import json

    return json.loads((group / "zarr.json").read_text())["attributes"]


def test_every_ome_tiff_of_a_run_folder_was_checked(runs) -> None:
    """No other OME-TIFF hides in a run folder (a new store would need its own check)."""
    for name in ("stack-ome-tiff", "positions-ome-tiff"):
        result = runs[name]
        found = {p for p in result.out_dir.rglob("*.tif*") if ".spill" not in p.parts}
        stores = set()
        for store in (result.raw_path, result.ctirf_path):
            stores |= {store} if store.is_file() else set(store.glob("*.ome.tiff"))
        assert found == stores


def test_check_ome_tiff_catches_a_missing_scale(tmp_path: Path) -> None:
    """The check itself: a TIFF without resolution tags fails it."""
    path = tmp_path / "bare.ome.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint16), ome=True,
                     metadata={"PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1})
    check_ome_tiff(path, 0.1, tiff_scale=False)
    with pytest.raises(AssertionError, match="resolution unit"):
        check_ome_tiff(path, 0.1)
