"""evaluate_segmentation against an independent loop: one pass, multi-scale + flip, resizing,
protocols, errors, the model's mode and the callbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uda_selftrain as ust
from uda_selftrain.augment import normalize


class _Net(nn.Module):
    """A small conv net with stride 2 (so its logits need upsampling)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


def _data(n=3, h=12, w=20, c=4, label_size=None):
    g = torch.Generator().manual_seed(1)
    ls = label_size or (h, w)
    return [
        {
            "image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
            "label": torch.where(
                torch.rand(ls, generator=g) < 0.1, 255, torch.randint(0, c, ls, generator=g)
            ),
            "name": f"img{i}",
        }
        for i in range(n)
    ]


def _manual(model, data, c, scales=(1.0,), flip=False, input_size=None):
    model.eval()
    cm = torch.zeros(c, c, dtype=torch.long)
    with torch.no_grad():
        for item in data:
            image, label = item["image"][None], item["label"]
            base = input_size or tuple(image.shape[-2:])
            total = 0
            for s in scales:
                size = (round(base[0] * s), round(base[1] * s))
                x = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
                x = normalize(x.round().clamp(0, 255).to(torch.uint8))
                for m in (False, True) if flip else (False,):
                    out = model(x.flip(-1) if m else x)
                    out = out.flip(-1) if m else out
                    out = F.interpolate(out, size=label.shape, mode="bilinear", align_corners=False)
                    total = total + torch.softmax(out, 1)
            pred = total.argmax(1)[0]
            keep = label != 255
            for t, p in zip(label[keep].tolist(), pred[keep].tolist(), strict=True):
                cm[t, p] += 1
    return cm


@pytest.mark.parametrize(
    ("scales", "flip", "input_size"),
    [((1.0,), False, None), ((0.75, 1.0, 1.25), True, None), ((1.0,), False, (24, 40))],
)
def test_matches_an_independent_loop(scales, flip, input_size):
    model = _Net()
    data = _data(label_size=(16, 24) if input_size else None)
    got = ust.evaluate_segmentation(model, data, 4, scales=scales, flip=flip, input_size=input_size)
    cm = _manual(model, data, 4, scales, flip, input_size)
    assert torch.equal(got.confusion, cm)
    tp = cm.diag().double()
    iou = torch.nan_to_num(tp / (cm.sum(0) + cm.sum(1) - tp).double(), nan=0.0)
    assert got.miou == pytest.approx(float(iou.mean()))
    assert got.iou == pytest.approx(iou.tolist())
    assert got.classes == [0, 1, 2, 3]
    assert set(got.to_dict()) == {"miou", "iou", "classes", "pixel_accuracy"}


def test_protocols_mode_and_callbacks():
    model = _Net(19).train()
    data = _data(c=19)
    seen, steps = [], []
    plain = ust.evaluate_segmentation(
        model,
        data,
        19,
        on_prediction=lambda i, item, pred: seen.append((i, item["name"], tuple(pred.shape))),
        progress=lambda done, total: steps.append((done, total)),
    )
    assert model.training  # restored
    assert seen == [(i, f"img{i}", (12, 20)) for i in range(3)]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert ust.evaluate_segmentation(model, data, 19, protocol="all").miou == plain.miou
    s16 = ust.evaluate_segmentation(model, data, 19, protocol="synthia16")
    assert len(s16.classes) == 16 and 9 not in s16.classes


def test_errors():
    model, data = _Net(), _data()
    with pytest.raises(ValueError, match="protocol"):
        ust.evaluate_segmentation(model, data, 4, protocol="cityscapes19")
    with pytest.raises(ValueError, match="unknown protocol"):
        ust.evaluate_segmentation(model, data, 4, protocol="coco")
    with pytest.raises(ValueError, match="scales"):
        ust.evaluate_segmentation(model, data, 4, scales=(0.0,))
    with pytest.raises(ValueError, match="input_size"):
        ust.evaluate_segmentation(model, data, 4, input_size=(8,))
    with pytest.raises(ValueError, match="'image' and 'label'"):
        ust.evaluate_segmentation(model, [{"image": data[0]["image"]}], 4)
    with pytest.raises(ValueError, match="target has value"):
        bad = [dict(data[0], label=torch.full((12, 20), 7))]
        ust.evaluate_segmentation(model, bad, 4)
