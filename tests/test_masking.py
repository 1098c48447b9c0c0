"""Masked Image Consistency: the block mask and the quality-weighted masked-image loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import uda_selftrain as ust


def test_mask_is_constant_on_blocks_and_cut_at_the_border():
    m = ust.block_mask(3, (37, 70), block_size=8, generator=torch.Generator().manual_seed(0))
    assert m.shape == (3, 1, 37, 70) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    for by in range(0, 37, 8):
        for bx in range(0, 70, 8):
            block = m[:, :, by : by + 8, bx : bx + 8]
            assert bool((block == block[:, :, :1, :1]).all())


def test_drop_ratio_is_the_block_drop_probability():
    m = ust.block_mask(
        200, (64, 64), ratio=0.7, block_size=8, generator=torch.Generator().manual_seed(1)
    )
    kept = m[:, :, ::8, ::8].mean().item()  # one value per block: 200·64 draws
    assert abs(kept - 0.3) < 0.01
    assert bool(ust.block_mask(2, (8, 8), ratio=0.0, block_size=4).eq(1).all())


def test_mask_images_zeroes_dropped_blocks_and_passes_gradients(device):
    x = torch.randn(2, 3, 16, 24, device=device, requires_grad=True)
    out = ust.mask_images(x, block_size=4, generator=torch.Generator().manual_seed(2))
    assert out.images.device.type == device.type and out.mask.shape == (2, 1, 16, 24)
    torch.testing.assert_close(out.images, x * out.mask)
    out.images.sum().backward()
    torch.testing.assert_close(x.grad, out.mask.expand_as(x))


def test_masks_are_deterministic_and_device_independent(device):
    a = ust.block_mask(2, (16, 32), block_size=4, generator=torch.Generator().manual_seed(3))
    b = ust.block_mask(
        2, (16, 32), block_size=4, generator=torch.Generator().manual_seed(3), device=device
    )
    assert torch.equal(a, b.cpu())
    c = ust.block_mask(2, (16, 32), block_size=4, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, c)
    module = ust.BlockMasking(ratio=0.7, block_size=4)
    x = torch.randn(2, 3, 16, 32)
    got = module(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got.mask, a) and "block_size=4" in repr(module)


def test_mic_block_size_scales_the_published_64_on_512():
    assert ust.mic_block_size((512, 512)) == 64
    assert ust.mic_block_size((1024, 2048)) == 128
    assert ust.mic_block_size((64, 128)) == 8
    assert ust.mic_block_size((3, 5)) == 1


def _reference_loss(logits, labels, weight, ignore=255):
    x = logits.double().numpy()
    lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
    y = labels.numpy()
    valid = y != ignore
    picked = np.take_along_axis(x, np.where(valid, y, 0)[:, None], 1)[:, 0]
    ce = np.where(valid, lse - picked, 0.0)
    w = weight.double().numpy()
    w = w[:, None, None] if w.ndim == 1 else w
    return float((ce * w).mean())


@pytest.mark.parametrize("per_pixel", [False, True])
def test_loss_matches_an_independent_computation(per_pixel, device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 6, 7, generator=gen)
    y = torch.randint(0, 5, (3, 6, 7), generator=gen)
    y[torch.rand(3, 6, 7, generator=gen) < 0.3] = 255
    w = torch.rand(3, 6, 7, generator=gen) if per_pixel else torch.rand(3, generator=gen)
    got = ust.masked_consistency_loss(x.to(device), y.to(device), w.to(device))
    assert got.shape == () and got.dtype == torch.float32
    assert abs(got.item() - _reference_loss(x, y, w)) < 1e-5
    module = ust.MaskedImageConsistencyLoss(weight=0.5)
    torch.testing.assert_close(module(x.to(device), y.to(device), w.to(device)), 0.5 * got)
    unweighted = ust.masked_consistency_loss(x, y)
    assert abs(unweighted.item() - _reference_loss(x, y, torch.ones(3))) < 1e-5


def test_loss_gradients_and_all_ignored():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (2, 3, 5), generator=gen)
    y[0, 0] = 255
    w = torch.rand(2, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda a: ust.masked_consistency_loss(a, y, w), (x,))
    ignored = torch.full((2, 3, 5), 255)
    loss = ust.masked_consistency_loss(x, ignored, w)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and bool(g.eq(0).all())


@pytest.mark.parametrize(
    ("call", "error", "word"),
    [
        (lambda: ust.block_mask(2, (8, 8), ratio=1.0), ValueError, "ratio"),
        (lambda: ust.block_mask(2, (8, 8), block_size=0), ValueError, "block_size"),
        (lambda: ust.block_mask(2, (8,)), ValueError, "size"),
        (lambda: ust.mask_images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)), TypeError, "images"),
        (lambda: ust.mask_images(torch.zeros(2, 1, 8, 8)), ValueError, "images"),
        (lambda: ust.BlockMasking(ratio=-0.1), ValueError, "ratio"),
        (
            lambda: ust.masked_consistency_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2)),
            TypeError,
            "pseudo_labels",
        ),
        (
            lambda: ust.masked_consistency_loss(
                torch.full((1, 3, 2, 2), float("nan")), torch.zeros(1, 2, 2, dtype=torch.long)
            ),
            ValueError,
            "logits",
        ),
        (
            lambda: ust.masked_consistency_loss(
                torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3, dtype=torch.long)
            ),
            ValueError,
            "pseudo_labels",
        ),
        (
            lambda: ust.masked_consistency_loss(
                torch.zeros(2, 3, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long), torch.ones(3)
            ),
            ValueError,
            "weight",
        ),
        (lambda: ust.MaskedImageConsistencyLoss(weight=-1.0), ValueError, "weight"),
    ],
)
def test_bad_inputs(call, error, word):
    with pytest.raises(error, match=word):
        call()
