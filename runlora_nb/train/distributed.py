"""The engine on several processes: ranks from the launcher, a process group, DDP, data shards, agreement.

``torchrun --nproc-per-node N`` and ``accelerate launch`` both start N copies of the same program with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous address in the environment; :func:`join_process_group`
reads them and opens the process group (gloo on the CPU, NCCL on CUDA) the first time a run needs it. One
optimizer step then trains on a global batch of ``batch_size × world`` rows drawn exactly as one process with
that batch size draws them; rank r takes rows ``[r·b, (r+1)·b)``, DDP averages the gradients, and the loss an
event reports is the mean over ranks. Only rank 0 talks to listeners (progress, panels, the run ledger); every
rank keeps its own history. Stop is agreed between ranks each step, so no rank waits for a collective another
rank has left.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Ranks", "env_rank", "join_process_group", "shard", "sum_over_ranks", "wrap_ddp"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process run (``Ranks()``: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that talks to listeners and writes records."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if not value.isdigit():
        raise ValueError(
            f"train.distributed: {name}={value!r} is not a non-negative integer; unset it or fix the launcher"
        )
    return int(value)


def env_rank() -> Ranks:
    """The ranks a launcher put in the environment (no process group is opened)."""
    return Ranks(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def join_process_group(device: torch.device) -> tuple[Ranks, torch.device]:
    """Open the launcher's process group if there is one; returns the ranks and this rank's device.

    A single process (no ``WORLD_SIZE`` > 1) opens nothing. Under a launcher, a CUDA run trains on
    ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: ``WORLD_SIZE`` > 1 without the rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``) a launcher sets.
    """
    ranks = env_rank()
    if ranks.world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            raise ValueError(
                f"train.distributed: WORLD_SIZE={ranks.world} but no MASTER_ADDR/MASTER_PORT; start the job with "
                "torchrun --nproc-per-node N or accelerate launch, or unset WORLD_SIZE for one process"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), ranks.local_rank), device


def wrap_ddp(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """The module the training forward runs through: ``model`` itself alone, a DDP wrapper across ranks."""
    if ranks.world <= 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(batch: dict[str, torch.Tensor], ranks: Ranks) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (rows ``[r·b, (r+1)·b)`` with ``b = rows / world``)."""
    if ranks.world <= 1:
        return batch
    rows = len(next(iter(batch.values())))
    share = rows // ranks.world
    return {k: v[ranks.rank * share : (ranks.rank + 1) * share] for k, v in batch.items()}


def sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    """The elementwise sum of ``values`` over all ranks (the values themselves on one process)."""
    if ranks.world <= 1:
        return values
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return t.tolist()
