"""Rank-aware reductions used by the stateful primitives.

Every helper is a no-op when ``torch.distributed`` is unavailable or no process group is
initialised, so single-process code pays nothing. With a process group, state that must agree on
every rank (selector thresholds, class values, confusion matrices) is reduced through these helpers:
each rank then holds exactly what one process would compute on the union of the ranks' data.

>>> import torch
>>> from uda_selftrain.distributed import all_reduce_sum, world_size
>>> world_size()
1
>>> all_reduce_sum(torch.ones(3))
tensor([1., 1., 1.])
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "barrier",
    "broadcast_",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0: the one writer of shared files."""
    return rank() == 0


def _reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not is_distributed():
        return tensor
    # Reduce a contiguous copy so that callers may pass views and keep their inputs unchanged.
    out = tensor.contiguous().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (returned as a new tensor; the input is left unchanged)."""
    return _reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum over ranks."""
    return _reduce(tensor, dist.ReduceOp.MIN)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks."""
    return _reduce(tensor, dist.ReduceOp.MAX)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s value (no-op without a process group)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()
