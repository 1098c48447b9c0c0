from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uda_selftrain.quantiles import grouped_quantile


def _numpy_quantiles(v, g, groups, q, extra=None):
    out = []
    for c in range(groups):
        s = v[g == c].astype(np.float64)
        if extra is not None:
            s = np.concatenate([[extra[c]], s])
        out.append(np.quantile(s, q[c]) if s.size else np.nan)
    return np.array(out)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    groups=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    with_extra=st.booleans(),
    ties=st.booleans(),
)
def test_matches_numpy_linear_quantile(n, groups, seed, with_extra, ties):
    rng = np.random.default_rng(seed)
    v = rng.random(n).astype(np.float32)
    if ties:
        v = (np.round(v * 8) / 8).astype(np.float32)
    g = rng.integers(0, groups, n)
    q = rng.random(groups).astype(np.float32)
    q[0] = 1.0 if groups > 1 else q[0]
    extra = rng.random(groups).astype(np.float32) if with_extra else None
    ours = grouped_quantile(
        torch.from_numpy(v),
        torch.from_numpy(g),
        groups,
        torch.from_numpy(q),
        extra=None if extra is None else torch.from_numpy(extra),
    ).numpy()
    ref = _numpy_quantiles(v, g, groups, q.astype(np.float64), extra)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-7, equal_nan=True)


def test_exact_at_extremes_and_zero():
    v = torch.tensor([0.0, 1.0, 0.5, 1e-30, 0.25])
    g = torch.zeros(5, dtype=torch.long)
    assert grouped_quantile(v, g, 1, torch.tensor([0.0])).item() == 0.0
    assert grouped_quantile(v, g, 1, torch.tensor([1.0])).item() == 1.0
    assert grouped_quantile(v, g, 1, torch.tensor([0.5])).item() == 0.25


def test_empty_group_is_nan_and_extra_only_group_returns_extra():
    v = torch.tensor([0.3, 0.4])
    g = torch.tensor([0, 0])
    out = grouped_quantile(v, g, 3, torch.tensor([0.5, 0.5, 0.5]))
    assert torch.isnan(out[1:]).all()
    out = grouped_quantile(
        v, g, 3, torch.tensor([0.5, 0.3, 0.9]), extra=torch.tensor([0.9, 0.7, 0.2])
    )
    assert out[1].item() == pytest.approx(0.7) and out[2].item() == pytest.approx(0.2)


def test_device(device):
    gen = torch.Generator().manual_seed(1)
    v = torch.rand(5000, generator=gen)
    g = torch.randint(0, 19, (5000,), generator=gen)
    q = torch.rand(19, generator=gen)
    cpu = grouped_quantile(v, g, 19, q)
    dev = grouped_quantile(v.to(device), g.to(device), 19, q.to(device))
    assert dev.device.type == device.type
    torch.testing.assert_close(dev.cpu(), cpu, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("values", "q", "extra"),
    [
        # The two order statistics in far-apart coarse bins (empty bins between).
        ([0.1, 0.1, 0.1, 0.9], 0.9, None),
        # Same coarse bin, different fine bins (1 ulp apart).
        ([0.5, float(np.nextafter(np.float32(0.5), np.float32(1))), 0.7], 0.25, None),
        # The extra sample is one of the two order statistics, below / above / between them.
        ([0.3, 0.6], 0.25, 0.1),
        ([0.3, 0.6], 0.75, 0.95),
        ([0.3, 0.6], 0.5, 0.45),
        # The extra sample far from both (lands in the "elsewhere" region of level 2).
        ([0.3, 0.31, 0.32, 0.33], 0.5, 0.99),
        # Exact 0, exact 1, and a denormal.
        ([0.0, 1.0, 1e-40], 0.5, None),
    ],
)
def test_order_statistics_across_and_within_coarse_bins(values, q, extra):
    v = np.asarray(values, np.float32)
    g = np.zeros(v.size, np.int64)
    e = None if extra is None else np.asarray([extra], np.float32)
    ours = grouped_quantile(
        torch.from_numpy(v),
        torch.from_numpy(g),
        1,
        torch.tensor([q]),
        extra=None if e is None else torch.from_numpy(e),
    )
    ref = _numpy_quantiles(v, g, 1, np.asarray([q], np.float64), e)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=2e-7)


def test_large_group_with_one_dominant_bin():
    # 200 000 values, most of them exactly 1.0 (saturated confidences) plus a spread tail: the
    # level-1 bin of 1.0 holds almost everything, the "elsewhere" region of level 2 the rest.
    gen = torch.Generator().manual_seed(2)
    v = torch.where(
        torch.rand(200_000, generator=gen) < 0.8,
        torch.tensor(1.0),
        torch.rand(200_000, generator=gen),
    )
    g = torch.randint(0, 3, (200_000,), generator=gen)
    q = torch.tensor([0.1, 0.5, 0.95])
    ours = grouped_quantile(v, g, 3, q).numpy()
    ref = _numpy_quantiles(v.numpy(), g.numpy(), 3, q.double().numpy())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-7)


def test_values_outside_unit_interval_are_clamped():
    v = torch.tensor([-3.0, 0.2, 0.4, 7.5, 2.0])
    g = torch.zeros(5, dtype=torch.long)
    out = grouped_quantile(v, g, 1, torch.tensor([0.0]))
    assert out.item() == 0.0
    assert grouped_quantile(v, g, 1, torch.tensor([1.0])).item() == 1.0
    assert grouped_quantile(v, g, 1, torch.tensor([0.5])).item() == pytest.approx(0.4)
