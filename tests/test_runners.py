"""The live runners' device code (run on the CPU where it can), and the worker's threads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import useq

from ctirf_live.config import Optics
from ctirf_live.inference.live import LiveProcessor, worker_threads
from ctirf_live.inference.restorer import EDGE_PAD, Restorer
from ctirf_live.inference.runners import CpuRunner, _percentile, make_runner, restore_tensor
from ctirf_live.models.etnet import ET2dNet

cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only: pinned uploads, streams, GPU checks"
)


@pytest.fixture(scope="module")
def tiny() -> ET2dNet:
    torch.manual_seed(0)
    return ET2dNet(Optics(), "tiny").eval()


def _frame(shape=(96, 80), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.poisson(300, size=shape).astype(np.uint16)
    img[40:46, 10:70] += 4000
    return img


@pytest.mark.parametrize("kind", ["uint16", "uint8", "float32"])
def test_device_percentile_matches_numpy(kind: str) -> None:
    rng = np.random.default_rng(1)
    if kind == "uint16":
        arr = rng.poisson(300, (97, 131)).astype(np.uint16)
        arr[:2] = 65535
    elif kind == "uint8":
        arr = rng.integers(0, 256, (50, 61), dtype=np.uint8)
    else:
        arr = (rng.random((97, 131)) * 1000).astype(np.float32)
    for q in (0.0, 50.0, 98.0, 99.9, 100.0):
        got = float(_percentile(torch.from_numpy(arr), q))
        assert got == pytest.approx(float(np.percentile(arr, q)), rel=1e-6), (kind, q)


def test_frame_that_fits_the_tile_runs_in_one_pass(tiny) -> None:
    r = Restorer(tiny, device="cpu", tile=512, backend="torch")
    assert len(r.plan((512 + 2 * EDGE_PAD,) * 2)) == 1  # padding does not make 4 tiles
    assert len(r.plan((1024 + 2 * EDGE_PAD,) * 2)) > 1
    whole = Restorer(tiny, device="cpu", tile=512, backend="torch", whole_frame=True)
    assert len(whole.plan((2048 + 2 * EDGE_PAD,) * 2)) == 1


@pytest.mark.parametrize("whole_frame", [False, True])
def test_device_path_equals_restorer(tiny, whole_frame: bool) -> None:
    """The GPU path's code (`restore_tensor`, uint16 in) gives `Restorer.restore`'s result,
    tiled or in one whole-frame pass."""
    r = Restorer(tiny, device="cpu", tile=64, overlap=16, backend="torch", whole_frame=whole_frame)
    frame = _frame()
    assert (len(r.plan((96 + 32, 80 + 32))) == 1) is whole_frame
    host = r.restore(frame)
    device = restore_tensor(r, torch.from_numpy(frame)).numpy()
    np.testing.assert_allclose(device, host, rtol=1e-5, atol=1e-5 * host.max())


def test_whole_frame_and_tiles_agree(tiny) -> None:
    frame = _frame((160, 160), seed=2)
    tiled = Restorer(tiny, device="cpu", tile=64, overlap=32, backend="torch").restore(frame)
    whole = Restorer(tiny, device="cpu", whole_frame=True, backend="torch").restore(frame)
    assert np.abs(tiled - whole).max() / whole.max() < 0.02


def test_worker_threads_leave_a_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert worker_threads() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert worker_threads() == 1
    assert worker_threads(2) == 2
    with pytest.raises(ValueError, match="at least 1"):
        worker_threads(0)


class _Probe:
    """A restorer that records the torch thread count it runs with."""

    def __init__(self, restorer: Restorer) -> None:
        self._r, self.seen = restorer, []

    def __getattr__(self, name: str):
        return getattr(self._r, name)

    def restore(self, image: np.ndarray) -> np.ndarray:
        self.seen.append(torch.get_num_threads())
        return self._r.restore(image)


def test_live_worker_runs_with_its_thread_count(tiny) -> None:
    probe = _Probe(Restorer(tiny, device="cpu", tile=128, backend="torch"))
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": 3})
    before = torch.get_num_threads()
    try:
        processor = LiveProcessor(
            probe,  # type: ignore[arg-type]
            policy="record",
            threads=1,
            warmup=False,
            consistency=False,
        )
        assert isinstance(processor._runner, CpuRunner)
        with processor:
            processor.sequenceStarted(seq, {"image_infos": [{"height": 64, "width": 64}]})
            for i, event in enumerate(seq):
                processor.frameReady(_frame((64, 64), seed=i), event, {})
            processor.sequenceFinished(seq)
            assert processor.wait_until_idle(120)
    finally:
        torch.set_num_threads(before)
    assert probe.seen == [1, 1, 1]
    assert processor.stats.processed == 3


@cuda_only
def test_cuda_runner_matches_cpu_and_checks_on_the_device(tiny) -> None:
    r = Restorer(tiny, device="cuda", tile=64, overlap=16, half=False)
    runner = make_runner(r)
    assert runner.pipelined and runner.checks_finite
    frame = _frame()
    out = runner.finish(runner.launch(runner.stage(frame)))
    ref = Restorer(tiny, device="cpu", tile=64, overlap=16, whole_frame=True).restore(frame)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * ref.max())
    bad = frame.astype(np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        runner.finish(runner.launch(runner.stage(bad)))


@pytest.mark.slow
def test_compiled_backbone_matches_eager(tiny) -> None:
    """torch.compile with static shapes (CUDA graphs on a GPU); minutes on a CPU."""
    frame = _frame((64, 64))
    eager = Restorer(tiny, device="cpu", backend="torch").restore(frame)
    compiled = Restorer(tiny, device="cpu", backend="torch", compile=True).restore(frame)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-4 * eager.max())
