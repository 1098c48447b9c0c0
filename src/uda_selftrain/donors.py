"""Donor drawing for hard-aware copy-paste: which target images give their hard classes (§3.2)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ._checks import (
    check_positive_int,
    check_unit_interval,
)
from .class_statistics import ClassStatistics

__all__ = [
    "DonorDraw",
    "DonorSampler",
]


class DonorDraw(NamedTuple):
    """The donors drawn for one sample (or a batch).

    Attributes:
        classes: int64 class that drew each donor, ``(D,)`` (or ``(N, D)`` padded with -1).
        donors: int64 sample index of each donor in the statistics, same shape, -1 = none.
    """

    classes: torch.Tensor
    donors: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """bool, same shape: the real donors (false on the -1 padding of :meth:`DonorSampler.draw_batch`).

        Pass it as ``donor_valid``: without it, padding slots would paste whatever image index
        they are clamped to.
        """
        return self.donors >= 0


class DonorSampler:
    """Draws hard classes and donor samples for hard-aware copy-paste (method §3.2).

    For each receiving sample: draw a hard class ``c ~ π`` (``π ∝ (1 − v)²`` over the hard set),
    a donor uniformly from ``c``'s pool; the donor covers every hard class it contains. Repeat, each
    next class drawn among the hard classes not yet covered, until ``min_coverage`` of the hard set is
    covered or ``max_donors`` were drawn. ``max_donors=1`` is the public implementation's behaviour.

    Cheap and CPU-only (a few hundred microseconds), so a ``Dataset`` can call :meth:`draw` in its
    ``__getitem__`` and load the donor images in its workers.

    Args:
        stats: the round's :class:`ClassStatistics`.
        num_hard: ``K``, the number of hard classes; default ``round(14/19 · C)`` (14 of 19, the
            paper's).
        absent_classes: classes that can never occur in the source domain (SYNTHIA: 9, 14, 16).
        max_donors: most donors per sample (default 3).
        min_coverage: stop once this fraction of the hard set is covered (default 0.5).
        drop_fraction: fraction of each pool (fewest pixels first) dropped (default 0.1).

    >>> import torch
    >>> stats = ClassStatistics(3)
    >>> stats.add(["a", "b", "c"], torch.tensor([[5, 1, 0], [9, 0, 4], [3, 2, 2]]))
    >>> stats.class_values = torch.tensor([0.95, 0.4, 0.5], dtype=torch.float64)
    >>> sampler = DonorSampler(stats, num_hard=2, drop_fraction=0.0)
    >>> draw = sampler.draw(generator=torch.Generator().manual_seed(0))
    >>> draw.donors.numel() >= 1 and set(draw.classes.tolist()) <= {1, 2}
    True
    """

    def __init__(
        self,
        stats: ClassStatistics,
        *,
        num_hard: int | None = None,
        absent_classes: Sequence[int] = (),
        max_donors: int = 3,
        min_coverage: float = 0.5,
        drop_fraction: float = 0.1,
    ) -> None:
        if not isinstance(stats, ClassStatistics):
            raise TypeError(f"stats must be a ClassStatistics, got {type(stats).__name__}")
        self.max_donors = check_positive_int("max_donors", max_donors)
        self.min_coverage = check_unit_interval("min_coverage", min_coverage)
        self.difficulty = stats.difficulty(
            num_hard=num_hard, absent_classes=absent_classes, drop_fraction=drop_fraction
        )
        self.pools = stats.donor_pools(drop_fraction=drop_fraction)
        self.hard_mask = self.difficulty.hard_mask.cpu()
        self.probabilities = self.difficulty.probabilities.cpu()
        # Which hard classes each sample would paste, i.e. cover.
        self._covers = (stats.sample_class_pixels > 0) & self.hard_mask
        num_hard_eligible = int(self.hard_mask.sum())
        self._needed = max(1, math.ceil(self.min_coverage * num_hard_eligible - 1e-9))

    @property
    def hard_classes(self) -> torch.Tensor:
        """``(K',)`` the hard classes, in increasing class value."""
        return self.difficulty.hard_classes

    def draw(self, *, generator: torch.Generator | None = None) -> DonorDraw:
        """Draw the donors of one sample; ``(D,)`` tensors with ``0 ≤ D ≤ max_donors``."""
        classes: list[int] = []
        donors: list[int] = []
        covered = torch.zeros_like(self.hard_mask)
        for _ in range(self.max_donors):
            weight = torch.where(covered, torch.zeros_like(self.probabilities), self.probabilities)
            if not bool((weight > 0).any()):
                break
            c = int(torch.multinomial(weight, 1, generator=generator))
            pool = self.pools[c]
            d = int(pool[int(torch.randint(len(pool), (1,), generator=generator))])
            classes.append(c)
            donors.append(d)
            covered |= self._covers[d]
            covered[c] = True
            if int(covered.sum()) >= self._needed:
                break
        return DonorDraw(
            torch.tensor(classes, dtype=torch.int64), torch.tensor(donors, dtype=torch.int64)
        )

    def draw_batch(self, n: int, *, generator: torch.Generator | None = None) -> DonorDraw:
        """Draw for ``n`` samples; ``(n, max_donors)`` tensors padded with -1."""
        check_positive_int("n", n)
        classes = torch.full((n, self.max_donors), -1, dtype=torch.int64)
        donors = torch.full_like(classes, -1)
        for i in range(n):
            d = self.draw(generator=generator)
            classes[i, : len(d.classes)] = d.classes
            donors[i, : len(d.donors)] = d.donors
        return DonorDraw(classes, donors)
