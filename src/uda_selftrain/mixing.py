"""Hard-aware pseudo-label augmentation (HPLA), part 1: class difficulty (HIAST §3.3; SPEC §3.2).

The *class value* ``v_c`` (momentum average of the mean confidence of the pixels selected as ``c``,
kept by :class:`~uda_selftrain.selection.InstanceAdaptiveSelector`) measures how easy a class is.
The hard classes are the ``K`` with the smallest values, and a hard class is drawn for copy-paste
with probability ``π_c ∝ (1 − v_c)²`` renormalised over the hard set.

Unlike the public implementation, classes that can never occur (e.g. SYNTHIA's terrain, truck and
train) and classes without a donor image are excluded *before* normalising, so the probabilities
never become NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._checks import check_float, check_positive_int

__all__ = ["ClassDifficulty", "class_difficulty", "sampling_probabilities"]


def sampling_probabilities(
    class_values: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``π_c ∝ (1 − v_c)²`` over the classes where ``mask`` is true (all by default), 0 elsewhere.

    Args:
        class_values: ``(C,)`` class values in ``[0, 1]``.
        mask: optional ``(C,)`` bool, the classes that may be drawn.

    Returns:
        ``(C,)`` float64 probabilities summing to 1, or all zeros when no class may be drawn (or
        every allowed class has value 1).

    >>> import torch
    >>> sampling_probabilities(torch.tensor([0.5, 0.0, 1.0])).tolist()
    [0.2, 0.8, 0.0]
    """
    v = check_float("class_values", class_values, ndim=1, shape_hint="(C,)").double()
    weight = (1.0 - v.clamp(0.0, 1.0)) ** 2
    if mask is not None:
        weight = torch.where(mask.to(weight.device), weight, torch.zeros_like(weight))
    total = weight.sum()
    return torch.where(total > 0, weight / total.clamp(min=torch.finfo(torch.float64).tiny), weight)


class ClassDifficulty(NamedTuple):
    """Hard classes and how to draw them.

    Attributes:
        hard_classes: ``(K',)`` int64 hard classes in increasing class value (``K' ≤ K`` when
            classes were excluded).
        probabilities: ``(C,)`` float64 drawing probability of every class (0 outside the hard set).
        hard_mask: ``(C,)`` bool membership of the hard set.
    """

    hard_classes: torch.Tensor
    probabilities: torch.Tensor
    hard_mask: torch.Tensor


def class_difficulty(
    class_values: torch.Tensor,
    num_hard: int = 14,
    *,
    absent_classes: Sequence[int] = (),
    has_donor: torch.Tensor | None = None,
) -> ClassDifficulty:
    """The hard classes (the ``num_hard`` smallest class values) and their drawing probabilities.

    Args:
        class_values: ``(C,)`` class values ``v``.
        num_hard: ``K`` (14 of 19 in the published setting).
        absent_classes: classes that can never occur (SYNTHIA: 9, 14, 16); never hard.
        has_donor: optional ``(C,)`` bool, whether any target image contains the class; classes
            without a donor are never hard.

    Ties in value keep the lower class index first (stable sort), as ``numpy.argsort(kind="stable")``.

    >>> import torch
    >>> d = class_difficulty(torch.tensor([0.9, 0.3, 0.6, 0.2]), num_hard=2, absent_classes=[3])
    >>> d.hard_classes.tolist(), [round(p, 3) for p in d.probabilities.tolist()]
    ([1, 2], [0.0, 0.754, 0.246, 0.0])
    """
    v = check_float("class_values", class_values, ndim=1, shape_hint="(C,)")
    c = v.shape[0]
    check_positive_int("num_hard", num_hard)
    eligible = torch.ones(c, dtype=torch.bool, device=v.device)
    for a in absent_classes:
        if not 0 <= int(a) < c:
            raise ValueError(f"absent_classes must lie in [0, {c}), got {a}")
        eligible[int(a)] = False
    if has_donor is not None:
        if has_donor.shape != (c,):
            raise ValueError(f"has_donor must have shape ({c},), got {tuple(has_donor.shape)}")
        eligible &= has_donor.to(device=v.device, dtype=torch.bool)
    # Ineligible classes sort last; among eligible ones, stable ascending order of value.
    key = torch.where(eligible, v.double(), torch.full_like(v, float("inf"), dtype=torch.float64))
    order = torch.sort(key, stable=True).indices
    k = min(num_hard, int(eligible.sum()))
    hard = order[:k]
    hard_mask = torch.zeros(c, dtype=torch.bool, device=v.device)
    hard_mask[hard] = True
    return ClassDifficulty(hard, sampling_probabilities(v, hard_mask), hard_mask)
