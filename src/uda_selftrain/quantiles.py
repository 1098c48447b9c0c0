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


def _coarse(
    keys: torch.Tensor, groups: torch.Tensor, num_groups: int, sync: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Level-1 index (group · 2^15 + upper 15 bits) and its rank-summed ``(G, 2^15)`` histogram."""
    # Out-of-range values land in the edge bins.
    index = (keys >> _BITS).clamp_(0, _BINS - 1)
    index.add_(groups, alpha=_BINS)  # in place: hi + group · 2^15
    hist = torch.bincount(index, minlength=num_groups * _BINS)[: num_groups * _BINS]
    if sync:
        hist = all_reduce_sum(hist)
    return index, hist.view(num_groups, _BINS)


def _order_statistics(
    keys: torch.Tensor,
    index: torch.Tensor,
    coarse_hist: torch.Tensor,
    num_groups: int,
    rank_a: torch.Tensor,
    rank_b: torch.Tensor,
    extra_keys: torch.Tensor | None,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the ``rank_a``-th and ``rank_b``-th smallest element of every group.

    ``index`` and ``coarse_hist`` come from :func:`_coarse`. The code keeps the number of
    full-size passes small and works in place where it can: on a CPU this kernel is bound by
    memory bandwidth.
    """
    size = num_groups * _BINS
    ar = torch.arange(num_groups, device=keys.device, dtype=torch.int32)
    extra_index = ar * _BINS + (extra_keys >> _BITS) if extra_keys is not None else None
    coarse = coarse_hist.reshape(-1)
    if extra_index is not None:
        # Added after the reduction: the extra samples are shared state, counted once, not per rank.
        coarse = coarse + torch.bincount(extra_index, minlength=size)[:size]
    coarse = coarse.view(num_groups, _BINS).cumsum(1)
    bin_a, inner_a = _locate(coarse, rank_a)
    bin_b, inner_b = _locate(coarse, rank_b)
    same = bin_b == bin_a

    # Level 2, one pass: fine histograms of the elements of bin_a (slot a) and, when it differs,
    # of bin_b (slot b). Layout: bin 0 collects every other element; slot a of group g starts at
    # 1 + g · 2^15, slot b at 1 + size + g · 2^15. A lookup table over the level-1 index gives
    # each element its slot base, or −2^15 for "elsewhere", so base + lower bits < 0 → bin 0.
    table = torch.full((size,), -_BINS, dtype=torch.int32, device=keys.device)
    base = ar * _BINS + 1
    table[ar * _BINS + bin_a.to(torch.int32)] = base
    table[(ar * _BINS + bin_b.to(torch.int32))[~same]] = (base + size)[~same]
    fine_index = table.index_select(0, index)  # int32 indices: no widening copy
    # The level-1 index is no longer needed: its buffer takes the lower bits (no new allocation).
    fine_index.add_(torch.bitwise_and(keys, _LOW_MASK, out=index)).clamp_(min=0)
    if extra_keys is not None:
        extra_index = (table.index_select(0, extra_index) + (extra_keys & _LOW_MASK)).clamp_(min=0)
    fine = _counts(fine_index, 1 + 2 * size, extra_index, sync)[1:].view(2, num_groups, _BINS)
    fine = fine.cumsum(2)
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
        counts: ignored (kept for compatibility: the counts are read off the level-1 histogram).
        sync: take the quantile of the union of all ranks' values (histograms all-reduced).

    Returns:
        ``(G,)`` float32 quantiles; ``NaN`` for a group with no value.

    >>> import torch
    >>> v = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.5])
    >>> g = torch.tensor([0, 0, 0, 1, 1])
    >>> grouped_quantile(v, g, 2, torch.tensor([0.5, 0.25]))
    tensor([0.2000, 0.6000])
    """
    return _grouped_quantile(values, groups, num_groups, q, extra=extra, sync=sync)[0]


def _grouped_quantile(
    values: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    q: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    sync: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grouped_quantile` and the ``(G,)`` int64 number of values per group (rank-summed,
    without the extra samples), read off the level-1 histogram instead of a separate pass."""
    g = groups.reshape(-1).to(torch.int32)
    keys = _keys(values.reshape(-1))
    index, coarse_hist = _coarse(keys, g, num_groups, sync)
    counts = coarse_hist.sum(1)
    n = counts + (1 if extra is not None else 0)
    last = (n - 1).clamp(min=0)
    h = q.to(torch.float64).clamp(0.0, 1.0) * last.to(torch.float64)
    low = h.floor()
    frac = (h - low).to(torch.float32)
    low = low.to(torch.int64)
    high = torch.minimum(low + 1, last)
    extra_keys = _keys(extra.reshape(-1)) if extra is not None else None
    key_a, key_b = _order_statistics(
        keys, index, coarse_hist, num_groups, low, high, extra_keys, sync
    )
    x0 = key_a.to(torch.int32).view(torch.float32)
    x1 = key_b.to(torch.int32).view(torch.float32)
    out = x0 + frac * (x1 - x0)
    return torch.where(n > 0, out, torch.full_like(out, float("nan"))), counts
