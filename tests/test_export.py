"""`ctirf export`: bioimage.io packages (tested with bioimageio.core), their reimport by
`ctirf process -m MODEL.zip`, and the ONNX backbone export."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from ctirf_live.cli import app
from ctirf_live.config import Optics
from ctirf_live.data.normalize import percentile_scale as numpy_percentile_scale
from ctirf_live.data.tiff import read_ome_tiff, write_ome_tiff
from ctirf_live.export.bioimageio import export_bioimageio
from ctirf_live.export.bioimageio_arch import (
    CTIRFNet,
    arch_kwargs,
    from_etnet,
    percentile_scale,
)
from ctirf_live.inference.restorer import Restorer
from ctirf_live.models.checkpoint import CheckpointError, resolve_checkpoint
from ctirf_live.models.etnet import ET2dNet, make_psf, save_model

SIZE = 64


def _tiny(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ET2dNet(Optics(), "tiny", **kwargs).eval()


def _frame(seed: int, shape: tuple[int, ...] = (SIZE, SIZE)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.poisson(60, shape) + 100).astype(np.uint16)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, the bioimage.io zip exported from it by the CLI)."""
    pytest.importorskip("bioimageio.core")
    folder = tmp_path_factory.mktemp("export")
    checkpoint = save_model(_tiny(), folder / "tiny.safetensors")
    # the model test runs once, in the test below (`ctirf export` runs it before writing)
    out = export_bioimageio(checkpoint, folder / "tiny.zip", size=SIZE, authors=["T"], test=False)
    return checkpoint, out


def test_the_architecture_entry_computes_what_the_restorer_does() -> None:
    net = _tiny()
    image = _frame(1, (96, 128))
    expected = Restorer(net, device="cpu").restore(image)
    with torch.no_grad():
        got = from_etnet(net)(torch.from_numpy(image.astype(np.float32))[None, None])
    np.testing.assert_allclose(got[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_in_model_normalisation_is_eq1_per_sample() -> None:
    batch = np.stack([_frame(2), _frame(3) * 3]).astype(np.float32)[:, None]
    scales = percentile_scale(torch.from_numpy(batch), 98.0).flatten().numpy()
    expected = [numpy_percentile_scale(b, 98.0) for b in batch]
    np.testing.assert_allclose(scales, expected, rtol=1e-6)


def test_a_measured_psf_travels_in_the_state_dict() -> None:
    psf = make_psf(Optics(na=1.2), size=17)
    net = _tiny(psf=psf)
    rebuilt = CTIRFNet(**arch_kwargs(net, 98.0))  # as bioimage.io builds it: a zero PSF
    assert not rebuilt.net.forward_model.psf.any()
    rebuilt.load_state_dict(from_etnet(net).state_dict())
    np.testing.assert_allclose(rebuilt.net.forward_model.psf.numpy(), psf, rtol=1e-6)


def test_the_package_passes_bioimageio_model_test(package: tuple[Path, Path]) -> None:
    from bioimageio.core import test_model

    _, zip_path = package
    summary = test_model(zip_path)
    assert summary.status == "passed", summary.display()
    with zipfile.ZipFile(zip_path) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        names = set(zf.namelist())
    assert rdf["format_version"].startswith("0.5")
    assert {"pytorch_state_dict", "torchscript"} <= set(rdf["weights"])
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] == "CTIRFNet"
    assert rdf["config"]["ctirf"]["normalization"] == {"percentile": 98.0, "input_ceiling": 1.0}
    assert {"cover.png", "README.md", "ctirf.safetensors", "test_input.npy"} <= names
    with zipfile.ZipFile(zip_path) as zf:
        card = zf.read("README.md").decode()
    assert "NA" in card and "PSF" in card and "## Validation" in card


def test_the_test_output_is_what_the_restorer_makes(package: tuple[Path, Path]) -> None:
    checkpoint, zip_path = package
    with zipfile.ZipFile(zip_path) as zf:
        x = np.load(zf.open("test_input.npy"))
        y = np.load(zf.open("test_output.npy"))
    assert x.shape == y.shape == (1, 1, SIZE, SIZE)
    expected = Restorer(checkpoint, device="cpu").restore(x[0, 0])
    np.testing.assert_allclose(y[0, 0], expected, rtol=1e-5, atol=1e-4)


def test_process_reimports_the_package(
    package: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    checkpoint, zip_path = package
    epi = tmp_path / "epi.ome.tiff"
    write_ome_tiff(epi, _frame(4, (96, 96)), "YX", pixel_size_um=0.0975, channel_names=["EPI"])
    out = tmp_path / "ctirf.ome.tiff"
    result = CliRunner().invoke(app, ["process", str(epi), "-m", str(zip_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    got, _ = read_ome_tiff(out)
    expected = Restorer(checkpoint, device="cpu").restore(_frame(4, (96, 96)))
    np.testing.assert_allclose(np.squeeze(got), expected, rtol=1e-5, atol=1e-4)
    assert resolve_checkpoint(zip_path).read_bytes() == checkpoint.read_bytes()


def test_a_foreign_bioimageio_package_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "unet.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("rdf.yaml", yaml.safe_dump({"name": "some UNet", "type": "model"}))
    with pytest.raises(CheckpointError, match="not a ctirf-live package"):
        resolve_checkpoint(foreign)
    result = CliRunner().invoke(app, ["process", "x.tif", "-m", str(foreign), "-o", "y.tif"])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "model.yaml"], ".zip file"),
        (["-o", "m.zip", "--size", "70"], "multiple of 32"),
        (["-o", "m.zip", "--format", "keras"], "unknown --format"),
        (["-o", "m.zip", "--format", "onnx"], ".onnx file"),
    ],
)
def test_bad_export_options_get_one_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", "et2dnet_s0_60x_sim", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_onnx_export_writes_the_backbone_for_the_tile(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    checkpoint = save_model(_tiny(), tmp_path / "tiny.safetensors")
    out = tmp_path / "tiny.onnx"
    result = CliRunner().invoke(
        app, ["export", str(checkpoint), "--format", "onnx", "-o", str(out), "--size", "64"]
    )
    assert result.exit_code == 0, result.output
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 1, 64, 64]
