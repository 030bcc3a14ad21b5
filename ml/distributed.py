"""Data-parallel training across processes with torch.distributed.

One model is trained by several processes (ranks), each on a deterministic contiguous shard of
every lane group's lanes (the batch dimension); `ml.trainer.Trainer` wraps the model and its
loss in DistributedDataParallel when a process group of more than one rank is initialized, and
weights each rank's loss so the averaged gradient is the single-process one (see the trainer).

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT:

    torchrun --nproc-per-node 2 -m pipelines.train_sequences --folds 2024 --models mamba2

`init_from_env` joins the group (env://): gloo for CPU tensors, NCCL for CUDA tensors, and
each rank on cuda:LOCAL_RANK (a --device cpu run never touches CUDA). Without WORLD_SIZE > 1
nothing is initialized and training runs in one process as before.

Collectives wait up to MAMBACAST_DIST_TIMEOUT_S seconds (default 2 hours) for the slowest rank.
A step that can fail on one rank alone (rank 0's checkpoint and artifact writes) is followed by
`raise_if_any` / `agreed`, which raise RankFailed on every rank, so none is left waiting in a
collective for a rank that has failed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MAMBACAST_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 2 * 3600.0


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


def timeout_from_env() -> timedelta:
    """How long a collective may wait for the slowest rank: MAMBACAST_DIST_TIMEOUT_S seconds
    (default 2 hours). Generous on purpose: between seeds rank 0 alone predicts and writes
    (parquet, weights) while the other ranks wait in the next collective, and NCCL's own
    default (10 minutes) would kill a large job there."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init_from_env(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (env:// rendezvous), with
    the collectives' timeout of `timeout_from_env`.

    Returns the single-process DistInfo without WORLD_SIZE > 1. `device` is what the ranks
    train on: "cpu" never touches CUDA (gloo only); "cuda" needs a GPU per local rank and
    raises without one; None or "auto" (not known yet, as under Pipes, whose settings arrive
    after joining) means CUDA when present, and a rank without its GPU is refused later by
    `require_local_gpu`. With CUDA the default backend is "cpu:gloo,cuda:nccl" (collectives of
    CPU tensors, such as the checkpoint's objects, on gloo; gradients on NCCL), else "gloo";
    each rank's current device becomes cuda:LOCAL_RANK, so `torch.device("cuda")` means that
    GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    kind = None if device in (None, "auto") else torch.device(device).type
    cuda = kind == "cuda" or (kind is None and torch.cuda.is_available())
    if cuda:
        if kind == "cuda":
            require_local_gpu()
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    if not dist.is_initialized():
        chosen = backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
        dist.init_process_group(
            chosen, init_method="env://", rank=rank, world_size=size, timeout=timeout_from_env()
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def require_local_gpu() -> None:
    """Raise unless this host has a GPU for this process's LOCAL_RANK."""
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise RuntimeError(
            f"LOCAL_RANK {local} has no GPU: this host has {count}; start at most that many "
            f"processes per node (torchrun --nproc-per-node) or train with --device cpu"
        )


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


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank `dst`; None on the other ranks."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankFailed(RuntimeError):
    """Raised on every rank when some rank failed a step that `raise_if_any` agreed on (on the
    failing rank chained to its own error): no rank is left waiting in a later collective for
    one that has gone."""


def raise_if_any(error: BaseException | None, what: str = "a step") -> None:
    """A collective (every rank must call it at the same point): raise RankFailed on every rank
    if `error` is set on any; the message names each failing rank, what it failed and why.
    In one process, `error` itself is raised, as if nothing had caught it."""
    rank, size = world()
    if size == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else f"rank {rank} failed {what}: {type(error).__name__}: {error}"
    failures = [m for m in all_gather_objects(mine) if m is not None]
    if failures:
        raise RankFailed("; ".join(failures)) from error


@contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run the body (typically work of one rank, such as rank 0's writes), then agree: an error
    in it on any rank raises RankFailed on every rank (`raise_if_any`). A collective: every rank
    enters it at the same point, with an empty body where it has nothing to do; it is also a
    barrier, so the ranks leave it together."""
    error: Exception | None = None
    try:
        yield
    except RankFailed:
        raise  # agreed already, by a collective inside the body
    except Exception as e:
        error = e
    raise_if_any(error, what)
