"""Overlapping tiles with smooth blending, so large frames restore without seams.

A frame is split into tiles of `tile` pixels that overlap by `overlap`; each tile's
result is weighted by a window that ramps up over the overlap, and the weighted sum is
divided by the summed weights. Wherever only one tile covers a pixel the division
returns that tile's value exactly, so the window's floor never biases the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class Tile:
    """A tile's slice of the frame (Y and X start/stop)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = max(tile - overlap, 1)
    starts = list(range(0, n - tile, step))
    starts.append(n - tile)
    return starts


def plan_tiles(shape: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """Tiles covering a (Y, X) frame; a frame no larger than `tile` is one tile."""
    ny, nx = shape
    if overlap >= tile:
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile size ({tile})")
    return [
        Tile(y, min(y + tile, ny), x, min(x + tile, nx))
        for y in _starts(ny, tile, overlap)
        for x in _starts(nx, tile, overlap)
    ]


def _ramp(n: int, overlap: int) -> np.ndarray:
    if overlap <= 0:
        return np.ones(n, np.float32)
    i = np.arange(n, dtype=np.float32)
    t = np.minimum(np.minimum((i + 0.5) / overlap, (n - i - 0.5) / overlap), 1.0)
    # sin^2 ramp: a tile's outermost pixels, where the network sees the cut, count least
    ramp = np.sin(0.5 * np.pi * t) ** 2
    return np.maximum(ramp, MIN_WEIGHT).astype(np.float32)


def blend_window(shape: tuple[int, int], overlap: int) -> np.ndarray:
    """Separable weight window for one tile."""
    return np.outer(_ramp(shape[0], overlap), _ramp(shape[1], overlap))


class Blender:
    """Accumulates weighted tile results into a frame (any leading axes, e.g. Z)."""

    def __init__(self, shape: tuple[int, ...], overlap: int) -> None:
        self.overlap = overlap
        self.acc = np.zeros(shape, np.float32)
        self.weight = np.zeros(shape[-2:], np.float32)

    def add(self, tile: Tile, result: np.ndarray) -> None:
        w = blend_window((tile.y1 - tile.y0, tile.x1 - tile.x0), self.overlap)
        ys, xs = tile.slices
        self.acc[..., ys, xs] += result * w
        self.weight[ys, xs] += w

    def result(self) -> np.ndarray:
        return self.acc / np.maximum(self.weight, MIN_WEIGHT * MIN_WEIGHT)


def iter_batches(items: list[Tile], size: int) -> Iterator[list[Tile]]:
    """Chunks of at most `size` tiles."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
