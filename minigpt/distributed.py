"""Running as one of several processes under ``torchrun``: PyTorch's own distributed stack, nothing more.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK for every process it starts; ``start`` joins the
process group they describe (gloo on the CPU, nccl on GPUs). A plain ``python`` run is world size 1
and needs none of it. Harvest and training both go through here.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch

# A rank may wait for slower ranks for this long (torch.distributed's default is 30 minutes).
WAIT_FOR_OTHER_RANKS = datetime.timedelta(days=7)


def start(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether this call started torch.distributed), from torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    import torch.distributed as dist

    started = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=WAIT_FOR_OTHER_RANKS)
        started = True
    return dist.get_rank(), dist.get_world_size(), started


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """``with process_group(device) as (rank, world):`` joins torchrun's group, and leaves it if it joined."""
    rank, world, started = start(device)
    try:
        yield rank, world
    finally:
        if started:
            torch.distributed.destroy_process_group()


def gather(value, world: int) -> list:
    """``value`` of every rank, in rank order (a barrier too)."""
    if world == 1:
        return [value]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def local_device(device: str) -> str:
    """Under torchrun, ``cuda`` means this process's own GPU, ``cuda:LOCAL_RANK``."""
    local_rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{local_rank}" if local_rank is not None and device == "cuda" else device
