"""Where models run: one rule for training, inference and the live hook."""

from __future__ import annotations

import torch


def select_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; anything else is passed to torch."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
