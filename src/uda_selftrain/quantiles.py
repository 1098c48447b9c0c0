"""Exact per-group quantiles on the device, without sorting: a two-level radix select.

For non-negative float32 values the IEEE-754 bit pattern, read as an integer, is ordered like the
value. A value in ``[0, 1]`` therefore has a 30-bit integer key; its upper 15 bits pick one of
32 768 coarse bins and its lower 15 bits one of 32 768 fine bins inside. One ``bincount`` per level
locates the k-th smallest value of every group at once, so the cost is a few linear passes over the
values whatever the number of groups: no sort, no per-group loop and no host synchronisation.

The result is **exact** (bit-identical to sorting the float32 values) because every float32 value
has its own key. Histograms are integer counts, so with a process group they are summed across
ranks and every rank obtains the quantile of the union of the ranks' values, identical everywhere.
"""

from __future__ import annotations

import torch

from .distributed import all_reduce_sum

__all__ = ["grouped_quantile"]

_BITS = 15
_BINS = 1 << _BITS
_LOW_MASK = _BINS - 1


def _keys(values: torch.Tensor) -> torch.Tensor:
    v = values.to(torch.float32)
    if not v.is_contiguous():
        v = v.contiguous()
    return v.view(torch.int32)


def _counts(index: torch.Tensor, size: int, extra: torch.Tensor | None, sync: bool) -> torch.Tensor:
    """``bincount`` of ``index`` into ``size`` bins (indices ``≥ size`` dropped), rank-summed."""
    counts = torch.bincount(index, minlength=size)[:size]
    if sync:
        counts = all_reduce_sum(counts)
    if extra is not None:
        # Added after the reduction: the extra samples are shared state, counted once, not per rank.
        counts = counts + torch.bincount(extra, minlength=size)[:size]
    return counts


def _locate(cum: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each row holding its ``rank``-th (0-based) element, and the rank inside that bin.

    ``cum`` is the row-wise cumulative histogram.
    """
    bins = (cum <= rank[:, None]).sum(1).clamp_(max=_BINS - 1)
    prev = cum.gather(1, (bins - 1).clamp(min=0)[:, None])[:, 0]
    return bins, rank - torch.where(bins > 0, prev, torch.zeros_like(prev))


def _order_statistics(
    keys: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    rank_a: torch.Tensor,
    rank_b: torch.Tensor,
    extra_keys: torch.Tensor | None,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the ``rank_a``-th and ``rank_b``-th smallest element of every group.

    Two ``bincount`` passes. The code keeps the number of full-size temporaries small and works
    in place where it can: on a CPU this kernel is bound by memory bandwidth.
    """
    size = num_groups * _BINS
    ar = torch.arange(num_groups, device=keys.device, dtype=torch.int32)

    # Level 1: coarse bin = the upper 15 bits. Out-of-range values land in the edge bins.
    hi = (keys >> _BITS).clamp_(0, _BINS - 1)
    index = groups * _BINS
    index.add_(hi)
    extra_hi = extra_keys >> _BITS if extra_keys is not None else None
    extra_index = ar * _BINS + extra_hi if extra_hi is not None else None
    coarse = _counts(index, size, extra_index, sync).view(num_groups, _BINS).cumsum(1)
    bin_a, inner_a = _locate(coarse, rank_a)
    bin_b, inner_b = _locate(coarse, rank_b)
    same = bin_b == bin_a

    # Level 2, one pass: fine histograms of the elements of bin_a (slot a) and, when it differs,
    # of bin_b (slot b). Layout: bin 0 collects every other element; slot a starts at 1, slot b
    # at 1 + size. A lookup table over the level-1 index gives each element its slot offset.
    table = torch.zeros(size, dtype=torch.int32, device=keys.device)
    table[ar * _BINS + bin_a.to(torch.int32)] = 1
    table[(ar * _BINS + bin_b.to(torch.int32))[~same]] = 1 + size
    offset = table.index_select(0, index)  # int32 indices: no widening copy
    dump = offset == 0
    index.sub_(hi).add_(keys & _LOW_MASK).add_(offset).masked_fill_(dump, 0)
    if extra_keys is not None:
        extra_offset = table.index_select(0, extra_index)
        extra_index = torch.where(
            extra_offset == 0, 0, ar * _BINS + (extra_keys & _LOW_MASK) + extra_offset
        )
    fine = _counts(index, 1 + 2 * size, extra_index, sync)[1:].view(2, num_groups, _BINS).cumsum(2)
    fine_a, _ = _locate(fine[0], inner_a)
    fine_b_same, _ = _locate(fine[0], inner_b)
    fine_b_other, _ = _locate(fine[1], inner_b)
    fine_b = torch.where(same, fine_b_same, fine_b_other)
    return (bin_a << _BITS) | fine_a, (bin_b << _BITS) | fine_b


def grouped_quantile(
    values: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    q: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    sync: bool = False,
) -> torch.Tensor:
    """Per-group quantile with linear interpolation (numpy's default method), exact.

    For a group of ``n`` sorted values ``x_0 ≤ … ≤ x_{n-1}``, ``h = q (n − 1)`` and the result is
    ``x_⌊h⌋ + (h − ⌊h⌋)(x_{⌊h⌋+1} − x_⌊h⌋)``, as ``numpy.quantile`` computes it.

    Args:
        values: ``(M,)`` floating values in ``[0, 1]`` (confidences; clamped into that range).
        groups: ``(M,)`` integer group of each value, in ``[0, num_groups)`` (not checked here:
            this is an internal kernel; the public callers guarantee it).
        num_groups: ``G``.
        q: ``(G,)`` quantile level of each group, in ``[0, 1]``.
        extra: optional ``(G,)`` values in ``[0, 1]``, one extra sample per group (IAS adds the
            previous threshold).
        counts: optional ``(G,)`` number of values per group, if the caller already has it.
        sync: take the quantile of the union of all ranks' values (histograms all-reduced).

    Returns:
        ``(G,)`` float32 quantiles; ``NaN`` for a group with no value.

    >>> import torch
    >>> v = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.5])
    >>> g = torch.tensor([0, 0, 0, 1, 1])
    >>> grouped_quantile(v, g, 2, torch.tensor([0.5, 0.25]))
    tensor([0.2000, 0.6000])
    """
    g = groups.reshape(-1).to(torch.int32)
    if counts is None:
        counts = torch.bincount(g, minlength=num_groups)[:num_groups]
        if sync:
            counts = all_reduce_sum(counts)
    n = counts.to(torch.int64) + (1 if extra is not None else 0)
    last = (n - 1).clamp(min=0)
    h = q.to(torch.float64).clamp(0.0, 1.0) * last.to(torch.float64)
    low = h.floor()
    frac = (h - low).to(torch.float32)
    low = low.to(torch.int64)
    high = torch.minimum(low + 1, last)
    extra_keys = _keys(extra.reshape(-1)) if extra is not None else None
    key_a, key_b = _order_statistics(
        _keys(values.reshape(-1)), g, num_groups, low, high, extra_keys, sync
    )
    x0 = key_a.to(torch.int32).view(torch.float32)
    x1 = key_b.to(torch.int32).view(torch.float32)
    out = x0 + frac * (x1 - x0)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))
