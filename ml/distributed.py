"""Data-parallel training across processes with torch.distributed.

One model is trained by several processes (ranks), each on a deterministic contiguous shard of
every lane group's lanes (the batch dimension); `ml.trainer.Trainer` wraps the model and its
loss in DistributedDataParallel when a process group of more than one rank is initialized, and
weights each rank's loss so the averaged gradient is the single-process one (see the trainer).

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT:

    torchrun --nproc-per-node 2 -m pipelines.train_sequences --folds 2024 --models mamba2

`init_from_env` joins the group (env://): gloo for CPU tensors, NCCL for CUDA tensors, and
each rank on cuda:LOCAL_RANK. Without WORLD_SIZE > 1 nothing is initialized and training runs
in one process as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (env:// rendezvous).

    Returns the single-process DistInfo without WORLD_SIZE > 1. The default backend is
    "cpu:gloo,cuda:nccl" when CUDA is present (collectives of CPU tensors, such as the
    checkpoint's objects, on gloo; gradients on NCCL), else "gloo". With CUDA each rank's
    current device becomes cuda:LOCAL_RANK, so `torch.device("cuda")` means that GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local} has no GPU: this host has {torch.cuda.device_count()}; "
                f"start at most that many processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        chosen = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(chosen, init_method="env://", rank=rank, world_size=size)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def lane_bounds(
    n_lanes: int, rank: int, world_size: int, what: str = "lane group", allow_empty: bool = False
) -> tuple[int, int]:
    """Rank `rank`'s contiguous lanes [lo, hi) of `n_lanes`: the first n_lanes % world_size
    ranks take one lane more, so the shards in rank order are exactly the whole batch."""
    if n_lanes < world_size and not allow_empty:
        raise ValueError(
            f"{what} has {n_lanes} lane(s), fewer than the {world_size} ranks: every rank needs "
            f"at least one lane of every training group; start at most {n_lanes} processes "
            f"(torchrun --nproc-per-node {max(1, n_lanes)}) or train in one process"
        )
    base, extra = divmod(n_lanes, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects; CPU tensors)."""
    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
