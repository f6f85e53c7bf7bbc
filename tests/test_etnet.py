from pathlib import Path

import numpy as np
import pytest
import torch

from ctirf_live.config import Optics
from ctirf_live.models.checkpoint import CheckpointError, save_checkpoint
from ctirf_live.models.etnet import ET2dNet, ET3dNet, load_model, make_psf, save_model


@pytest.fixture
def optics() -> Optics:
    return Optics()


def test_outputs_non_negative_and_consistent(optics: Optics) -> None:
    torch.manual_seed(0)
    net = ET2dNet(optics, "tiny").eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 64, 64))
    for t in (out.g, out.b, out.ctirf):
        assert t.shape == (2, 1, 64, 64)
    assert (out.g >= 0).all() and (out.b >= 0).all()
    torch.testing.assert_close(out.recon, out.ctirf + out.b)


def test_delta_g_gives_the_psf(optics: Optics) -> None:
    net = ET2dNet(optics, "tiny")
    g = torch.zeros(1, 1, 64, 64)
    g[0, 0, 32, 32] = 1.0
    out = net.forward_model(g)[0, 0].numpy()
    psf = make_psf(optics)
    r = psf.shape[0] // 2
    np.testing.assert_allclose(out[32 - r : 32 + r + 1, 32 - r : 32 + r + 1], psf, atol=1e-6)


def test_3d_network_runs_on_six_planes(optics: Optics) -> None:
    torch.manual_seed(0)
    net = ET3dNet(optics, "tiny").eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 6, 64, 64))
    assert out.ctirf.shape == (1, 1, 6, 64, 64)
    assert net.forward_model.psf.ndim == 3


def test_3d_ctirf_is_sectioned_and_the_recon_is_widefield(optics: Optics) -> None:
    """A point in plane 2: cTIRF keeps it in plane 2 (in-focus PSF), the reconstructed EPI
    spreads it over every plane (3D PSF), and the slice-wise view follows the PSF's peaks."""
    net = ET3dNet(optics, "tiny")
    g = torch.zeros(1, 1, 6, 64, 64)
    g[0, 0, 2, 32, 32] = 1.0
    out = net.outputs(g, torch.zeros_like(g))
    ctirf, recon = out.ctirf[0, 0], out.recon[0, 0]
    assert ctirf.sum(dim=(1, 2))[2] == pytest.approx(1.0, abs=1e-3)
    assert float(ctirf.sum() - ctirf[2].sum()) == pytest.approx(0.0, abs=1e-4)
    r = make_psf(optics, 3).shape[-1] // 2
    window = ctirf[2, 32 - r : 32 + r + 1, 32 - r : 32 + r + 1].numpy()
    np.testing.assert_allclose(window, make_psf(optics, 3)[5], atol=1e-6)
    assert (recon.sum(dim=(1, 2)) > 0.5).all()  # every plane sees the point's light
    view = net.slicewise_view(g)[0, 0, :, 32, 32]
    peaks = net.forward_model.psf.amax(dim=(-2, -1))
    expected = (peaks / peaks[5])[3:9]  # planes 0..5 are offsets -2..+3 from plane 2
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=1e-5)
    assert view[2] == pytest.approx(1.0) and view[1] == view[3] < 1.0


def test_slicewise_view_of_a_uniform_volume_is_uniform(optics: Optics) -> None:
    """The stack's edges are continued, not zero: a uniform g must not need to ring."""
    net = ET3dNet(optics, "tiny")
    view = net.slicewise_view(torch.full((1, 1, 6, 8, 8), 0.5))[0, 0, :, 4, 4]
    peaks = net.forward_model.psf.amax(dim=(-2, -1))
    expected = torch.full((6,), 0.5 * float((peaks / peaks[peaks.shape[0] // 2]).sum()))
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=1e-5)


def test_view_matrix_is_the_slicewise_view(optics: Optics) -> None:
    torch.manual_seed(0)
    net = ET3dNet(optics, "tiny", psf_model="gibson_lanni_water")
    g = torch.rand(1, 1, 6, 5, 5)
    by_matrix = torch.einsum("kz,bczyx->bckyx", net.view_matrix(6).float(), g)
    torch.testing.assert_close(by_matrix, net.slicewise_view(g), atol=1e-5, rtol=1e-5)


def test_axial_unblur_gives_each_emitter_back_to_its_plane(tmp_path: Path, optics: Optics) -> None:
    """An inflated student's cTIRF is the teacher's slice-wise response / sum(profile);
    inverting the view puts the light of a point in plane 2 back into plane 2, keeps the
    teacher's scale, and the setting travels with the checkpoint."""
    net = ET3dNet(optics, "tiny", psf_model="gibson_lanni_water", axial_unblur=20)
    g = torch.zeros(1, 1, 6, 1, 1)
    g[0, 0, 2] = 1.0
    response = net.slicewise_view(g) / net.view_matrix(6)[0].sum().float()
    blurred_share = float(response[0, 0, 2].sum() / response.sum())
    out = net.unblur_view(response, 20)
    share = float(out[0, 0, 2].sum() / out.sum())
    # the water PSF's view is nearly flat over three planes: RL sharpens it step by step
    assert share > 1.4 * blurred_share and int(out[0, 0, :, 0, 0].argmax()) == 2
    assert float(out[0, 0, 5].sum()) < float(response[0, 0, 5].sum()) / 5
    assert float(out.sum()) == pytest.approx(1.0, rel=0.15)  # the point's own light
    loaded, meta = load_model(save_model(net, tmp_path / "m3"))
    assert meta["architecture"]["kwargs"]["axial_unblur"] == 20 and loaded.axial_unblur == 20
    plain = ET3dNet(optics, "tiny", psf_model="gibson_lanni_water")
    plain.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 6, 32, 32)
    with torch.no_grad():
        a, b = net(x), plain(x)
    torch.testing.assert_close(a.recon, b.recon)  # the physics is untouched
    torch.testing.assert_close(a.ctirf, net.unblur_view(b.ctirf, 20))
    with pytest.raises(ValueError, match="3D"):
        ET2dNet(optics, "tiny", axial_unblur=5)


def test_checkpoint_round_trip_runs_at_another_size(tmp_path: Path, optics: Optics) -> None:
    torch.manual_seed(0)
    net = ET2dNet(optics, "tiny").eval()
    path = save_model(net, tmp_path / "m", provenance={"data": "unit test"})
    loaded, meta = load_model(path)
    assert meta["architecture"]["name"] == "ET2dNet"
    assert meta["provenance"]["data"] == "unit test"
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(1, 1, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(net(x).ctirf, loaded(x).ctirf)


def test_measured_psf_travels_with_the_checkpoint(tmp_path: Path, optics: Optics) -> None:
    psf = np.zeros((9, 9), np.float32)
    psf[4, 3:6] = 1 / 3
    net = ET2dNet(optics, "tiny", psf=psf)
    loaded, meta = load_model(save_model(net, tmp_path / "m"))
    assert meta["psf"]["model"] == "measured"
    np.testing.assert_allclose(loaded.forward_model.psf.numpy(), psf)


def test_fine_tuning_swaps_the_psf(optics: Optics) -> None:
    net = ET2dNet(optics, "tiny")
    before = net.forward_model.psf.clone()
    net.set_optics(Optics(objective="100X", pixel_size_um=0.0585))
    assert net.optics.objective == "100X"
    assert net.forward_model.psf.shape != before.shape or not torch.equal(
        net.forward_model.psf, before
    )


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path / "x", {"w": torch.zeros(2)}, {"architecture": {"name": "ResNet"}}
    )
    with pytest.raises(CheckpointError, match="ET2dNet"):
        load_model(path)


def test_the_water_psf_is_the_deep_emitters_broader_asymmetric_one(
    optics: Optics, tmp_path: Path
) -> None:
    """gibson_lanni_water: an emitter 1 um into water seen through oil, stage stepped around
    its focus, spreads further along Z (focal shift) and unevenly (depth aberration) than
    an emitter on the glass; a 3D model built on it keeps it through a checkpoint."""
    water = make_psf(optics, 3, "gibson_lanni_water")
    glass = make_psf(optics, 3, "gibson_lanni")
    assert water.shape == glass.shape
    assert water[water.shape[0] // 2].sum() == pytest.approx(1.0, rel=1e-4)

    def relative(p: np.ndarray) -> np.ndarray:
        peaks = p.max(axis=(1, 2))
        return peaks / peaks.max()

    w, g = relative(water), relative(glass)
    c = len(w) // 2
    assert w[c - 2] > g[c - 2] + 0.1 and w[c + 2] > g[c + 2] + 0.1  # broader along Z
    assert abs(w[c + 1] - w[c - 1]) > 0.1 > abs(g[c + 1] - g[c - 1])  # and uneven
    net = ET3dNet(optics, "tiny", psf_model="gibson_lanni_water")
    loaded, meta = load_model(save_model(net, tmp_path / "w"))
    assert meta["psf"]["model"] == "gibson_lanni_water"
    torch.testing.assert_close(loaded.forward_model.psf, net.forward_model.psf)
