"""Thing-class ImageNet feature distance (FD, DAFormer): keep the encoder's features of "thing"
classes close to a frozen encoder's, so that source training does not overwrite what the
pretrained features know about them.

With ``F_θ`` the student encoder's last features and ``F_I`` a frozen encoder's (DAFormer: the
same architecture with its ImageNet weights) on the same source images, and the source labels
downscaled to the feature grid,

    L_FD = λ · mean_{p : ŷ_p ∈ things} ‖F_θ(x)_p − F_I(x)_p‖₂,        λ = 0.005,

over feature positions whose downscaled label is a thing class. A position's downscaled label is
the most frequent label among the pixels it covers (ignore counted as a class of its own), and
ignore when that label covers less than ``min_ratio`` (0.75) of them — so mixed object borders do
not count. The thing classes of the Cityscapes 19 are pole, traffic light, traffic sign, person,
rider, car, truck, bus, train, motorcycle, bicycle (:data:`CITYSCAPES_THING_CLASSES`; DAFormer's
list).

Pretrained weights are not shipped: pass any frozen encoder, e.g. torchvision's ImageNet ResNet-101
trunk (the docs show how). With no thing-class position the loss is 0 with a zero gradient.

>>> import torch
>>> f_student, f_frozen = torch.ones(1, 4, 2, 2, requires_grad=True), torch.zeros(1, 4, 2, 2)
>>> labels = torch.full((1, 8, 8), 13)                     # "car" everywhere
>>> round(thing_feature_distance(f_student, f_frozen, labels).item(), 4)   # ‖(1,1,1,1)‖ = 2
2.0
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from . import _histogram
from ._checks import (
    check_finite,
    check_float,
    check_labels,
    check_positive_int,
    check_weight,
)

__all__ = [
    "CITYSCAPES_THING_CLASSES",
    "ThingFeatureDistance",
    "downscale_labels",
    "thing_feature_distance",
]

CITYSCAPES_THING_CLASSES: tuple[int, ...] = (5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def downscale_labels(
    labels: torch.Tensor,
    size: tuple[int, int],
    *,
    num_classes: int,
    min_ratio: float = 0.75,
    ignore_index: int = 255,
) -> torch.Tensor:
    """``(N, h, w)`` majority label of each cell of an ``h × w`` grid over ``(N, H, W)`` labels.

    Cell ``(i, j)`` covers rows ``⌊i·H/h⌋ … ⌊(i+1)·H/h⌋ − 1`` (and the same for columns): for
    ``H = s·h`` exactly DAFormer's ``s × s`` average pooling of one-hot labels. The cell's label is
    its most frequent value (ignore competing as a class; ties go to the lower class), or
    ``ignore_index`` when that value covers less than ``min_ratio`` of the cell. Counted with one
    histogram (no one-hot tensor).

    Shape:
        labels ``(N, H, W)`` → ``(N, h, w)`` int64, ``h ≤ H``, ``w ≤ W``.

    >>> import torch
    >>> y = torch.tensor([[[1, 1, 2, 2], [1, 1, 0, 255]]])  # right cell: half of it is 2
    >>> downscale_labels(y, (1, 2), num_classes=3).tolist()
    [[[1, 255]]]
    """
    check_positive_int("num_classes", num_classes)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of shape (N, H, W), got {got}")
    y = check_labels("labels", labels, tuple(labels.shape), num_classes, ignore_index)
    n, hh, ww = y.shape
    if n == 0:
        raise ValueError("labels must hold at least one label map (N >= 1), got an empty batch")
    if not (isinstance(size, (tuple, list, torch.Size)) and len(size) == 2):
        raise ValueError(f"size must be a pair (h, w), got {size!r}")
    h, w = int(size[0]), int(size[1])
    if not (0 < h <= hh and 0 < w <= ww):
        raise ValueError(
            f"size must satisfy 0 < (h, w) <= labels' (H, W) = {(hh, ww)}, got {size!r}"
        )
    ratio = float(min_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio}")
    dev = y.device
    k = num_classes + 1  # ignore is the last bin
    rows = torch.arange(hh, device=dev) * h // hh
    cols = torch.arange(ww, device=dev) * w // ww
    cell = (rows[:, None] * w + cols[None, :]).view(1, -1)  # (1, H·W)
    code = torch.where(y == ignore_index, num_classes, y.long()).view(n, -1)
    img = torch.arange(n, device=dev)[:, None] * (h * w * k)
    hist = _histogram.count((img + cell * k + code).view(-1), n * h * w * k).view(n, h, w, k)
    top, label = hist.max(dim=3)
    size_of_cell = hist.sum(3)
    out = torch.where(label == num_classes, ignore_index, label)
    return torch.where(top < ratio * size_of_cell, ignore_index, out)


def _thing_mask(labels: torch.Tensor, things: Sequence[int], num_classes: int) -> torch.Tensor:
    table = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels.device)
    table[torch.as_tensor(list(things), dtype=torch.long, device=labels.device)] = True
    return table[labels.clamp(max=num_classes)]  # ignore (≥ C) maps to the False last entry


def _check_things(things: object, num_classes: int) -> tuple[int, ...]:
    if isinstance(things, (str, bytes)) or not isinstance(things, Sequence):
        raise TypeError(f"thing_classes must be a sequence of class indices, got {things!r}")
    out = tuple(things)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in out):
        raise TypeError(f"thing_classes must hold ints, got {things!r}")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"thing_classes {bad} lie outside [0, {num_classes})")
    return out


def thing_feature_distance(
    features: torch.Tensor,
    frozen_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    thing_classes: Sequence[int] = CITYSCAPES_THING_CLASSES,
    num_classes: int = 19,
    min_ratio: float = 0.75,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Mean L2 distance between student and frozen features over thing-class positions.

    Args:
        features: ``(N, D, h, w)`` student encoder features (carry the gradient).
        frozen_features: ``(N, D, h, w)`` the frozen encoder's features of the same images
            (detached here).
        labels: ``(N, H, W)`` int source labels (train ids), downscaled to ``(h, w)`` by
            :func:`downscale_labels`.
        thing_classes: classes whose positions count.
        num_classes: ``C``.
        min_ratio: purity a feature cell needs to keep its label.

    Returns:
        Scalar float32 (float64 for float64 input): unweighted distance (multiply by ``λ``).

    Shape:
        features, frozen_features ``(N, D, h, w)``, labels ``(N, H, W)`` → ``()``.

    >>> import torch
    >>> f = torch.randn(2, 8, 4, 4, requires_grad=True)
    >>> thing_feature_distance(f, f.detach(), torch.randint(0, 19, (2, 32, 32))).item()
    0.0
    """
    f = check_float("features", features, ndim=4, shape_hint="(N, D, h, w)")
    g = check_float("frozen_features", frozen_features, ndim=4, shape_hint="(N, D, h, w)")
    if f.shape[0] == 0:
        raise ValueError("features must hold at least one image (N >= 1), got an empty batch")
    if g.shape != f.shape:
        raise ValueError(
            f"frozen_features must have the features' shape {tuple(f.shape)}, got {tuple(g.shape)}"
        )
    check_positive_int("num_classes", num_classes)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3 or labels.shape[0] != f.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape ({f.shape[0]}, H, W), got {shape}")
    things = _check_things(thing_classes, num_classes)
    check_finite("features", f)
    check_finite("frozen_features", g)
    small = downscale_labels(
        labels.to(f.device),
        (f.shape[2], f.shape[3]),
        num_classes=num_classes,
        min_ratio=min_ratio,
        ignore_index=ignore_index,
    )
    dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
    mask = _thing_mask(small, things, num_classes).to(dtype)  # (N, h, w)
    diff = f.to(dtype) - g.detach().to(dtype)
    # sqrt has an infinite derivative at 0: a tiny floor keeps equal features' gradient finite.
    dist = diff.square().sum(1).clamp(min=1e-12).sqrt()
    return (dist * mask).sum() / mask.sum().clamp(min=1.0)


class ThingFeatureDistance(nn.Module):
    """FD with its frozen encoder held: ``λ ·`` :func:`thing_feature_distance` between the
    student's features and ``encoder(images)``.

    The encoder is deep-copied, put in eval mode and frozen (its parameters need no gradient and
    ``train()`` leaves it in eval mode), so passing the student's own backbone freezes a snapshot.

    Args:
        encoder: maps ``(N, 3, H, W)`` normalised images to ``(N, D, h, w)`` features shaped like
            the student's (e.g. torchvision's ImageNet ResNet trunk for a ResNet student).
        weight: ``λ`` (DAFormer: 0.005).
        thing_classes, num_classes, min_ratio, ignore_index: as in :func:`thing_feature_distance`.

    Shape:
        features ``(N, D, h, w)``, images ``(N, 3, H, W)``, labels ``(N, H, W)`` → ``()``.

    >>> import torch
    >>> from torch import nn
    >>> fd = ThingFeatureDistance(nn.Conv2d(3, 8, 4, stride=4))
    >>> student = nn.Conv2d(3, 8, 4, stride=4)
    >>> x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 19, (2, 32, 32))
    >>> fd(student(x), x, y).shape
    torch.Size([])
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        weight: float = 0.005,
        thing_classes: Sequence[int] = CITYSCAPES_THING_CLASSES,
        num_classes: int = 19,
        min_ratio: float = 0.75,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.thing_classes = _check_things(thing_classes, num_classes)
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.weight = check_weight("weight", weight)
        self.min_ratio = float(min_ratio)
        self.ignore_index = ignore_index

    def train(self, mode: bool = True) -> ThingFeatureDistance:
        super().train(mode)
        self.encoder.eval()  # frozen: batch-norm statistics never move
        return self

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, thing_classes={self.thing_classes}, min_ratio={self.min_ratio}"
        )

    def forward(
        self, features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.encoder(images)
        return self.weight * thing_feature_distance(
            features,
            frozen,
            labels,
            thing_classes=self.thing_classes,
            num_classes=self.num_classes,
            min_ratio=self.min_ratio,
            ignore_index=self.ignore_index,
        )
