"""Collapse diagnostics: values against a direct computation, the vanishing rule, validation."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import uda_selftrain as ust


def test_class_prior_and_counts_match_numpy(device):
    gen = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 6, (4, 9), generator=gen).to(device) for _ in range(3)]
    labels[0][0] = 255
    labels[1][1] = 7  # outside [0, 5): not counted
    prior = ust.class_prior(labels, 5)
    flat = np.concatenate([lab.cpu().numpy().ravel() for lab in labels])
    flat = flat[flat < 5]
    expected = np.bincount(flat, minlength=5) / flat.size
    np.testing.assert_allclose(prior.numpy(), expected, rtol=1e-12)
    counts = ust.class_counts(labels[2], 5)
    assert counts.device == labels[2].device
    assert (
        counts.tolist()
        == np.bincount(
            labels[2].cpu().numpy().ravel()[labels[2].cpu().numpy().ravel() < 5], minlength=5
        ).tolist()
    )
    with pytest.raises(TypeError, match="labels"):
        ust.class_counts(torch.zeros(3), 5)


def test_diagnostics_values_and_vanishing_rule():
    prior = torch.tensor([0.6, 0.3, 0.05, 0.05, 0.0], dtype=torch.float64)
    previous = torch.tensor([0.5, 0.3, 0.1, 0.1, 0.0], dtype=torch.float64)
    pixels = torch.tensor([700, 280, 18, 2, 0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = ust.pseudo_label_diagnostics(
            pixels,
            prior,
            total_pixels=2000,
            previous_composition=previous,
            thresholds=torch.tensor([0.9, 0.8, 0.6, 0.5, 0.9]),
            class_names=["a", "b", "c", "d", "e"],
        )
    comp = pixels.double() / 1000
    torch.testing.assert_close(d.composition, comp)
    torch.testing.assert_close(d.share, pixels.double() / 2000)
    assert d.selected_fraction == 0.5
    torch.testing.assert_close(d.ratio_to_prior[:4], comp[:4] / prior[:4])
    assert math.isnan(float(d.ratio_to_prior[4]))  # no prior: not judged
    torch.testing.assert_close(d.change[:4], comp[:4] / previous[:4])
    # c: 0.36x prior but 0.18x the previous round (< 0.25): vanishing; d: 0.04x prior: vanishing
    assert d.vanishing == [2, 3]
    assert len(caught) == 1 and issubclass(caught[0].category, ust.CollapseWarning)
    assert "class 3 (d)" in str(caught[0].message) and "threshold 0.500" in str(caught[0].message)
    record = json.loads(json.dumps(d.to_dict()))  # JSON-ready: NaN written as None
    assert record["ratio_to_prior"][4] is None and record["vanishing_names"] == ["c", "d"]


def test_no_warning_when_healthy_and_warning_can_be_an_error():
    prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = ust.pseudo_label_diagnostics(torch.tensor([40, 60]), prior, total_pixels=100)
    assert d.vanishing == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ust.CollapseWarning)
        with pytest.raises(ust.CollapseWarning):
            ust.pseudo_label_diagnostics(torch.tensor([100, 0]), prior, total_pixels=100)
    d = ust.pseudo_label_diagnostics(torch.tensor([100, 0]), prior, total_pixels=100, warn=False)
    assert d.vanishing == [1]


def test_monitor_compares_with_the_previous_round():
    monitor = ust.CollapseMonitor(torch.tensor([0.5, 0.5], dtype=torch.float64))
    monitor.update(torch.tensor([50, 50]), total_pixels=100)
    with pytest.warns(ust.CollapseWarning):
        d = monitor.update(torch.tensor([90, 10]), total_pixels=100)  # 0.2x the previous round
    assert d.vanishing == [1] and len(monitor.history) == 2
    assert d.change[1].item() == pytest.approx(0.2)


def test_diagnostics_validation():
    prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="prior"):
        ust.pseudo_label_diagnostics(torch.tensor([1, 1]), prior[:1], total_pixels=10)
    with pytest.raises(ValueError, match="total_pixels"):
        ust.pseudo_label_diagnostics(torch.tensor([10, 10]), prior, total_pixels=5)
    with pytest.raises(ValueError, match="class_pixels"):
        ust.pseudo_label_diagnostics(torch.tensor([-1, 1]), prior, total_pixels=5)
    with pytest.raises(ValueError, match="vanish_ratio"):
        ust.pseudo_label_diagnostics(torch.tensor([1, 1]), prior, total_pixels=5, vanish_ratio=2.0)
    with pytest.raises(ValueError, match="prior"):
        ust.pseudo_label_diagnostics(
            torch.tensor([1, 1]), torch.tensor([0.5, float("nan")]), total_pixels=5
        )
