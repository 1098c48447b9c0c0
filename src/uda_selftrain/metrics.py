"""Confusion matrix, IoU, mIoU and the named class protocols of the UDA-segmentation papers.

The confusion matrix is one ``bincount`` on the input's device; :class:`ConfusionMatrix`
accumulates it and all-reduces across ranks when asked for the scores (torchvision-references
style). Protocols (method §6):

* ``"cityscapes19"`` — mean over the 19 classes.
* ``"synthia16"`` / ``"synthia13"`` — the papers' rescaled form: the 19-class IoU vector with the
  three classes SYNTHIA lacks (terrain 9, truck 14, train 16) counted as 0, mean × 19/16; for 13,
  also wall 3, fence 4, pole 5 zeroed, × 19/13. This equals the mean over the 16 (13) classes.
* ``"synthia16_strict"`` / ``"synthia13_strict"`` — ground-truth pixels of the excluded classes are
  ignored before scoring (their confusion rows dropped), so a prediction is only judged on pixels of
  kept classes (a kept-class pixel predicted as an excluded class is still a miss); mean over the
  kept classes.
* ``"oxford9"`` — the 9 classes of Cityscapes→Oxford RobotCar (use on 9-class predictions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ._checks import check_ignore_index, check_positive_int, check_tensor, value_checks_enabled
from ._histogram import count
from .distributed import all_reduce_sum

__all__ = [
    "PROTOCOLS",
    "ConfusionMatrix",
    "Protocol",
    "ProtocolScores",
    "confusion_matrix",
    "get_protocol",
    "iou_from_confusion",
    "miou",
    "pixel_accuracy",
    "protocol_scores",
]

SYNTHIA_ABSENT = (9, 14, 16)
SYNTHIA13_ALSO_ABSENT = (3, 4, 5)


@dataclass(frozen=True)
class Protocol:
    """A scoring protocol: which classes the mean runs over and whether excluded GT is ignored.

    Attributes:
        num_classes: size of the confusion matrix it applies to.
        classes: the classes averaged over.
        strict: ignore ground-truth pixels of the classes outside ``classes`` before scoring.
    """

    name: str
    num_classes: int
    classes: tuple[int, ...]
    strict: bool = False


def _kept(excluded: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(c for c in range(19) if c not in excluded)


PROTOCOLS: dict[str, Protocol] = {
    "cityscapes19": Protocol("cityscapes19", 19, tuple(range(19))),
    "synthia16": Protocol("synthia16", 19, _kept(SYNTHIA_ABSENT)),
    "synthia13": Protocol("synthia13", 19, _kept(SYNTHIA_ABSENT + SYNTHIA13_ALSO_ABSENT)),
    "synthia16_strict": Protocol("synthia16_strict", 19, _kept(SYNTHIA_ABSENT), strict=True),
    "synthia13_strict": Protocol(
        "synthia13_strict", 19, _kept(SYNTHIA_ABSENT + SYNTHIA13_ALSO_ABSENT), strict=True
    ),
    "oxford9": Protocol("oxford9", 9, tuple(range(9))),
}


OutOfRange = Literal["error", "wrong"]


def confusion_matrix(
    prediction: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    *,
    ignore_index: int = 255,
    out_of_range: OutOfRange = "error",
) -> torch.Tensor:
    """Confusion matrix, rows = ground truth, columns = prediction.

    Pixels whose target is ``ignore_index`` are skipped; another target outside ``[0, C)`` is a
    ``ValueError`` while value checks are on (skipped with them off). A prediction
    outside ``[0, C)`` (e.g. an unselected pseudo-label, 255) is never clamped into a class:

    * ``out_of_range="error"`` (default): ``ValueError`` naming the value (a host sync, while value
      checks are on; with them off such pixels are dropped);
    * ``out_of_range="wrong"``: counted as a miss of the ground-truth class, in an extra last
      column, so the matrix is ``(C, C + 1)``; :func:`iou_from_confusion`, :func:`pixel_accuracy`
      and :func:`protocol_scores` accept that shape.

    Args:
        prediction: integer tensor of any shape (e.g. ``(N, H, W)``).
        target: integer tensor of the same shape, on the same device.
        num_classes: ``C``.

    Returns:
        ``(C, C)`` int64 (``(C, C + 1)`` with ``out_of_range="wrong"``).

    >>> import torch
    >>> confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2).tolist()
    [[1, 1], [0, 1]]
    >>> confusion_matrix(torch.tensor([0, 255]), torch.tensor([0, 1]), 2, out_of_range="wrong").tolist()
    [[1, 0, 0], [0, 0, 1]]
    """
    c = check_positive_int("num_classes", num_classes)
    check_ignore_index(ignore_index, c)
    if out_of_range not in ("error", "wrong"):
        raise ValueError(f"out_of_range must be 'error' or 'wrong', got {out_of_range!r}")
    p = check_tensor("prediction", prediction)
    t = check_tensor("target", target)
    for name, x in (("prediction", p), ("target", t)):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if p.shape != t.shape:
        raise ValueError(
            f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}"
        )
    if p.device != t.device:
        raise ValueError(f"target must be on the prediction's device {p.device}, got {t.device}")
    t = t.reshape(-1).long()
    p = p.reshape(-1).long()
    valid = (t >= 0) & (t < c) & (t != ignore_index)
    if value_checks_enabled() and t.numel() and bool(((t != ignore_index) & ~valid).any()):
        bad = t[(t != ignore_index) & ~valid][0]
        raise ValueError(
            f"target has value {int(bad)} outside [0, {c}) that is not the ignore index "
            f"{ignore_index} (map the labels to train ids first)"
        )
    # One extra column collects the out-of-range predictions; one extra bin the skipped pixels.
    cols = c + 1
    size = c * cols
    column = torch.where((p >= 0) & (p < c), p, c)
    index = torch.where(valid, t * cols + column, size)
    cm = count(index, size + 1)[:size].view(c, cols)
    if out_of_range == "wrong":
        return cm
    if value_checks_enabled() and bool(cm[:, c].any()):
        bad = p[valid & (column == c)][0]
        raise ValueError(
            f"prediction has value {int(bad)} outside [0, {c}); pass out_of_range='wrong' to count "
            "such pixels as misses (e.g. when scoring pseudo-labels with unselected pixels)"
        )
    return cm[:, :c].contiguous()


def _check_confusion(confusion: object) -> torch.Tensor:
    cm = check_tensor("confusion", confusion)
    if cm.dim() != 2 or cm.shape[1] not in (cm.shape[0], cm.shape[0] + 1):
        raise ValueError(f"confusion must have shape (C, C) or (C, C + 1), got {tuple(cm.shape)}")
    return cm


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU ``TP / (TP + FP + FN)`` (float64); NaN for a class absent from GT and predictions.

    >>> import torch
    >>> iou_from_confusion(torch.tensor([[1, 1], [0, 1]])).tolist()
    [0.5, 0.5]
    """
    cm = _check_confusion(confusion).double()
    c = cm.shape[0]
    tp = cm.diagonal()
    # The optional last column (out-of-range predictions) adds to a class's misses, not to any
    # class's false positives.
    union = cm[:, :c].sum(0) + cm.sum(1) - tp
    return tp / union  # 0/0 = NaN marks a class that never appears


def pixel_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Fraction of correctly labelled (non-ignored) pixels.

    >>> import torch
    >>> pixel_accuracy(torch.tensor([[1, 1], [0, 1]])).item()
    0.6666666666666666
    """
    cm = _check_confusion(confusion).double()
    return cm.diagonal().sum() / cm.sum().clamp(min=1)


def miou(confusion: torch.Tensor, *, classes: tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean IoU over ``classes`` (all by default), NaN classes counted as 0 like the papers' tables.

    >>> import torch
    >>> miou(torch.tensor([[1, 1], [0, 1]])).item()
    0.5
    """
    iou = torch.nan_to_num(iou_from_confusion(confusion), nan=0.0)
    if classes is not None:
        chosen = list(classes)
        bad = [
            k
            for k in chosen
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(iou)
        ]
        if bad or not chosen:
            raise ValueError(
                f"classes must be a non-empty sequence of class indices in [0, {len(iou)}), "
                f"got {classes!r}"
            )
        iou = iou[chosen]
    return iou.mean()


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The :class:`Protocol` named ``protocol`` (or ``protocol`` itself).

    >>> get_protocol("oxford9").num_classes
    9
    """
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return PROTOCOLS[protocol]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}"
        ) from None


class ProtocolScores(NamedTuple):
    """Scores under a protocol: ``miou`` (float in ``[0, 1]``), ``iou`` (per class, in the
    protocol's class order), ``classes`` (those class indices) and ``pixel_accuracy``."""

    miou: float
    iou: list[float]
    classes: list[int]
    pixel_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able scores."""
        return self._asdict()


def protocol_scores(confusion: torch.Tensor, protocol: str | Protocol) -> ProtocolScores:
    """Scores of a confusion matrix under a named protocol (see the module docstring).

    Returns a :class:`ProtocolScores` (named fields ``miou``, ``iou``, ``classes``,
    ``pixel_accuracy``; ``.to_dict()`` for JSON).

    >>> import torch
    >>> cm = torch.eye(19, dtype=torch.long) * 10
    >>> protocol_scores(cm, "synthia13").miou
    1.0
    """
    proto = get_protocol(protocol)
    _check_confusion(confusion)
    if confusion.shape[0] != proto.num_classes:
        raise ValueError(
            f"protocol {proto.name!r} needs a {proto.num_classes}x{proto.num_classes} confusion "
            f"matrix, got {tuple(confusion.shape)}"
        )
    cm = confusion
    if proto.strict:
        keep = torch.zeros(proto.num_classes, dtype=torch.bool, device=cm.device)
        keep[list(proto.classes)] = True
        cm = cm * keep[:, None]
    iou = torch.nan_to_num(iou_from_confusion(cm), nan=0.0)[list(proto.classes)]
    return ProtocolScores(
        float(iou.mean()),
        [float(v) for v in iou],
        list(proto.classes),
        float(pixel_accuracy(cm)),
    )


class ConfusionMatrix(nn.Module):
    """Accumulating confusion matrix; :meth:`compute` all-reduces it across ranks.

    >>> import torch
    >>> cm = ConfusionMatrix(2)
    >>> cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    >>> cm.compute().tolist()
    [[1, 1], [0, 0]]
    >>> round(cm.scores().miou, 3)
    0.25
    """

    matrix: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        out_of_range: OutOfRange = "error",
        sync: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        if out_of_range not in ("error", "wrong"):
            raise ValueError(f"out_of_range must be 'error' or 'wrong', got {out_of_range!r}")
        self.ignore_index = check_ignore_index(ignore_index, self.num_classes)
        self.out_of_range: OutOfRange = out_of_range
        self.sync = bool(sync)
        cols = num_classes + (out_of_range == "wrong")
        self.register_buffer("matrix", torch.zeros(num_classes, cols, dtype=torch.int64))

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` first, then ``target`` (integer tensors of one shape)."""
        check_tensor("prediction", prediction)
        check_tensor("target", target)
        self.matrix.add_(
            confusion_matrix(
                prediction.to(self.matrix.device),
                target.to(self.matrix.device),
                self.num_classes,
                ignore_index=self.ignore_index,
                out_of_range=self.out_of_range,
            )
        )

    def compute(self) -> torch.Tensor:
        """The matrix summed over ranks (this rank's when ``sync=False`` or without a group)."""
        return all_reduce_sum(self.matrix) if self.sync else self.matrix.clone()

    def scores(self, protocol: str | Protocol | None = None) -> ProtocolScores:
        """Scores under ``protocol``; without one, the plain mean over all ``C`` classes (no
        SYNTHIA-16/13 or Oxford-9 convention: name the protocol to report a paper's number)."""
        if protocol is None:
            protocol = Protocol("all", self.num_classes, tuple(range(self.num_classes)))
        return protocol_scores(self.compute(), protocol)
