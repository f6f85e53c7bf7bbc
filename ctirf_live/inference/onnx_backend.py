"""ONNX Runtime for the backbone on the CPU, exported once per checkpoint and tile shape.

On two CPU cores ONNX Runtime ran the S0 backbone about twice as fast as eager torch
(see benchmarks/RESULTS.md). `OnnxBackbone.maps(x)` returns the backbone's `g` and `b`
maps for a normalised input batch; the PSF convolution stays in torch (`ETNet.outputs`).

Each input shape gets its own graph (the attention windows are planned from the shape).
Graphs are cached in `CTIRF_CACHE_DIR` (default: the user cache dir, e.g.
`~/.cache/ctirf-live`) under `onnx/`, named by a hash of the backbone's weights and the
model code, so a retrained checkpoint or a changed network never meets a stale graph.
The cache is kept under `CTIRF_ONNX_CACHE_MB` megabytes (default 1024): after each export
the least recently used graphs beyond it are deleted (a fine-tuning run scored every epoch
exports one ~28 MB S0 graph per epoch; unbounded, one afternoon filled 2.3 GB).
A new graph is verified against eager torch before it is kept: if the largest
difference exceeds `TOLERANCE` of the output range, the graph is discarded, a one-line
warning is logged and that shape runs in torch. Export problems (a 3D model the exporter
cannot trace, an unwritable cache) fall back the same way, with the reason logged.

ONNX Runtime keeps its own thread pool, sized when a session is made from
`torch.get_num_threads()` (so the live worker's thread policy applies to it too), and
its threads sleep instead of spinning between calls, leaving the cores to acquisition.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctirf_live.models import evit_unet, layers, onnx_export
from ctirf_live.models.etnet import ETNet
from ctirf_live.models.onnx_export import INPUT_NAME, INSTALL_HINT, export_backbone_onnx

log = logging.getLogger(__name__)

CACHE_ENV = "CTIRF_CACHE_DIR"
CACHE_LIMIT_ENV = "CTIRF_ONNX_CACHE_MB"
DEFAULT_CACHE_MB = 1024.0
TOLERANCE = 1e-4  # max |onnx - eager| relative to the eager output's range


def onnxruntime_available() -> bool:
    """Whether the ONNX Runtime package can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    """Where exported graphs are kept: `$CTIRF_CACHE_DIR/onnx` or the user cache dir."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "onnx"
    import platformdirs

    return Path(platformdirs.user_cache_dir("ctirf-live", appauthor=False)) / "onnx"


def cache_limit_bytes() -> int:
    """The most bytes of graphs the cache keeps (`CTIRF_ONNX_CACHE_MB`, default 1024)."""
    raw = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    if not raw:
        return int(DEFAULT_CACHE_MB * 2**20)
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(
            f"{CACHE_LIMIT_ENV}={raw!r} is not a size; set it to megabytes (e.g. 1024), "
            "or unset it for the default"
        )
    return int(megabytes * 2**20)


def prune_cache(folder: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used graphs in `folder` beyond `limit` bytes (never
    `keep`); returns what was deleted. Graphs in use are safe: sessions hold them in memory."""
    entries = []
    for path in folder.glob("*.onnx"):
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    entries.sort(key=lambda e: (e[2] != keep, -e[0]))  # `keep` first, then newest
    total, removed = 0, []
    for _, size, path in entries:
        if path == keep or total + size <= limit:
            total += size
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    if removed:
        log.info("ONNX cache over %d MB: removed %d old graph(s)", limit // 2**20, len(removed))
    return removed


def model_key(model: ETNet) -> str:
    """Hash of the backbone's weights, its architecture and the code that builds the graph."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(model.arch_config()).encode())
    for module in (evit_unet, layers, onnx_export):
        h.update(inspect.getsource(module).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:20]


class OnnxBackbone:
    """The backbone of one ETNet in ONNX Runtime, one verified graph per input shape."""

    def __init__(
        self, model: ETNet, *, cache: Path | None = None, tolerance: float = TOLERANCE
    ) -> None:
        if not onnxruntime_available():
            raise ValueError(f"the onnx backend needs ONNX Runtime: {INSTALL_HINT}")
        self.model = model
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.tolerance = float(tolerance)
        self.key = model_key(model)
        self.cache_limit = cache_limit_bytes()
        self.errors: dict[tuple[int, ...], float] = {}  # verification error per shape
        self._sessions: dict[tuple[tuple[int, ...], int], Any] = {}
        self._refused: dict[tuple[int, ...], str] = {}

    def path_for(self, shape: tuple[int, ...]) -> Path:
        """The cached graph for a full input shape `(B, 1, [Z,] Y, X)`."""
        dims = "x".join(str(s) for s in shape)
        return self.cache / f"{self.model.name.lower()}_{self.key}_{dims}.onnx"

    def refused(self, shape: tuple[int, ...]) -> str | None:
        """Why `shape` runs in torch instead (None while ONNX serves it)."""
        return self._refused.get(tuple(shape))

    def maps(self, x: torch.Tensor) -> torch.Tensor | None:
        """`(B, 2, ...)` maps (g, b) for a normalised CPU float32 batch; None: use torch."""
        shape = tuple(int(s) for s in x.shape)
        if shape in self._refused:
            return None
        session = self._session(shape)
        if session is None:
            return None
        arr = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {INPUT_NAME: arr})[0])

    # -- internals --------------------------------------------------------------------

    def _session(self, shape: tuple[int, ...]) -> Any:
        threads = max(1, torch.get_num_threads())
        found = self._sessions.get((shape, threads))
        if found is not None:
            return found
        path = self.path_for(shape)
        try:
            session = self._open(path, threads) if path.exists() else None
            if session is not None:
                _touch(path)  # recently used: pruning removes the oldest first
        except Exception as exc:  # a truncated or foreign file: export it again
            log.warning("cached ONNX graph %s is unreadable (%s); exporting again", path, exc)
            path.unlink(missing_ok=True)
            session = None
        if session is None:
            session = self._export(shape, path, threads)
        if session is not None:
            self._sessions[(shape, threads)] = session
        return session

    @staticmethod
    def _open(path: Path, threads: int) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _export(self, shape: tuple[int, ...], path: Path, threads: int) -> Any:
        """Export, verify against eager torch, keep the graph only if it matches."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            try:
                export_backbone_onnx(self.model, tmp, shape[2:], batch=shape[0])
                session = self._open(tmp, threads)
                error = self._verify(session, shape)
                self.errors[shape] = error
                if error > self.tolerance:
                    return self._refuse(
                        shape,
                        f"ONNX graph differs from torch by {error:.1e} of the output range "
                        f"(limit {self.tolerance:.0e})",
                    )
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            prune_cache(path.parent, self.cache_limit, keep=path)
        except Exception as exc:
            return self._refuse(shape, f"ONNX export failed: {type(exc).__name__}: {exc}")
        log.info("exported %s (max difference %.1e of range)", path.name, error)
        return session

    def _verify(self, session: Any, shape: tuple[int, ...]) -> float:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(shape, generator=gen)
        with torch.inference_mode():
            raw = self.model.backbone(x)
            ref = torch.nn.functional.softplus(raw).numpy()
        out = session.run(None, {INPUT_NAME: x.numpy()})[0]
        span = float(ref.max() - ref.min()) or 1.0
        return float(np.abs(out - ref).max()) / span

    def _refuse(self, shape: tuple[int, ...], reason: str) -> None:
        self._refused[shape] = reason
        log.warning("%s for input %s: running %s in torch", reason, shape, self.model.name)
        return None


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
