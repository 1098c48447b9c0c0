from __future__ import annotations

import math

import pytest
import torch

from uda_selftrain.mixing import ClassMix, classmix, classmix_masks
from uda_selftrain.online import confidence_weight, online_targets, pixel_weights
from uda_selftrain.selection import InstanceAdaptiveSelector


def test_classmix_masks_choose_half_the_present_classes(device):
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 6, (8, 10, 12), generator=g)
    lab[0] = 255  # nothing labelled
    lab[1] = 3  # a single class: it is chosen (⌈1/2⌉ = 1)
    lab[2, :, :6] = 255
    lab = lab.to(device)
    mask = classmix_masks(lab, 6, generator=torch.Generator().manual_seed(1))
    assert mask.shape == lab.shape and mask.dtype == torch.bool and mask.device == lab.device
    assert not mask[0].any() and mask[1].all()
    for i in range(8):
        present = [c for c in lab[i].unique().tolist() if c != 255]
        chosen = [c for c in present if mask[i][lab[i] == c].any()]
        assert len(chosen) == math.ceil(len(present) / 2)
        for c in chosen:  # whole classes, never partial, never ignored pixels
            assert mask[i][lab[i] == c].all()
        assert not mask[i][lab[i] == 255].any()
    again = classmix_masks(lab, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


def test_classmix_masks_uniform_choice():
    lab = torch.arange(4).repeat_interleave(4).view(1, 4, 4).expand(4000, -1, -1)
    mask = classmix_masks(lab, 4, generator=torch.Generator().manual_seed(0))
    freq = torch.stack([mask[:, c, 0].float().mean() for c in range(4)])
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.03)


def test_classmix_values_and_module(device):
    g = torch.Generator().manual_seed(0)
    s_img, t_img = (
        torch.rand(2, 3, 5, 6, generator=g).to(device),
        torch.rand(2, 3, 5, 6, generator=g).to(device),
    )
    s_lab = torch.randint(0, 4, (2, 5, 6), generator=g).to(device)
    t_lab = torch.full((2, 5, 6), 255, device=device)
    out = ClassMix(4)(s_img, s_lab, t_img, t_lab, generator=torch.Generator().manual_seed(3))
    m = out.mask
    assert torch.equal(out.labels[m], s_lab[m]) and out.labels[~m].eq(255).all()
    assert torch.equal(out.images.permute(1, 0, 2, 3)[:, m], s_img.permute(1, 0, 2, 3)[:, m])
    assert torch.equal(out.images.permute(1, 0, 2, 3)[:, ~m], t_img.permute(1, 0, 2, 3)[:, ~m])


def test_classmix_validation():
    img, lab = torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="mask"):  # a dtype fault is a TypeError everywhere
        classmix(img, lab, img, lab, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        classmix(img, lab, img, lab, torch.zeros(2, 4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="target_labels"):
        classmix(img, lab, img, lab.float(), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        classmix(img, lab, img[:1], lab, torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        classmix_masks(lab.float().long().view(2, 16), 4)
    with pytest.raises(ValueError, match="outside"):
        classmix_masks(lab + 7, 4)


def test_confidence_weight_matches_manual(device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 8, 8, generator=g) * 4).to(device)
    w = confidence_weight(logits)
    conf = logits.softmax(1).amax(1)
    expected = torch.stack([(conf[i] >= 0.968).float().mean() for i in range(3)])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(confidence_weight(logits.softmax(1), probabilities=True), expected)
    bad = logits.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        confidence_weight(bad)
    with pytest.raises(ValueError, match="threshold"):
        confidence_weight(logits, threshold=1.5)
    with pytest.raises(TypeError):
        confidence_weight(logits.long())


def test_pixel_weights_and_online_targets():
    w = pixel_weights(torch.tensor([0.25, 0.5]), (2, 3), torch.zeros(2, 2, 3, dtype=torch.bool))
    assert w.shape == (2, 2, 3) and w[1].eq(0.5).all()
    logits = torch.randn(2, 19, 6, 6, generator=torch.Generator().manual_seed(0)) * 6
    plain = online_targets(logits)
    assert torch.equal(plain.labels, logits.argmax(1))
    sel = InstanceAdaptiveSelector(19)
    t = online_targets(logits, selector=sel)
    picked = t.labels != 255
    assert torch.equal(t.labels[picked], plain.labels[picked])
    assert int(sel.num_instances) == 2  # the selector's state moved (online use)
