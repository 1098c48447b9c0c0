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
    # -0.0 has the sign bit set; clamping maps it (and rounding noise below 0) to +0.0.
    if v.numel() and not v.is_contiguous():
        v = v.contiguous()
    return v.clamp(0.0, 1.0).view(torch.int32)


def _histogram(
    index: torch.Tensor, rows: int, extra: torch.Tensor | None, sync: bool
) -> torch.Tensor:
    size = rows * _BINS
    counts = torch.bincount(index, minlength=size + 1)[:size]
    if sync:
        counts = all_reduce_sum(counts)
    if extra is not None:
        # Added after the reduction: the extra samples are shared state, counted once, not per rank.
        counts = counts + torch.bincount(extra, minlength=size + 1)[:size]
    return counts.view(rows, _BINS)


def _locate(counts: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each row holding its ``rank``-th (0-based) element, and the rank inside that bin."""
    cum = counts.cumsum(1)
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
    """Keys of the ``rank_a``-th and ``rank_b``-th smallest element of every group (two passes)."""
    dump = 2 * num_groups * _BINS
    hi = keys >> _BITS
    ar = torch.arange(num_groups, device=keys.device, dtype=torch.int32)
    extra_hi = extra_keys >> _BITS if extra_keys is not None else None

    index = groups * _BINS + hi
    extra_index = ar * _BINS + extra_hi if extra_hi is not None else None
    coarse = _histogram(index, num_groups, extra_index, sync)
    bin_a, inner_a = _locate(coarse, rank_a)
    bin_b, inner_b = _locate(coarse, rank_b)

    # One pass fills two fine histograms: slot 0 for elements in bin_a, slot 1 for those in bin_b
    # when it differs (when it is the same bin, slot 0 already holds rank_b's element).
    bin_a32 = bin_a.to(torch.int32)
    bin_b32 = torch.where(bin_b == bin_a, -1, bin_b).to(torch.int32)
    low = keys & _LOW_MASK
    base = groups * _BINS + low
    index = torch.where(
        hi == bin_a32[groups],
        base,
        torch.where(hi == bin_b32[groups], base + num_groups * _BINS, dump),
    )
    if extra_keys is not None:
        extra_base = ar * _BINS + (extra_keys & _LOW_MASK)
        extra_index = torch.where(
            extra_hi == bin_a32,
            extra_base,
            torch.where(extra_hi == bin_b32, extra_base + num_groups * _BINS, dump),
        )
    fine = _histogram(index, 2 * num_groups, extra_index, sync)
    fine_a, _ = _locate(fine[:num_groups], inner_a)
    same = bin_b == bin_a
    fine_b_same, _ = _locate(fine[:num_groups], inner_b)
    fine_b_other, _ = _locate(fine[num_groups:], inner_b)
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
