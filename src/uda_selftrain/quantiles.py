"""Exact per-group quantiles on the device, without sorting: a two-level radix select.

For non-negative float32 values the IEEE-754 bit pattern, read as an integer, is ordered like the
value. A value in ``[0, 1]`` therefore has a 30-bit integer key; its upper 15 bits pick one of
32 768 coarse bins and its lower 15 bits one of 32 768 fine bins inside. One integer histogram per
level locates the k-th smallest value of every group at once, so the cost is a few linear passes
over the values whatever the number of groups: no sort, no per-group loop and no host
synchronisation (the histograms have a size known in advance, see ``_histogram``).

The result is **exact** (bit-identical to sorting the float32 values) because every float32 value
has its own key. Histograms are integer counts, so with a process group they are summed across
ranks and every rank obtains the quantile of the union of the ranks' values, identical everywhere.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_finite,
    check_float,
    check_positive_int,
    check_tensor,
    value_checks_enabled,
)
from ._histogram import count
from ._scratch import Scratch
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


def _locate(cum: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin of each row holding its ``rank``-th (0-based) element, and the rank inside that bin.

    ``cum`` ``(G, K)`` is the row-wise cumulative histogram; ``rank`` ``(G,)`` int64.
    """
    bins = torch.searchsorted(cum, rank[:, None], right=True)[:, 0].clamp_(max=cum.shape[1] - 1)
    prev = cum.gather(1, (bins - 1).clamp(min=0)[:, None])[:, 0]
    return bins, rank - torch.where(bins > 0, prev, torch.zeros_like(prev))


def _coarse(
    keys: torch.Tensor, groups: torch.Tensor, num_groups: int, sync: bool, out: torch.Tensor
) -> torch.Tensor:
    """Level 1: writes ``group · 2^15 + upper 15 bits`` of every key into ``out`` (int32, ``(M,)``)
    and returns the rank-summed ``(G, 2^15)`` histogram."""
    torch.bitwise_right_shift(keys, _BITS, out=out)
    out.clamp_(0, _BINS - 1)  # values outside [0, 1] land in the edge bins
    out.add_(groups, alpha=_BINS)
    size = num_groups * _BINS
    hist = count(out, size)
    if sync:
        hist = all_reduce_sum(hist)
    return hist.view(num_groups, _BINS)


def _order_statistics(
    keys: torch.Tensor,
    index: torch.Tensor,
    coarse_hist: torch.Tensor,
    rank_a: torch.Tensor,
    rank_b: torch.Tensor,
    extra_keys: torch.Tensor | None,
    sync: bool,
    scratch: Scratch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of the ``rank_a``-th and ``rank_b``-th smallest element of every group.

    ``index`` and ``coarse_hist`` come from :func:`_coarse`; ``rank_b`` is ``rank_a`` or
    ``rank_a + 1``. Both ``index`` and ``coarse_hist`` are overwritten. The code keeps the number
    of full-size passes and fresh allocations small: on a CPU this kernel is bound by memory
    bandwidth and page faults.
    """
    num_groups = coarse_hist.shape[0]
    device = keys.device
    size = num_groups * _BINS
    ar = torch.arange(num_groups, device=device, dtype=torch.int32)
    coarse = coarse_hist.view(-1)
    extra_index = None
    if extra_keys is not None:
        extra_index = ar * _BINS + (extra_keys >> _BITS).clamp(0, _BINS - 1)
        # Added after the reduction: the extra samples are shared state, counted once, not per rank.
        coarse.index_add_(0, extra_index, torch.ones_like(extra_index, dtype=coarse.dtype))
    cum = coarse_hist.cumsum_(1)
    bin_a, inner_a = _locate(cum, rank_a)
    bin_b, _ = _locate(cum, rank_b)

    # Level 2, one pass. Group g owns fine bins [g · 2^16, (g + 1) · 2^16): the lower half counts
    # the elements of bin_a by their lower 15 bits, the upper half those of bin_b when it differs
    # (then the rank_b-th element is the smallest of bin_b, and bin_b's elements follow bin_a's in
    # rank order). Every other element goes to a dump region of 2^15 bins after the groups, spread
    # by its own lower bits: no long chains of increments on one counter (a serial dependency on
    # a CPU, atomic contention on a GPU). A lookup table over the level-1 index gives each element
    # its region's base.
    dump = 2 * size
    table = scratch.get("quantile_table", size, torch.int32, device).fill_(dump)
    base = ar * (2 * _BINS)
    table[ar * _BINS + bin_b.to(torch.int32)] = base + _BINS
    table[ar * _BINS + bin_a.to(torch.int32)] = base  # written last: wins when bin_b == bin_a
    fine_index = scratch.get("quantile_fine", keys.numel(), torch.int32, device)
    torch.index_select(table, 0, index, out=fine_index)
    fine_index.add_(torch.bitwise_and(keys, _LOW_MASK, out=index))  # index is free: reuse it
    fine = count(fine_index, dump + _BINS)[:dump]
    if sync:
        fine = all_reduce_sum(fine)
    if extra_keys is not None:
        extra_fine = table.index_select(0, extra_index) + (extra_keys & _LOW_MASK)
        inside = extra_fine < dump
        fine.index_add_(0, extra_fine.clamp(max=dump - 1), inside.to(fine.dtype))
    fine_cum = fine.view(num_groups, 2 * _BINS).cumsum_(1)
    fine_a, _ = _locate(fine_cum, inner_a)
    fine_b, _ = _locate(fine_cum, inner_a + (rank_b - rank_a))
    key_a = (bin_a << _BITS) | fine_a
    key_b = torch.where(
        fine_b >= _BINS, (bin_b << _BITS) | (fine_b - _BINS), (bin_a << _BITS) | fine_b
    )
    return key_a, key_b


def grouped_quantile(
    values: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    q: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    sync: bool = False,
) -> torch.Tensor:
    """Per-group quantile with linear interpolation (numpy's default method), exact.

    For a group of ``n`` sorted values ``x_0 ≤ … ≤ x_{n-1}``, ``h = q (n − 1)`` and the result is
    ``x_⌊h⌋ + (h − ⌊h⌋)(x_{⌊h⌋+1} − x_⌊h⌋)``, as ``numpy.quantile`` computes it.

    Args:
        values: ``(M,)`` floating values in ``[0, 1]`` (confidences; clamped into that range).
        groups: ``(M,)`` integer group of each value, in ``[0, num_groups)``.
        num_groups: ``G``.
        q: ``(G,)`` quantile level of each group, in ``[0, 1]``.
        extra: optional ``(G,)`` values in ``[0, 1]``, one extra sample per group (IAS adds the
            previous threshold).
        sync: take the quantile of the union of all ranks' values (histograms all-reduced).

    Returns:
        ``(G,)`` float32 quantiles; ``NaN`` for a group with no value.

    >>> import torch
    >>> v = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.5])
    >>> g = torch.tensor([0, 0, 0, 1, 1])
    >>> grouped_quantile(v, g, 2, torch.tensor([0.5, 0.25]))
    tensor([0.2000, 0.6000])
    """
    v = check_float("values", values, ndim=1, shape_hint="(M,)")
    g = check_tensor("groups", groups)
    if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise TypeError(f"groups must be an integer tensor, got dtype {g.dtype}")
    if g.shape != v.shape:
        raise ValueError(
            f"groups must have the values' shape {tuple(v.shape)}, got {tuple(g.shape)}"
        )
    check_positive_int("num_groups", num_groups)
    qq = check_float("q", q, ndim=1, shape_hint="(G,)")
    if qq.shape[0] != num_groups:
        raise ValueError(f"q must have shape ({num_groups},), got {tuple(qq.shape)}")
    if extra is not None:
        check_float("extra", extra, ndim=1, shape_hint="(G,)")
        if extra.shape[0] != num_groups:
            raise ValueError(f"extra must have shape ({num_groups},), got {tuple(extra.shape)}")
    if value_checks_enabled():
        if g.numel():
            lo, hi = (int(x) for x in torch.aminmax(g))
            if lo < 0 or hi >= num_groups:
                raise ValueError(f"groups values must lie in [0, {num_groups}), got [{lo}, {hi}]")
        if not bool(((qq >= 0) & (qq <= 1)).all()):
            raise ValueError("q must lie in [0, 1]")
        check_finite("values", v)
    # The kernel needs keys in [0, 1]; the internal callers guarantee it, the public one clamps.
    values = v.to(torch.float32).clamp(0.0, 1.0)
    if extra is not None:
        extra = extra.to(torch.float32).clamp(0.0, 1.0)
    return _grouped_quantile(values, groups, num_groups, q, extra=extra, sync=sync)[0]


def _grouped_quantile(
    values: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int,
    q: torch.Tensor,
    *,
    extra: torch.Tensor | None = None,
    sync: bool = False,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grouped_quantile` and the ``(G,)`` int64 number of values per group (rank-summed,
    without the extra samples), read off the level-1 histogram instead of a separate pass.

    ``groups`` is read, never written. ``scratch`` holds the full-size temporaries (fresh
    ones when not given).
    """
    if scratch is None:
        scratch = Scratch()
    g = groups.reshape(-1).to(torch.int32)
    keys = _keys(values.reshape(-1))
    index = scratch.get("quantile_index", keys.numel(), torch.int32, keys.device)
    coarse_hist = _coarse(keys, g, num_groups, sync, out=index)
    counts = coarse_hist.sum(1)
    n = counts + (1 if extra is not None else 0)
    last = (n - 1).clamp(min=0)
    h = q.to(torch.float64).clamp(0.0, 1.0) * last.to(torch.float64)
    low = h.floor()
    frac = (h - low).to(torch.float32)
    low = low.to(torch.int64)
    high = torch.minimum(low + 1, last)
    extra_keys = _keys(extra.reshape(-1)) if extra is not None else None
    key_a, key_b = _order_statistics(keys, index, coarse_hist, low, high, extra_keys, sync, scratch)
    x0 = key_a.to(torch.int32).view(torch.float32)
    x1 = key_b.to(torch.int32).view(torch.float32)
    out = x0 + frac * (x1 - x0)
    return torch.where(n > 0, out, torch.full_like(out, float("nan"))), counts
