"""Data-parallel training over several GPUs, CPU processes or nodes, launched by torchrun.

    torchrun --nproc-per-node N -m ctirf_live.training [train|finetune|distill] OPTIONS

Every process (rank) runs the same trainer (`trainer._Run`) inside `session()`, which
joins torchrun's process group (NCCL on CUDA, gloo on CPU) and makes the run
data-parallel:

- the model is wrapped in `DistributedDataParallel`: gradients are averaged over the
  ranks every step, so all ranks hold the same weights after each step;
- a `DistributedSampler` (re-seeded with `set_epoch` every epoch) gives each rank its own
  share of the epoch's crops. Crops are drawn per (seed, epoch, index), so an epoch covers
  the same crops as on one process. `--batch-size` is per process: the effective batch is
  N times larger with the same learning rate (pass a smaller batch or lr to keep the
  one-process recipe);
- BatchNorm: on CUDA the model's BatchNorm layers become `SyncBatchNorm` (statistics over
  the global batch). torch has no SyncBatchNorm for CPU tensors, so on gloo each rank
  normalises with its own batch statistics, and rank 0's running statistics are
  broadcast to every rank before each forward pass (DDP's `broadcast_buffers`) and before
  validation, so checkpoints and all ranks hold rank 0's;
- rank 0 alone writes the run folder (checkpoints, resume state, metrics, logs) and
  prints progress; validation pairs are split over the ranks and their sums all-reduced;
  training loss terms are averaged over the ranks;
- resuming: every rank reads the resume state from the run folder, which must therefore
  be on a filesystem that every node sees (the usual cluster setup); ranks that find
  different states stop with an error instead of training apart. The number of
  processes is part of the run's fingerprint (it changes the steps per epoch), so a run
  resumes only with the same N.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from ctirf_live.models.device import select_device

_ACTIVE: DataParallel | None = None


class DistributedError(ValueError):
    """The ranks of a distributed run disagree; the message says what to do."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    def device(self, requested: str | torch.device = "auto") -> torch.device:
        """The device of this rank: `cuda:LOCAL_RANK` for auto/cuda on a GPU machine."""
        if str(requested) in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return select_device(requested)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """`model` (already on `device`) as DDP; BatchNorm becomes SyncBatchNorm on CUDA."""
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index], output_device=device.index
            )
        return nn.parallel.DistributedDataParallel(model)

    def sampler(self, dataset: Dataset, seed: int, epoch: int) -> DistributedSampler:
        """This rank's shuffled share of an epoch (same permutation on every rank)."""
        sampler = DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        return sampler

    def share(self, n: int) -> int:
        """Samples per rank and epoch for `n` (DistributedSampler pads to equal shares)."""
        return math.ceil(n / self.world_size)

    def shard(self, n: int) -> list[int]:
        """This rank's indices of `n` validation items (no padding: every item once)."""
        return list(range(self.rank, n, self.world_size))

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Each value averaged over the ranks (the same keys on every rank)."""
        keys = sorted(values)
        sums = self.sum([values[k] for k in keys], device)
        return {k: s / self.world_size for k, s in zip(keys, sums, strict=True)}

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def agree(self, value: int, what: str, device: torch.device) -> None:
        """Raise `DistributedError` unless `value` is the same on every rank."""
        t = torch.tensor([value, -value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise DistributedError(
                f"the ranks found different {what} (from {-int(t[1])} to {int(t[0])}); put the "
                "run folder on a filesystem every node shares, or start over with --no-resume"
            )

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def active() -> DataParallel | None:
    """The data-parallel run this process takes part in, if `session()` started one."""
    return _ACTIVE


def is_main_process() -> bool:
    """True outside a distributed run and on rank 0 of one."""
    return _ACTIVE is None or _ACTIVE.is_main


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        message = f"{name}={value!r} is not an integer; launch with torchrun"
        raise DistributedError(message) from None


@contextlib.contextmanager
def session(backend: str | None = None) -> Iterator[DataParallel | None]:
    """Join torchrun's process group for the duration (nothing when WORLD_SIZE <= 1).

    `backend` defaults to NCCL when CUDA is available, else gloo. Training started
    inside the block is data-parallel (see the module docstring).
    """
    global _ACTIVE
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield None
        return
    if _ACTIVE is not None:
        raise DistributedError("a distributed session is already running in this process")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedError(
                f"WORLD_SIZE is {world} but {name} is not set; launch with "
                "`torchrun --nproc-per-node N -m ctirf_live.training ...`"
            )
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    _ACTIVE = DataParallel(rank, world, local)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = None
        dist.destroy_process_group()
