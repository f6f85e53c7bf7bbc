import json
from pathlib import Path

import numpy as np
import pytest

from ctirf_live.config import Optics
from ctirf_live.data.dataset import DatasetError, PairedDataset, apply_shift


def _pair(rng: np.random.Generator, shape=(32, 32)) -> tuple[np.ndarray, np.ndarray]:
    epi = rng.integers(100, 4000, size=shape, dtype=np.uint16)
    tirf = rng.integers(100, 4000, size=shape, dtype=np.uint16)
    return epi, tirf


def test_pairs_written_and_listed_in_manifest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ds = PairedDataset.create(tmp_path / "ds", Optics())
    for i in range(3):
        ds.add_pair(*_pair(rng), {"x": i * 10.0, "y": 0.0, "z": 0.0}, (0.5, -0.25), 0.9)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["format"] == "ctirf-paired-dataset"
    assert manifest["objective"] == "60X"
    assert [p["file"] for p in manifest["pairs"]] == [f"pair_{i:04d}.ome.tif" for i in range(3)]
    assert manifest["pairs"][1]["shift_px"] == [0.5, -0.25]
    assert manifest["pairs"][2]["position"]["x"] == 20.0
    again = PairedDataset.open(tmp_path / "ds")
    assert len(again) == 3
    epi, _ = again.load_pair(0, registered=False)
    assert epi.dtype == np.float32 and epi.shape == (32, 32)


def test_interrupted_write_is_repaired_on_open(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ds = PairedDataset.create(tmp_path / "ds", Optics())
    for i in range(3):
        ds.add_pair(*_pair(rng), {"x": float(i)}, (0, 0), 1.0)
    # crash after the image write, before the manifest update: drop the last entry
    manifest_path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["pairs"] = manifest["pairs"][:2]
    manifest_path.write_text(json.dumps(manifest))
    # and a file deleted by hand
    (tmp_path / "ds" / "pair_0000.ome.tif").unlink()
    reopened = PairedDataset.open(tmp_path / "ds")
    assert sorted(p.file for p in reopened) == ["pair_0001.ome.tif", "pair_0002.ome.tif"]
    assert reopened.next_file() == "pair_0003.ome.tif"


def test_mixing_objectives_is_refused(tmp_path: Path) -> None:
    PairedDataset.create(tmp_path / "ds", Optics())
    with pytest.raises(DatasetError, match="another --out"):
        PairedDataset.create(tmp_path / "ds", Optics(objective="100X", pixel_size_um=0.0585))


def test_open_non_dataset_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="calibrate"):
        PairedDataset.open(tmp_path)


def test_registration_shift_applied_on_read(tmp_path: Path) -> None:
    img = np.zeros((32, 32), np.uint16)
    img[10, 12] = 1000
    ds = PairedDataset.create(tmp_path / "ds", Optics())
    ds.add_pair(img, img, {}, (2.0, -3.0), 1.0)
    epi, tirf = ds.load_pair(0)
    assert np.unravel_index(np.argmax(epi), epi.shape) == (12, 9)
    assert np.unravel_index(np.argmax(tirf), tirf.shape) == (10, 12)
    np.testing.assert_allclose(apply_shift(epi, (-2.0, 3.0)).max(), 1000, rtol=0.05)


def test_pair_files_carry_objective_modes_and_date_for_fiji(tmp_path) -> None:
    import ome_types
    import tifffile

    from ctirf_live.config import Optics

    ds = PairedDataset.create(tmp_path / "ds", Optics(objective="100X", na=1.45))
    frame = np.full((32, 32), 100, np.uint16)
    rec = ds.add_pair(frame, frame, {"x": 0.0, "y": 0.0}, (0.0, 0.0), 1.0)
    xml = tifffile.tiffcomment(ds.folder / rec.file)
    ome_types.validate_xml(xml)
    ome = ome_types.from_xml(xml)
    assert ome.instruments[0].objectives[0].lens_na == 1.45
    assert ome.instruments[0].objectives[0].nominal_magnification == 100
    modes = [c.acquisition_mode.value for c in ome.images[0].pixels.channels]
    assert modes == ["WideField", "TotalInternalReflection"]
    assert ome.images[0].acquisition_date is not None
