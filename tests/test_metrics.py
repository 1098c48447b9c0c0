from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from uda_selftrain import (
    ConfusionMatrix,
    confusion_matrix,
    iou_from_confusion,
    miou,
    protocol_scores,
)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), c=st.integers(1, 8), n=st.integers(0, 200))
def test_confusion_matches_loop(seed, c, n):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.2] = 255
    p = rng.integers(0, c, n)
    ref = np.zeros((c, c), np.int64)
    for a, b in zip(t, p, strict=True):
        if a != 255:
            ref[a, b] += 1
    ours = confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), c)
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_iou_and_miou_values(device):
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]], device=device)
    iou = iou_from_confusion(cm)
    assert iou[0].item() == pytest.approx(0.75) and iou[1].item() == pytest.approx(2 / 3)
    assert torch.isnan(iou[2])
    assert miou(cm).item() == pytest.approx((0.75 + 2 / 3) / 3)


def test_synthia_protocols():
    cm = torch.diag(torch.arange(1, 20)).long()
    cm[9, 9] = 0  # terrain absent in the ground truth
    cm[0, 9] = 5  # road pixels predicted as terrain
    s16 = protocol_scores(cm, "synthia16")
    iou = torch.nan_to_num(iou_from_confusion(cm), nan=0.0)
    # papers' form: mean over 19 × 19/16 with the absent three zeroed
    rescaled = iou.clone()
    rescaled[[9, 14, 16]] = 0
    assert s16.miou == pytest.approx(float(rescaled.mean() * 19 / 16))
    r13 = rescaled.clone()
    r13[[3, 4, 5]] = 0
    assert protocol_scores(cm, "synthia13").miou == pytest.approx(float(r13.mean() * 19 / 13))
    assert len(s16.iou) == 16
    # strict: a terrain GT pixel predicted as road no longer hurts road's IoU
    cm2 = torch.diag(torch.full((19,), 10)).long()
    cm2[9, 0] = 10
    loose, strict = protocol_scores(cm2, "synthia16"), protocol_scores(cm2, "synthia16_strict")
    assert strict.miou == pytest.approx(1.0) and loose.miou < 1.0
    with pytest.raises(ValueError, match="9x9"):
        protocol_scores(cm, "oxford9")


def test_accumulator_and_errors(device):
    cm = ConfusionMatrix(3).to(device)
    cm.update(torch.tensor([0, 1, 2], device=device), torch.tensor([0, 1, 1], device=device))
    cm.update(torch.tensor([[2]], device=device), torch.tensor([[255]], device=device))
    assert cm.compute().sum().item() == 3
    assert cm.scores().pixel_accuracy == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 2)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(torch.tensor([0.0]), torch.tensor([0]), 2)
    cm.reset()
    assert cm.compute().sum().item() == 0
