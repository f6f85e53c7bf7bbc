"""ONNX Runtime backend: export, verification, cache, fallback, and backend choice."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ctirf_live.config import Optics
from ctirf_live.inference import onnx_backend
from ctirf_live.inference.onnx_backend import OnnxBackbone
from ctirf_live.inference.restorer import Restorer, resolve_backend
from ctirf_live.models.etnet import ET2dNet, ET3dNet
from ctirf_live.models.onnx_export import BackboneMaps, export_backbone_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CTIRF_CACHE_DIR", str(tmp_path))
    return tmp_path / "onnx"


def _tiny(make=ET2dNet, seed: int = 0):
    torch.manual_seed(seed)
    return make(Optics(), "tiny").eval()


def _frame(shape=(64, 48), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.poisson(200, size=shape).astype(np.uint16)
    img[30:36, 10:40] += 3000
    return img


def test_export_writes_a_checked_graph_with_metadata(tmp_path: Path) -> None:
    import onnx

    model = _tiny()
    path = export_backbone_onnx(model, tmp_path / "sub" / "bb.onnx", (64, 96))
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert meta["network"] == "ET2dNet" and meta["input_shape"] == "[1, 1, 64, 96]"
    assert model.training is False and not list(tmp_path.glob("sub/.*tmp"))
    x = torch.rand(1, 1, 64, 96, generator=torch.Generator().manual_seed(3))
    out = ort.InferenceSession(str(path)).run(None, {"epi": x.numpy()})[0]
    with torch.no_grad():
        ref = BackboneMaps(model.backbone)(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"tile shape \(Y, X\)"):
        export_backbone_onnx(model, tmp_path / "bad.onnx", (6, 64, 64))


def test_onnx_restorer_matches_torch_and_caches(cache: Path, monkeypatch) -> None:
    model = _tiny()
    frame = _frame()
    eager = Restorer(model, device="cpu", tile=128, backend="torch", fold=False)
    fast = Restorer(model, device="cpu", tile=128, backend="onnx")
    assert fast.backend == "onnx" and fast.describe()["backend"] == "onnx"
    ref, out = eager.restore(frame), fast.restore(frame)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6 * ref.max())
    graphs = list(cache.glob("*.onnx"))
    assert len(graphs) == 1 and "1x1x96x80" in graphs[0].name  # padded 64x48, one pass
    # the same weights in a new Restorer reuse the cached graph instead of exporting
    calls = []
    monkeypatch.setattr(onnx_backend, "export_backbone_onnx", lambda *a, **k: calls.append(a))
    again = Restorer(_tiny(), device="cpu", tile=128, backend="onnx")
    np.testing.assert_allclose(again.restore(frame), out, rtol=1e-6, atol=1e-6)
    assert calls == []


def test_3d_models_stay_in_torch_and_an_explicit_onnx_is_refused(cache: Path) -> None:
    """ONNX Runtime corrupted the heap on the 3D graph (sporadic aborts): `auto` keeps
    ET3dNet in torch, `onnx` is refused in one line naming the way out."""
    model = _tiny(ET3dNet)
    auto = Restorer(model, device="cpu", tile=128, backend="auto")
    assert auto.backend == "torch" and auto._onnx is None
    stack = np.stack([_frame((64, 64), seed=s) for s in range(6)])
    assert auto.restore(stack).shape == stack.shape
    with pytest.raises(ValueError, match="--backend torch"):
        Restorer(model, device="cpu", tile=128, backend="onnx")
    assert Restorer(_tiny(ET2dNet), device="cpu", backend="onnx").backend == "onnx"


def test_graph_off_tolerance_is_refused_with_a_warning(cache: Path, caplog) -> None:
    model = _tiny()
    backbone = OnnxBackbone(model, tolerance=-1.0)  # nothing can pass
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="ctirf_live.inference.onnx_backend"):
        assert backbone.maps(x) is None
    assert "differs from torch" in backbone.refused((1, 1, 64, 64))
    assert "running ET2dNet in torch" in caplog.text
    assert not list(cache.glob("*.onnx"))  # a rejected graph is not kept


def test_unreadable_cache_is_exported_again(cache: Path) -> None:
    model = _tiny()
    backbone = OnnxBackbone(model)
    path = backbone.path_for((1, 1, 64, 64))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx graph")
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = backbone.maps(x)
    assert maps is not None and maps.shape == (1, 2, 64, 64)
    assert path.stat().st_size > 1000


def test_sessions_follow_torch_threads(cache: Path) -> None:
    backbone = OnnxBackbone(_tiny())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        session = backbone._session((1, 1, 64, 64))
        assert session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("CTIRF_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "onnx"
    assert resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("TORCH", cpu) == "torch"
    monkeypatch.setenv("CTIRF_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_backend("onnx", cuda)
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("tensorrt", cpu)
    monkeypatch.setattr("ctirf_live.inference.restorer.onnxruntime_available", lambda: False)
    monkeypatch.delenv("CTIRF_BACKEND")
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match=r"pip install 'ctirf-live\[onnx\]'"):
        resolve_backend("onnx", cpu)


def test_prune_cache_keeps_the_newest_within_the_limit(tmp_path: Path) -> None:
    paths = []
    for i in range(4):
        path = tmp_path / f"g{i}.onnx"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1000 + i, 1000 + i))  # g0 oldest ... g3 newest
        paths.append(path)
    removed = onnx_backend.prune_cache(tmp_path, 2500, keep=paths[0])
    assert sorted(removed) == [paths[1], paths[2]]
    assert sorted(tmp_path.glob("*.onnx")) == [paths[0], paths[3]]


def test_exports_beyond_the_cache_limit_remove_older_graphs(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(onnx_backend.CACHE_LIMIT_ENV, "0.001")  # 1 kB: one graph at most
    fast = Restorer(_tiny(), device="cpu", tile=128, backend="onnx")
    first = fast.restore(_frame((64, 48)))
    second = fast.restore(_frame((64, 80)))
    assert np.isfinite(first).all() and np.isfinite(second).all()
    graphs = list(cache.glob("*.onnx"))
    assert len(graphs) == 1 and "1x1x96x112" in graphs[0].name  # the newest stays


def test_a_bad_cache_limit_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(onnx_backend.CACHE_LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match="CTIRF_ONNX_CACHE_MB='lots' is not a size"):
        OnnxBackbone(_tiny())
