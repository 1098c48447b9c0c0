"""Collapse diagnostics: is a class vanishing from the pseudo-labels?

Self-training can silently lose minority classes: a weak model predicts them rarely, the selector
keeps fewer of them, the next model predicts them even more rarely. These functions compare, round
by round, each class's share of the selected pseudo-labels with the source label prior and with the
previous round, and warn (:class:`CollapseWarning`) when a class is vanishing.

For ``C`` classes, with ``n_c`` pixels pseudo-labelled ``c`` out of ``T`` target pixels:

* ``share_c = n_c / T`` — how much of the target the class covers in the pseudo-labels;
* ``composition_c = n_c / Σ_k n_k`` — its share *among the selected pixels*;
* ``ratio_to_prior_c = composition_c / prior_c`` — 1 when the class is as frequent in the
  pseudo-labels as in the source labels;
* ``change_c = composition_c / previous_composition_c`` — the change since the previous round.

A class is **vanishing** when it exists in the source (``prior_c ≥ min_prior``) and either
``ratio_to_prior_c < vanish_ratio`` (default 0.1: under a tenth of its prior share) or
``change_c < drop_ratio`` (default 0.25: lost three quarters of its share in one round).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from ._checks import check_positive_int, check_tensor
from ._histogram import count

__all__ = [
    "CollapseMonitor",
    "CollapseWarning",
    "PseudoLabelDiagnostics",
    "class_counts",
    "class_prior",
    "pseudo_label_diagnostics",
]


class CollapseWarning(UserWarning):
    """A class is vanishing from the pseudo-labels (see :mod:`uda_selftrain.diagnostics`).

    Turn it into an error with ``warnings.simplefilter("error", CollapseWarning)``.
    """


def class_counts(
    labels: torch.Tensor, num_classes: int, *, ignore_index: int = 255
) -> torch.Tensor:
    """``(C,)`` int64 pixels of each class in ``labels``, on its device, without a host sync.

    Values outside ``[0, C)`` (the ignore index) are not counted. Use it to accumulate, e.g., the
    pixels pasted per class during a round (``HardAwareViews.pasted``).

    >>> import torch
    >>> class_counts(torch.tensor([[0, 2, 2, 255]]), 3).tolist()
    [1, 0, 2]
    """
    c = check_positive_int("num_classes", num_classes)
    t = check_tensor("labels", labels)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {t.dtype}")
    flat = t.reshape(-1).long()
    index = torch.where((flat >= 0) & (flat < c) & (flat != ignore_index), flat, c)
    return count(index, c + 1)[:c]


def class_prior(
    labels: torch.Tensor | Iterable[torch.Tensor], num_classes: int, *, ignore_index: int = 255
) -> torch.Tensor:
    """``(C,)`` float64 fraction of the labelled pixels that belong to each class.

    Args:
        labels: an integer tensor of any shape, or an iterable of them (e.g. the source label maps).
        num_classes: ``C``; labels outside ``[0, C)`` (the ignore index) are not counted.

    Shape:
        labels ``(...)`` → ``(C,)``.

    >>> import torch
    >>> class_prior(torch.tensor([[0, 0, 1, 255]]), 3).tolist()
    [0.6666666666666666, 0.3333333333333333, 0.0]
    """
    c = check_positive_int("num_classes", num_classes)
    chunks = [labels] if isinstance(labels, torch.Tensor) else labels
    total = torch.zeros(c, dtype=torch.int64)
    for lab in chunks:
        total += class_counts(lab, c, ignore_index=ignore_index).cpu()
    counted = total.double()
    return counted / counted.sum().clamp(min=1)


class PseudoLabelDiagnostics(NamedTuple):
    """Per-class pseudo-label statistics of one round (all ``(C,)`` float64 on the CPU).

    Attributes:
        share: fraction of all target pixels pseudo-labelled as the class.
        composition: fraction of the *selected* pixels that are the class.
        prior: the source label prior.
        ratio_to_prior: ``composition / prior`` (NaN where the prior is 0).
        change: ``composition / previous composition`` (NaN without a previous round or where it
            was 0).
        thresholds: the selector's per-class thresholds, if given.
        pasted_share: each class's fraction of the pixels pasted by hard-aware copy-paste, if given.
        selected_fraction: fraction of target pixels with a pseudo-label.
        vanishing: the vanishing classes (see the module docstring).
        class_names: names used in messages.
    """

    share: torch.Tensor
    composition: torch.Tensor
    prior: torch.Tensor
    ratio_to_prior: torch.Tensor
    change: torch.Tensor
    selected_fraction: float
    vanishing: list[int]
    thresholds: torch.Tensor | None = None
    pasted_share: torch.Tensor | None = None
    class_names: tuple[str, ...] = ()

    def name(self, c: int) -> str:
        return self.class_names[c] if c < len(self.class_names) else str(c)

    def message(self) -> str:
        """One line per vanishing class, with its numbers ("" when none)."""
        lines = []
        for c in self.vanishing:
            parts = [
                f"{100 * self.composition[c]:.3f}% of the pseudo-labels",
                f"prior {100 * self.prior[c]:.3f}%",
                f"{self.ratio_to_prior[c]:.2f}x prior",
            ]
            if not math.isnan(float(self.change[c])):
                parts.append(f"{self.change[c]:.2f}x the previous round")
            if self.thresholds is not None:
                parts.append(f"threshold {self.thresholds[c]:.3f}")
            lines.append(f"class {c} ({self.name(c)}): " + ", ".join(parts))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists of floats; NaN written as None)."""

        def lst(t: torch.Tensor | None) -> list[float | None] | None:
            if t is None:
                return None
            return [None if math.isnan(v) else v for v in t.tolist()]

        return {
            "share": lst(self.share),
            "composition": lst(self.composition),
            "prior": lst(self.prior),
            "ratio_to_prior": lst(self.ratio_to_prior),
            "change": lst(self.change),
            "thresholds": lst(self.thresholds),
            "pasted_share": lst(self.pasted_share),
            "selected_fraction": self.selected_fraction,
            "vanishing": list(self.vanishing),
            "vanishing_names": [self.name(c) for c in self.vanishing],
        }


def _check_prior(prior: torch.Tensor) -> torch.Tensor:
    """A prior is a distribution: raw pixel counts would make every class look vanishing."""
    total = float(prior.sum())
    if bool((prior < 0).any()) or not math.isclose(total, 1.0, abs_tol=1e-3):
        raise ValueError(
            f"prior must be class frequencies summing to 1 (class_prior), got a sum of {total:g}; "
            "divide raw pixel counts by their total"
        )
    return prior


def _vector(name: str, x: object, c: int | None) -> torch.Tensor:
    t = check_tensor(name, x)
    if t.dim() != 1 or (c is not None and t.shape[0] != c):
        raise ValueError(f"{name} must have shape ({c if c else 'C'},), got {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    return t


def pseudo_label_diagnostics(
    class_pixels: torch.Tensor,
    prior: torch.Tensor,
    *,
    total_pixels: int,
    previous_composition: torch.Tensor | None = None,
    thresholds: torch.Tensor | None = None,
    pasted_pixels: torch.Tensor | None = None,
    vanish_ratio: float = 0.1,
    drop_ratio: float = 0.25,
    min_prior: float = 1e-4,
    class_names: Sequence[str] = (),
    warn: bool = True,
) -> PseudoLabelDiagnostics:
    """Compare one round's pseudo-labels with the source prior and the previous round.

    Args:
        class_pixels: ``(C,)`` pixels pseudo-labelled as each class (e.g.
            ``ClassStatistics.class_pixels``).
        prior: ``(C,)`` source label prior (:func:`class_prior`).
        total_pixels: all target pixels that were pseudo-labelled or ignored.
        previous_composition: ``(C,)`` the previous round's ``composition``, if any.
        thresholds: ``(C,)`` the selector's thresholds (reported).
        pasted_pixels: ``(C,)`` pixels pasted per class during the previous self-training round.
        vanish_ratio: a class under this fraction of its prior share is vanishing.
        drop_ratio: a class whose share fell below this fraction of the previous round's is
            vanishing.
        min_prior: classes rarer than this in the source are not judged.
        class_names: names for the messages.
        warn: emit a :class:`CollapseWarning` naming the vanishing classes.

    Returns:
        :class:`PseudoLabelDiagnostics`.

    >>> import torch, warnings
    >>> prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     d = pseudo_label_diagnostics(torch.tensor([600, 390, 10]), prior, total_pixels=2000)
    >>> d.vanishing, round(d.selected_fraction, 2), len(caught)
    ([2], 0.5, 1)
    """
    pix = _vector("class_pixels", class_pixels, None)
    c = pix.shape[0]
    p = _check_prior(_vector("prior", prior, c))
    if isinstance(total_pixels, bool) or not isinstance(total_pixels, int) or total_pixels < 0:
        raise ValueError(f"total_pixels must be a non-negative int, got {total_pixels!r}")
    if pix.sum() > total_pixels:
        raise ValueError(
            f"total_pixels ({total_pixels}) is less than the selected pixels ({int(pix.sum())})"
        )
    for name, v in (("vanish_ratio", vanish_ratio), ("drop_ratio", drop_ratio)):
        if not 0 <= v <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {v}")
    selected = float(pix.sum())
    share = pix / max(total_pixels, 1)
    composition = pix / max(selected, 1.0)
    nan = torch.full_like(p, float("nan"))
    ratio = torch.where(p > 0, composition / p.clamp(min=1e-300), nan)
    change = nan.clone()
    if previous_composition is not None:
        prev = _vector("previous_composition", previous_composition, c)
        change = torch.where(prev > 0, composition / prev.clamp(min=1e-300), nan)
    judged = p >= min_prior
    vanishing_mask = judged & ((ratio < vanish_ratio) | (change < drop_ratio))
    pasted_share = None
    if pasted_pixels is not None:
        pasted = _vector("pasted_pixels", pasted_pixels, c)
        pasted_share = pasted / pasted.sum().clamp(min=1)
    diag = PseudoLabelDiagnostics(
        share=share,
        composition=composition,
        prior=p,
        ratio_to_prior=ratio,
        change=change,
        selected_fraction=selected / max(total_pixels, 1),
        vanishing=torch.nonzero(vanishing_mask).flatten().tolist(),
        thresholds=None if thresholds is None else _vector("thresholds", thresholds, c),
        pasted_share=pasted_share,
        class_names=tuple(class_names),
    )
    if warn and diag.vanishing:
        warnings.warn(
            f"{len(diag.vanishing)} class(es) vanishing from the pseudo-labels:\n" + diag.message(),
            CollapseWarning,
            stacklevel=2,
        )
    return diag


class CollapseMonitor:
    """Keeps the diagnostics of every round and compares each round with the previous one.

    Args:
        prior: ``(C,)`` source label prior (:func:`class_prior`).
        class_names: names for the messages.
        vanish_ratio, drop_ratio, min_prior: see :func:`pseudo_label_diagnostics`.

    >>> import torch
    >>> monitor = CollapseMonitor(torch.tensor([0.5, 0.5], dtype=torch.float64))
    >>> d1 = monitor.update(torch.tensor([50, 50]), total_pixels=200)
    >>> d1.vanishing, len(monitor.history)
    ([], 1)
    """

    def __init__(
        self,
        prior: torch.Tensor,
        *,
        class_names: Sequence[str] = (),
        vanish_ratio: float = 0.1,
        drop_ratio: float = 0.25,
        min_prior: float = 1e-4,
    ) -> None:
        self.prior = _check_prior(_vector("prior", prior, None))
        self.class_names = list(class_names)
        self.vanish_ratio = vanish_ratio
        self.drop_ratio = drop_ratio
        self.min_prior = min_prior
        self.history: list[PseudoLabelDiagnostics] = []

    def update(
        self,
        class_pixels: torch.Tensor,
        *,
        total_pixels: int,
        thresholds: torch.Tensor | None = None,
        pasted_pixels: torch.Tensor | None = None,
        warn: bool = True,
    ) -> PseudoLabelDiagnostics:
        """Diagnose one round (against the previous one held here) and remember it."""
        previous = self.history[-1].composition if self.history else None
        diag = pseudo_label_diagnostics(
            class_pixels,
            self.prior,
            total_pixels=total_pixels,
            previous_composition=previous,
            thresholds=thresholds,
            pasted_pixels=pasted_pixels,
            vanish_ratio=self.vanish_ratio,
            drop_ratio=self.drop_ratio,
            min_prior=self.min_prior,
            class_names=self.class_names,
            warn=warn,
        )
        self.history.append(diag)
        return diag
