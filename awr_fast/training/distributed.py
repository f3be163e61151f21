"""Data-parallel helpers: process-group setup from torchrun's environment, rank-0 gating, reductions.

``torchrun --nproc_per_node=N -m awr_fast.train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the group (``nccl`` on CUDA, ``gloo`` on the
CPU) and pins each process to ``cuda:LOCAL_RANK``. Without those variables everything here is a
no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_grads",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "cleanup",
    "init_distributed",
    "is_available",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``world_size == 1`` means not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_available() -> bool:
    return torch.distributed.is_available()


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (or the one already initialised).

    Args:
        device: the requested device ("auto", "cpu", "cuda", ...): ``nccl`` is used when it is a
            CUDA device and CUDA is available, ``gloo`` otherwise.
    """
    world = _env_world()
    if world <= 1 and not (is_available() and torch.distributed.is_initialized()):
        return DistInfo()
    if not is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this PyTorch build")
    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    backend = dist.get_backend()
    if use_cuda and backend == "nccl":
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=str(backend))


def cleanup(info: DistInfo) -> None:
    if info.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        torch.distributed.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of ``value`` over ranks (a copy; identity when not distributed)."""
    if not info.distributed:
        return value
    out = value.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out / info.world_size


def all_reduce_grads(params, info: DistInfo) -> None:
    """Average the gradients of ``params`` over ranks in place, in one flat all-reduce (what
    DistributedDataParallel does, for models trained without it); no-op when not distributed."""
    if not info.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (what DDP does at construction)."""
    if not info.distributed:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=src)


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` when not distributed)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
