"""Online self-training primitives: the confidence-fraction weight and online targets.

These are what DACS/DAFormer-style methods use at every step, so that HIAST's components can be
plugged into them (the instance adaptive selector on the EMA teacher's predictions, hard-aware
copy-paste, region-adaptive regularisation, consistency):

- ClassMix (the mixing DACS uses) is in :mod:`uda_selftrain.mixing`;
- :func:`confidence_weight`: per image, the fraction of pixels whose confidence is at least
  ``threshold`` (0.968 in DACS/DAFormer), the weight of the pseudo-label loss.
- :func:`online_targets`: teacher logits → pseudo-labels (argmax, or an IAS/constant selector's
  choice, 255 = ignored) and the per-image weight, in one call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import (
    check_finite,
    check_float,
    check_tensor,
    check_unit_interval,
)
from .selection import Selector

__all__ = [
    "OnlineTargets",
    "confidence_weight",
    "online_targets",
    "pixel_weights",
]


def confidence_weight(
    scores: torch.Tensor, *, threshold: float = 0.968, probabilities: bool = False
) -> torch.Tensor:
    """``(N,)`` fraction of each image's pixels whose confidence is at least ``threshold``.

    Args:
        scores: ``(N, C, H, W)`` logits (or probabilities with ``probabilities=True``).
        threshold: 0.968 in DACS and DAFormer.

    >>> import torch
    >>> logits = torch.zeros(2, 3, 2, 2)
    >>> logits[0, 0] = 10.0
    >>> confidence_weight(logits).tolist()
    [1.0, 0.0]
    """
    x = check_float("scores", scores, ndim=4, shape_hint="(N, C, H, W)")
    check_finite("scores", x)
    check_unit_interval("threshold", threshold)
    p = x.float() if probabilities else torch.softmax(x.float(), dim=1)
    conf = p.amax(dim=1)
    return (conf >= threshold).float().mean(dim=(1, 2))


def pixel_weights(
    weight: torch.Tensor, size: tuple[int, int], mix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, H, W)`` pixel weights: the image weight everywhere, 1 on pasted source pixels.

    >>> import torch
    >>> pixel_weights(torch.tensor([0.5]), (1, 2), torch.tensor([[[True, False]]])).tolist()
    [[[1.0, 0.5]]]
    """
    check_float("weight", weight, ndim=1, shape_hint="(N,)")
    if mix_mask is not None:
        m = check_tensor("mix_mask", mix_mask)
        if m.dtype != torch.bool or tuple(m.shape) != (weight.shape[0], *size):
            raise ValueError(
                f"mix_mask must be a bool tensor of shape {(weight.shape[0], *size)}, got "
                f"{tuple(m.shape)} {m.dtype}"
            )
    w = weight.view(-1, 1, 1).expand(-1, *size)
    if mix_mask is not None:
        w = torch.where(mix_mask, torch.ones_like(w), w)
    return w.contiguous()


class OnlineTargets(NamedTuple):
    """Output of :func:`online_targets`: ``labels`` ``(N, H, W)`` (255 = ignored), ``weight``
    ``(N,)`` confidence fraction, ``confidence`` ``(N, H, W)``."""

    labels: torch.Tensor
    weight: torch.Tensor
    confidence: torch.Tensor


@torch.no_grad()
def online_targets(
    teacher_logits: torch.Tensor,
    *,
    selector: Selector | None = None,
    threshold: float = 0.968,
) -> OnlineTargets:
    """Pseudo-labels of the EMA teacher for this step and their per-image weight.

    With ``selector=None`` the labels are the arg-max (DACS); with an
    :class:`~uda_selftrain.selection.InstanceAdaptiveSelector` (whose thresholds then move with
    every call: the online use of IAS) or another selector, unselected pixels are 255.

    >>> import torch
    >>> from uda_selftrain.selection import InstanceAdaptiveSelector
    >>> t = online_targets(torch.randn(2, 19, 8, 8) * 5, selector=InstanceAdaptiveSelector(19))
    >>> t.labels.shape, t.weight.shape
    (torch.Size([2, 8, 8]), torch.Size([2]))
    """
    x = check_float("teacher_logits", teacher_logits, ndim=4, shape_hint="(N, C, H, W)")
    check_finite("teacher_logits", x)
    check_unit_interval("threshold", threshold)
    if selector is not None and not isinstance(selector, Selector):
        raise TypeError(
            f"selector must implement uda_selftrain.Selector (e.g. InstanceAdaptiveSelector), got "
            f"{type(selector).__name__}"
        )
    p = torch.softmax(x.float(), dim=1)
    conf, pred = p.max(dim=1)
    weight = (conf >= threshold).float().mean(dim=(1, 2))
    if selector is None:
        return OnlineTargets(pred, weight, conf)
    sel = selector(p, probabilities=True)
    return OnlineTargets(sel.labels.long(), weight, conf)
