"""Scoring a segmentation model on a labelled dataset under a named protocol: one call.

:func:`evaluate_segmentation` runs the model over every item of a dataset (``image`` ``(3, H, W)``
uint8, ``label`` ``(H', W')`` train ids), optionally at several scales and mirrored, upsamples the
logits to the label's size, accumulates one confusion matrix (sharded across ranks, summed with
``all_reduce``) and returns the protocol's scores. It is the evaluation of every example and of
the results scripts, so a number in a table and a number from ``examples/evaluate.py`` are made
the same way.

For one pass (scale 1, no flip) the prediction is the arg-max of the upsampled logits. With
several passes it is the arg-max of the mean of their softmax probabilities, each computed at the
label's size (the multi-scale testing of the DeepLab papers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_int
from .augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from .distributed import rank, world_size
from .metrics import ConfusionMatrix, Protocol, get_protocol

__all__ = ["SegmentationScores", "evaluate_segmentation"]


class SegmentationScores(NamedTuple):
    """What :func:`evaluate_segmentation` returns (``iou`` and ``classes`` in the protocol's
    class order; ``confusion`` the ``(C, C)`` matrix over all ranks)."""

    miou: float
    iou: list[float]
    classes: list[int]
    pixel_accuracy: float
    confusion: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able scores (without the matrix)."""
        return {
            "miou": self.miou,
            "iou": self.iou,
            "classes": self.classes,
            "pixel_accuracy": self.pixel_accuracy,
        }


def _resized(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 batch resized bilinearly and rounded back to uint8 (as an image file would be)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def _predict(
    model: nn.Module,
    image: torch.Tensor,
    label_size: tuple[int, int],
    base: tuple[int, int],
    scales: Sequence[float],
    flip: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    passes = [(s, m) for s in scales for m in ((False, True) if flip else (False,))]
    total: torch.Tensor | None = None
    for s, mirrored in passes:
        size = (max(8, round(base[0] * s)), max(8, round(base[1] * s))) if s != 1.0 else base
        x = normalize(_resized(image, size), mean=mean, std=std)
        logits = model(x.flip(-1) if mirrored else x).float()
        if mirrored:
            logits = logits.flip(-1)
        logits = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=False)
        if len(passes) == 1:
            return logits.argmax(1)
        p = torch.softmax(logits, 1)
        total = p if total is None else total.add_(p)
    assert total is not None
    return total.argmax(1)


def evaluate_segmentation(
    model: nn.Module,
    dataset: Any,
    num_classes: int,
    *,
    protocol: str | Protocol | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    input_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    on_prediction: Callable[[int, dict[str, Any], torch.Tensor], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentationScores:
    """Score ``model`` on a labelled ``dataset`` under ``protocol`` (mIoU, per-class IoU).

    Args:
        model: maps normalised ``(1, 3, h, w)`` images to ``(1, C, h', w')`` logits; put in eval
            mode for the call and restored after.
        dataset: items with ``image`` ``(3, H, W)`` uint8 and ``label`` ``(H', W')`` integer
            train ids (``255`` ignored), e.g. ``Cityscapes(root, "val")``.
        num_classes: ``C``.
        protocol: a name of :data:`~uda_selftrain.PROTOCOLS` (``"cityscapes19"``, ``"synthia16"``,
            ``"oxford9"`` …), a :class:`~uda_selftrain.metrics.Protocol`, or ``None``/``"all"``
            for the plain mean over the ``C`` classes.
        scales: resize factors of ``input_size`` (multi-scale testing); ``(1.0,)`` = one pass.
        flip: also run the mirrored images.
        input_size: ``(h, w)`` the images are resized to before the model (e.g. 768 × 1536 for
            Cityscapes at the papers' evaluation size); ``None`` keeps each image's size.
        device: where the model and the batches run (default: the model's).
        on_prediction: called as ``on_prediction(index, item, prediction)`` with the ``(H', W')``
            predicted map of every item this rank scores (e.g. to save a few of them).
        progress: called as ``progress(done, total)`` after each item of this rank.

    Items are split across ranks (rank ``r`` of ``w`` scores items ``r, r + w, …``); the confusion
    matrix is summed over ranks, so every rank returns the same scores.

    >>> import torch
    >>> from torch import nn
    >>> data = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "label": torch.zeros(4, 4, dtype=torch.long)}]
    >>> model = nn.Conv2d(3, 2, 1)
    >>> with torch.no_grad():
    ...     _ = model.bias.copy_(torch.tensor([1.0, 0.0])); _ = model.weight.zero_()
    >>> evaluate_segmentation(model, data, 2).miou
    0.5
    """
    c = check_positive_int("num_classes", num_classes)
    if not scales or any(not (isinstance(s, (int, float)) and s > 0) for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales!r}")
    if input_size is not None and not (
        len(input_size) == 2 and all(isinstance(v, int) and v > 0 for v in input_size)
    ):
        raise ValueError(f"input_size must be a pair of positive ints, got {input_size!r}")
    proto = None if protocol in (None, "all") else get_protocol(protocol)
    if proto is not None and proto.num_classes != c:
        raise ValueError(f"protocol {proto.name!r} is for {proto.num_classes} classes, not {c}")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    meter = ConfusionMatrix(c).to(device)
    indices = range(rank(), len(dataset), world_size())
    try:
        for done, i in enumerate(indices, 1):
            item = dataset[i]
            if "image" not in item or "label" not in item:
                raise ValueError(f"dataset item {i} must hold 'image' and 'label'")
            image = item["image"].unsqueeze(0).to(device)
            label = item["label"].to(device).long()
            base = tuple(input_size) if input_size is not None else tuple(image.shape[-2:])
            pred = _predict(
                model, image, tuple(label.shape), base, scales, flip, mean, std
            )  # (1, H', W')
            meter.update(pred, label.unsqueeze(0))
            if on_prediction is not None:
                on_prediction(i, item, pred[0])
            if progress is not None:
                progress(done, len(indices))
    finally:
        model.train(was_training)
    confusion = meter.compute()
    scores = (
        meter.scores(proto)
        if proto is not None
        else meter.scores(Protocol("all", c, tuple(range(c))))
    )
    return SegmentationScores(
        scores.miou, scores.iou, scores.classes, scores.pixel_accuracy, confusion
    )
