"""The code paths an accelerator takes, checked on a machine without one.

* The sync-free histogram (zeros + ``index_add_``) equals ``bincount``, and every primitive built
  on it gives the same results in both forms (the accelerator form forced on a CPU).
* On the ``meta`` device every non-CPU branch runs and any tensor left on the host by mistake
  raises a device mismatch, as it would on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from uda_selftrain import (
    InstanceAdaptiveSelector,
    _histogram,
    classmix_masks,
    confusion_matrix,
    grouped_quantile,
    value_checks,
)
from uda_selftrain._histogram import count, weighted_sum
from uda_selftrain.augment import _equalize


@pytest.mark.parametrize("n", [0, 1, 1000])
def test_count_and_weighted_sum_forms_agree(n, device):
    gen = torch.Generator().manual_seed(n)
    index = torch.randint(0, 37, (n,), generator=gen, dtype=torch.int32).to(device)
    weights = torch.rand(n, generator=gen, dtype=torch.float64).to(device)
    size = 40  # larger than any index: trailing empty bins
    a, b = count(index, size), count(index, size, sync_free=True)
    assert a.dtype == b.dtype == torch.int64 and a.shape == (size,)
    assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(a.cpu(), torch.bincount(index.cpu().long(), minlength=size))
    x, y = weighted_sum(index, weights, size), weighted_sum(index, weights, size, sync_free=True)
    assert x.dtype == y.dtype == torch.float64
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    f32 = weighted_sum(index, weights.float(), size)
    assert f32.dtype == torch.float32  # bincount's rule on a CPU, the weights' dtype elsewhere


def _primitives():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 24, 32, generator=gen) * 4
    sel = InstanceAdaptiveSelector(6)
    out = [sel(logits), sel(logits * 0.5)]
    labels = torch.randint(0, 6, (3, 16, 16), generator=gen)
    labels[0, :4] = 255
    return {
        "selection": [t for s in out for t in s],
        "state": list(sel.state_dict().values()),
        "quantile": [
            grouped_quantile(
                torch.rand(5000, generator=gen),
                torch.randint(0, 7, (5000,), generator=gen),
                7,
                torch.rand(7, generator=gen),
            )
        ],
        "confusion": [confusion_matrix(labels.flip(1), labels, 6, out_of_range="wrong")],
        "classmix": [classmix_masks(labels, 6, generator=torch.Generator().manual_seed(0))],
        "equalize": [_equalize(torch.rand(2, 3, 8, 8, generator=gen))],
    }


def test_primitives_identical_with_the_accelerator_histogram(monkeypatch):
    default = _primitives()
    monkeypatch.setattr(_histogram, "_FORCE_SYNC_FREE", True)
    forced = _primitives()
    for name, tensors in default.items():
        for a, b in zip(tensors, forced[name], strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("granularity", ["image", "batch"])
def test_accelerator_code_path_has_no_stray_host_tensors(granularity):
    # On the meta device every non-CPU branch runs (fresh scratch, index_add_ histograms, fused
    # max/logsumexp) and any tensor created on the host by mistake raises a device mismatch: the
    # closest check of the CUDA path a machine without a GPU can make.
    meta = torch.device("meta")
    with value_checks(False):  # value checks read data back to the host by design
        sel = InstanceAdaptiveSelector(19, granularity=granularity).to(meta)
        for probabilities in (False, True):
            out = sel(torch.empty(2, 19, 8, 8, device=meta), probabilities=probabilities)
            assert all(t.device == meta for t in out)
        assert out.labels.shape == (2, 8, 8) and out.class_pixels.shape == (2, 19)
        labels = torch.empty(2, 8, 8, dtype=torch.long, device=meta)
        assert confusion_matrix(labels, labels, 19).device == meta
        assert classmix_masks(labels, 19).device == meta


def test_training_step_primitives_have_no_stray_host_tensors():
    # Augmentation, paste, ClassMix, losses and the teacher on the meta device: randomness is drawn
    # from CPU generators by design, and everything it touches must still end up on the device.
    from uda_selftrain import ClassMix, EMATeacher, HIASTLoss, confidence_weight
    from uda_selftrain.augment import WeakStrongViews, colour_params, strong_colour
    from uda_selftrain.paste import paste_views

    meta = torch.device("meta")

    def gen():
        return torch.Generator().manual_seed(0)

    img8 = torch.empty(2, 3, 32, 64, dtype=torch.uint8, device=meta)
    imgf = torch.empty(2, 3, 32, 64, device=meta)
    lab = torch.empty(2, 32, 64, dtype=torch.long, device=meta)
    views = WeakStrongViews((16, 32))
    hard = torch.tensor([False, True, False, True, False], device=meta)
    with value_checks(False):
        for images in (img8, imgf):
            v = views(images, [lab], generator=gen())
            assert v.weak.device == meta and v.strong.device == meta and v.weak.is_floating_point()
        v = paste_views(
            img8, lab, img8.unsqueeze(1), lab.unsqueeze(1), hard, views=views, generator=gen()
        )
        assert all(t.device == meta for t in (v.weak, v.strong, v.labels, v.pasted))
        strong = strong_colour(
            torch.empty(2, 3, 16, 32, device=meta), colour_params(2, generator=gen())
        )
        assert strong.device == meta
        mixed = ClassMix(5)(imgf, lab, imgf, lab, generator=gen())
        assert mixed.images.device == meta
        logits = torch.empty(2, 5, 16, 32, device=meta, requires_grad=True)
        out = HIASTLoss()(logits, lab[:, :16, :32], torch.empty(2, 5, 16, 32, device=meta))
        out.total.backward()
        assert logits.grad.device == meta
        assert confidence_weight(torch.empty(2, 5, 16, 32, device=meta)).device == meta
        net = torch.nn.Conv2d(3, 5, 1).to(meta)
        teacher = EMATeacher(net)
        teacher.update(net)
        assert next(teacher.parameters()).device == meta
