"""Thing-class feature distance: label downscaling, the distance, and the frozen-encoder Module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uda_selftrain as ust


def _daformer_downscale(gt, factor, min_ratio, n_classes, ignore=255):
    """DAFormer's one-hot + average pooling formulation, written independently."""
    out = gt.clone()
    out[out == ignore] = n_classes
    one_hot = F.one_hot(out, n_classes + 1).permute(0, 3, 1, 2).float()
    pooled = F.avg_pool2d(one_hot, kernel_size=factor)
    ratio, label = pooled.max(dim=1)
    label[label == n_classes] = ignore
    label[ratio < min_ratio] = ignore
    return label


@pytest.mark.parametrize("min_ratio", [0.0, 0.5, 0.75, 1.0])
def test_downscale_matches_one_hot_pooling(min_ratio, device):
    gen = torch.Generator().manual_seed(0)
    # Blocky labels so that many cells are pure, some mixed.
    coarse = torch.randint(0, 6, (2, 8, 12), generator=gen)
    y = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)
    y[torch.rand(y.shape, generator=gen) < 0.15] = 255
    y[:, :5, :7] = torch.randint(0, 6, (2, 5, 7), generator=gen)
    got = ust.downscale_labels(y.to(device), (4, 6), num_classes=6, min_ratio=min_ratio)
    expected = _daformer_downscale(y, 8, min_ratio, 6)
    assert got.shape == (2, 4, 6) and got.device.type == device.type
    assert torch.equal(got.cpu(), expected)


def test_downscale_non_divisible_sizes_against_a_loop():
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (1, 10, 13), generator=gen)
    got = ust.downscale_labels(y, (3, 4), num_classes=3, min_ratio=0.0)
    for i in range(3):
        for j in range(4):
            r0, r1 = (i * 10 + 2) // 3, ((i + 1) * 10 + 2) // 3
            c0, c1 = (j * 13 + 3) // 4, ((j + 1) * 13 + 3) // 4
            cell = y[0, r0:r1, c0:c1].flatten()
            counts = torch.bincount(cell, minlength=3)
            assert got[0, i, j] == int(counts.argmax()), (i, j)


def _reference_distance(f, g, y, things, n_classes, min_ratio=0.75):
    small = _daformer_downscale(y, y.shape[-1] // f.shape[-1], min_ratio, n_classes)
    mask = torch.isin(small, torch.tensor(things))
    d = torch.linalg.vector_norm(f - g, dim=1)
    return d[mask].mean() if mask.any() else torch.zeros(())


def test_distance_matches_daformer_masked_mean(device):
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(2, 16, 4, 8, generator=gen)
    g = torch.randn(2, 16, 4, 8, generator=gen)
    y = (
        torch.randint(0, 19, (2, 4, 8), generator=gen)
        .repeat_interleave(8, 1)
        .repeat_interleave(8, 2)
    )
    got = ust.thing_feature_distance(f.to(device), g.to(device), y.to(device))
    expected = _reference_distance(f, g, y, ust.CITYSCAPES_THING_CLASSES, 19)
    assert abs(got.item() - expected.item()) < 1e-5
    only_cars = ust.thing_feature_distance(f, g, y, thing_classes=[13])
    assert abs(only_cars.item() - _reference_distance(f, g, y, [13], 19).item()) < 1e-5


def test_no_thing_pixels_gives_zero_and_a_zero_gradient():
    f = torch.randn(1, 4, 2, 2, requires_grad=True)
    y = torch.zeros(1, 16, 16, dtype=torch.long)  # road only: a stuff class
    loss = ust.thing_feature_distance(f, torch.randn(1, 4, 2, 2), y)
    (g,) = torch.autograd.grad(loss, f)
    assert loss.item() == 0.0 and bool(g.eq(0).all())
    ignored = torch.full((1, 16, 16), 255)
    assert ust.thing_feature_distance(f, torch.randn(1, 4, 2, 2), ignored).item() == 0.0


def test_gradients_float64_and_equal_features():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64)
    y = torch.full((2, 8, 12), 13)
    assert torch.autograd.gradcheck(lambda a: ust.thing_feature_distance(a, g, y), (f,))
    same = ust.thing_feature_distance(f, f.detach(), y)
    (grad,) = torch.autograd.grad(same, f)
    assert bool(torch.isfinite(grad).all())


def test_module_freezes_a_copy_of_the_encoder():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8))
    fd = ust.ThingFeatureDistance(student, weight=0.5, thing_classes=[1], num_classes=3)
    assert fd.encoder is not student and all(not p.requires_grad for p in fd.encoder.parameters())
    fd.train()
    assert not fd.encoder.training
    x = torch.randn(2, 3, 16, 16)
    y = torch.ones(2, 16, 16, dtype=torch.long)
    feats = student(x)
    loss = fd(feats, x, y)
    loss.backward()
    assert student[0].weight.grad is not None
    assert all(p.grad is None for p in fd.encoder.parameters())
    with torch.no_grad():
        expected = 0.5 * torch.linalg.vector_norm(feats - fd.encoder(x), dim=1).mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    before = fd.encoder[1].running_mean.clone()
    fd(student(x), x, y)
    assert torch.equal(before, fd.encoder[1].running_mean)


@pytest.mark.parametrize(
    ("call", "error", "word"),
    [
        (
            lambda: ust.thing_feature_distance(
                torch.zeros(1, 2, 2, 2),
                torch.zeros(1, 2, 2, 3),
                torch.zeros(1, 8, 8, dtype=torch.long),
            ),
            ValueError,
            "frozen_features",
        ),
        (
            lambda: ust.thing_feature_distance(
                torch.zeros(1, 2, 2, 2, dtype=torch.long),
                torch.zeros(1, 2, 2, 2),
                torch.zeros(1, 8, 8, dtype=torch.long),
            ),
            TypeError,
            "features",
        ),
        (
            lambda: ust.thing_feature_distance(
                torch.full((1, 2, 2, 2), float("inf")),
                torch.zeros(1, 2, 2, 2),
                torch.zeros(1, 8, 8, dtype=torch.long),
            ),
            ValueError,
            "features",
        ),
        (
            lambda: ust.thing_feature_distance(
                torch.zeros(1, 2, 2, 2),
                torch.zeros(1, 2, 2, 2),
                torch.zeros(2, 8, 8, dtype=torch.long),
            ),
            ValueError,
            "labels",
        ),
        (
            lambda: ust.thing_feature_distance(
                torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.full((1, 8, 8), 40)
            ),
            ValueError,
            "labels",
        ),
        (
            lambda: ust.thing_feature_distance(
                torch.zeros(1, 2, 2, 2),
                torch.zeros(1, 2, 2, 2),
                torch.zeros(1, 8, 8, dtype=torch.long),
                thing_classes=[25],
            ),
            ValueError,
            "thing_classes",
        ),
        (
            lambda: ust.downscale_labels(
                torch.zeros(1, 4, 4, dtype=torch.long), (8, 8), num_classes=3
            ),
            ValueError,
            "size",
        ),
        (
            lambda: ust.downscale_labels(
                torch.zeros(4, 4, dtype=torch.long), (2, 2), num_classes=3
            ),
            ValueError,
            "labels",
        ),
        (
            lambda: ust.downscale_labels(
                torch.zeros(1, 4, 4, dtype=torch.long), (2, 2), num_classes=3, min_ratio=2.0
            ),
            ValueError,
            "min_ratio",
        ),
        (lambda: ust.ThingFeatureDistance("resnet"), TypeError, "encoder"),
        (lambda: ust.ThingFeatureDistance(nn.Identity(), weight=-1.0), ValueError, "weight"),
    ],
)
def test_bad_inputs(call, error, word):
    with pytest.raises(error, match=word):
        call()
