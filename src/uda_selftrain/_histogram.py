"""Histograms of integer codes into a known number of bins, without a host synchronisation.

``torch.bincount`` sizes its output from the data: on CUDA it reads ``index.max()`` back to the
host before it can allocate, which stalls the stream on every call (and cannot be captured in a
CUDA graph). Every caller in this library knows the number of bins in advance, so on an
accelerator the histogram is a zeroed tensor plus one ``index_add_`` (int32 atomics for counts,
native float atomics for sums). On a CPU there is nothing to stall, and ``bincount``'s sequential
loop is the fastest kernel, so it is used there.

Indices must lie in ``[0, size)``: callers guarantee it (an out-of-range index is a device-side
error on the ``index_add_`` path).
"""

from __future__ import annotations

import torch

_INT32_MAX = 2**31 - 1
# Tests set this to run the accelerator form on a CPU.
_FORCE_SYNC_FREE = False


def count(index: torch.Tensor, size: int, *, sync_free: bool | None = None) -> torch.Tensor:
    """``(size,)`` int64 number of occurrences of each value of the 1-D integer ``index``.

    ``sync_free`` forces the ``index_add_`` form (default: on every non-CPU device).

    >>> count(torch.tensor([0, 2, 2]), 4)
    tensor([1, 0, 2, 0])
    >>> count(torch.tensor([0, 2, 2]), 4, sync_free=True)
    tensor([1, 0, 2, 0])
    """
    if sync_free is None:
        sync_free = _FORCE_SYNC_FREE or index.device.type != "cpu"
    if not sync_free:
        return torch.bincount(index, minlength=size)[:size]
    # int32 atomics are native on GPUs (int64 ones may be emulated); exact while no bin can
    # exceed 2^31 − 1, which needs at least that many elements.
    dtype = torch.int32 if index.numel() <= _INT32_MAX else torch.int64
    out = torch.zeros(size, dtype=dtype, device=index.device)
    out.index_add_(0, index, torch.ones(index.numel(), dtype=dtype, device=index.device))
    return out.long()


def weighted_sum(
    index: torch.Tensor, weights: torch.Tensor, size: int, *, sync_free: bool | None = None
) -> torch.Tensor:
    """``(size,)`` sum of ``weights`` per value of ``index``, in ``weights``' dtype.

    On a CPU, float32 weights accumulate in float32 and anything else in float64 (``bincount``'s
    rule); on other devices in the dtype of ``weights``.

    >>> weighted_sum(torch.tensor([1, 1, 0]), torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64), 3)
    tensor([1.0000, 0.7500, 0.0000], dtype=torch.float64)
    """
    if sync_free is None:
        sync_free = _FORCE_SYNC_FREE or index.device.type != "cpu"
    if not sync_free:
        out = torch.bincount(index, weights=weights, minlength=size)[:size]
        # bincount returns int64 for an empty input even with floating weights.
        return out.to(torch.float32 if weights.dtype == torch.float32 else torch.float64)
    out = torch.zeros(size, dtype=weights.dtype, device=index.device)
    return out.index_add_(0, index, weights)
