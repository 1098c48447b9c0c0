"""Hard-aware pseudo-label augmentation with the weak and strong views, as one component.

:class:`HardAwareAugmenter` owns what HPLA needs between rounds — the class values ``v``, the
hard set ``H`` (the ``K`` classes of smallest value that can be pasted) and their drawing
probabilities ``π_c ∝ (1 − v_c)²`` — as buffers, so ``state_dict()`` checkpoints them. Its
forward pastes every donor pixel whose pseudo-label is a hard class onto the receiver and returns
the weak view (teacher input), the strong view (student input), the mixed pseudo-labels and the
pasted class per pixel (method §3).

Donors come from one of two places:

* **a dataset** (offline HIAST): :meth:`HardAwareAugmenter.donor_sampler` gives the
  :class:`~uda_selftrain.donors.DonorSampler` that a ``Dataset`` uses to load donor images for
  each sample, with the same hard set; pass the loaded donors to the forward;
* **the batch itself** (online loops, no dataset machinery): call the forward without donors and
  each sample receives another sample of the batch (a random derangement drawn from the
  generator); a small bank of recent target crops works the same way, passed as donors.

:func:`hard_aware_augment` is the functional twin, taking the hard mask explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._checks import (
    check_ignore_index,
    check_labels,
    check_positive_int,
    check_tensor,
    check_unit_interval,
)
from .augment import IMAGENET_MEAN, IMAGENET_STD, WeakStrongViews
from .class_statistics import ClassStatistics, class_difficulty, default_num_hard
from .donors import DonorSampler
from .paste import HardAwareViews, PasteResult, hard_paste, paste_views

__all__ = ["HardAwareAugmenter", "HardAwareViews", "batch_donors", "hard_aware_augment"]


def batch_donors(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Donors from the batch itself: each sample receives another, by a random derangement.

    Args:
        images: ``(N, 3, H, W)`` the batch.
        labels: ``(N, H, W)`` its pseudo-labels.
        generator: CPU generator of the derangement.

    Returns:
        ``(N, 1, 3, H, W)`` donor images, ``(N, 1, H, W)`` donor labels and ``(N, 1)`` bool
        validity (false for a batch of one, which has no other sample).

    >>> import torch
    >>> img = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 2, 2) / 3
    >>> d, _, valid = batch_donors(img, torch.zeros(3, 2, 2, dtype=torch.long),
    ...                            generator=torch.Generator().manual_seed(0))
    >>> bool((d[:, 0, 0, 0, 0] != img[:, 0, 0, 0]).all()), valid.flatten().tolist()
    (True, [True, True, True])
    """
    x = check_tensor("images", images)
    y = check_tensor("labels", labels)
    if x.dim() != 4 or y.dim() != 3 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"images must be (N, 3, H, W) and labels (N, H, W), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    n = x.shape[0]
    # A random cyclic order: sample order[k] receives order[k + 1], never itself when n > 1.
    order = torch.randperm(n, generator=generator)
    source = torch.empty_like(order)
    source[order] = order.roll(-1)
    idx = source.to(x.device)
    valid = torch.full((n, 1), n > 1, dtype=torch.bool, device=x.device)
    return x.index_select(0, idx).unsqueeze(1), y.index_select(0, idx).unsqueeze(1), valid


def hard_aware_augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    hard_mask: torch.Tensor,
    donor_images: torch.Tensor | None = None,
    donor_labels: torch.Tensor | None = None,
    donor_valid: torch.Tensor | None = None,
    *,
    views: WeakStrongViews,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> HardAwareViews:
    """Hard-aware copy-paste followed by the weak and strong views (functional form).

    Each donor pixel whose pseudo-label is a hard class (``hard_mask``) is pasted, image and label,
    at the same position of its receiver; receivers and donors share the weak view's crop, flip
    and resize, and the paste happens at the output size (identical labels to pasting first; the
    image differs only on the one-pixel rim of a pasted region). Then the strong view's colour
    operations run on the mixed weak view.

    Args:
        images: ``(N, 3, H, W)`` receivers, uint8 in ``[0, 255]`` or float in ``[0, 1]``.
        labels: ``(N, H, W)`` integer pseudo-labels, ``ignore_index`` where there is none.
        hard_mask: ``(C,)`` bool, the hard classes.
        donor_images: ``(N, D, 3, H', W')`` donors (the images' dtype and device), or ``None`` to
            take the donors from the batch (:func:`batch_donors`).
        donor_labels: ``(N, D, H', W')`` donor pseudo-labels (with ``donor_images``).
        donor_valid: optional ``(N, D)`` bool; false slots (padding) paste nothing.
        views: the :class:`~uda_selftrain.augment.WeakStrongViews` giving the output size, crop,
            colour operations and normalisation.
        generator: CPU generator of every random choice (the same seed gives the same output on
            any device).
        ignore_index: label of the pixels without a pseudo-label.

    Returns:
        :class:`HardAwareViews`.

    Shape:
        images ``(N, 3, H, W)``, labels ``(N, H, W)`` → views ``(N, 3, h, w)``, labels and
        pasted ``(N, h, w)`` with ``(h, w) = views.out_size``.

    >>> import torch
    >>> from uda_selftrain.augment import WeakStrongViews
    >>> img = torch.rand(2, 3, 32, 64)
    >>> lab = torch.zeros(2, 32, 64, dtype=torch.long); lab[1] = 1
    >>> out = hard_aware_augment(img, lab, torch.tensor([False, True]),
    ...                          views=WeakStrongViews((16, 32)),
    ...                          generator=torch.Generator().manual_seed(0))
    >>> out.labels.unique().tolist(), out.pasted[0].unique().tolist(), out.strong.shape
    ([1], [1], torch.Size([2, 3, 16, 32]))
    """
    donor_images, donor_labels, donor_valid = _donors(
        images, labels, donor_images, donor_labels, donor_valid, generator
    )
    return paste_views(
        images,
        labels,
        donor_images,
        donor_labels,
        hard_mask,
        donor_valid,
        views=views,
        generator=generator,
        ignore_index=ignore_index,
    )


def _donors(
    images: torch.Tensor,
    labels: torch.Tensor,
    donor_images: torch.Tensor | None,
    donor_labels: torch.Tensor | None,
    donor_valid: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The donors given, or (none given) each sample's donor from the batch (:func:`batch_donors`)."""
    if (donor_images is None) != (donor_labels is None):
        raise ValueError("donor_images and donor_labels must be given together (or neither)")
    if donor_images is None or donor_labels is None:
        if donor_valid is not None:
            raise ValueError("donor_valid needs donor_images and donor_labels")
        return batch_donors(images, labels, generator=generator)
    return donor_images, donor_labels, donor_valid


class HardAwareAugmenter(nn.Module):
    """HPLA plus the weak/strong views, holding the class values and the hard set.

    Typical use (offline HIAST, once per round): after generating pseudo-labels, call
    :meth:`update` with the round's :class:`~uda_selftrain.class_statistics.ClassStatistics` (or the
    selector, in online loops); give a dataset :meth:`donor_sampler` to load donors; in every
    training step call the module on the batch and its donors.

    Args:
        num_classes: ``C``.
        out_size: ``(h, w)`` of the views (512 × 1024 in the paper).
        num_hard: ``K``, the number of hard classes; default ``round(14/19 · C)`` (the published
            14 of 19). Must be at most ``C``.
        absent_classes: classes that never occur (SYNTHIA: 9, 14, 16); never hard.
        max_donors: most donors per sample when drawing from a dataset (3; 1 = public code).
        min_coverage: fraction of the hard set a sample's donors should cover (0.5).
        drop_fraction: fraction of each class's donor pool (fewest pixels first) dropped (0.1).
        mean, std: normalisation of the views (ImageNet's; ``None`` for none).
        ignore_index: label of the pixels without a pseudo-label.
        **view_options: further :class:`~uda_selftrain.augment.WeakStrongViews` options
            (``height_range``, ``aspect``, ``flip_probability``, ``num_ops``, ``op_probability``).

    State (buffers): ``class_values`` ``(C,)`` float64, ``has_donor`` ``(C,)`` bool,
    ``hard_mask`` ``(C,)`` bool, ``probabilities`` ``(C,)`` float64, ``fitted`` bool.

    Shape:
        images ``(N, 3, H, W)``, labels ``(N, H, W)``, optional donors ``(N, D, 3, H', W')`` and
        ``(N, D, H', W')`` → :class:`HardAwareViews` at ``out_size``.

    >>> import torch
    >>> aug = HardAwareAugmenter(num_classes=3, out_size=(16, 32), num_hard=1)
    >>> _ = aug.update(torch.tensor([0.95, 0.40, 0.90]))
    >>> aug.hard_classes.tolist()
    [1]
    >>> lab = torch.zeros(2, 32, 64, dtype=torch.long); lab[1, :, :32] = 1
    >>> out = aug(torch.rand(2, 3, 32, 64), lab, generator=torch.Generator().manual_seed(0))
    >>> out.weak.shape, sorted(out.pasted.unique().tolist())
    (torch.Size([2, 3, 16, 32]), [1, 255])
    """

    class_values: torch.Tensor
    has_donor: torch.Tensor
    hard_mask: torch.Tensor
    probabilities: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        out_size: tuple[int, int],
        *,
        num_hard: int | None = None,
        absent_classes: Sequence[int] = (),
        max_donors: int = 3,
        min_coverage: float = 0.5,
        drop_fraction: float = 0.1,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        ignore_index: int = 255,
        **view_options: object,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        if num_hard is None:
            num_hard = default_num_hard(num_classes)
        self.num_hard = check_positive_int("num_hard", num_hard)
        if self.num_hard > self.num_classes:
            raise ValueError(
                f"num_hard must be at most num_classes={num_classes}, got {num_hard} "
                "(every class would be hard)"
            )
        absent = tuple(int(a) for a in absent_classes)
        for a in absent:
            if not 0 <= a < num_classes:
                raise ValueError(f"absent_classes must lie in [0, {num_classes}), got {a}")
        self.absent_classes = absent
        self.max_donors = check_positive_int("max_donors", max_donors)
        self.min_coverage = check_unit_interval("min_coverage", min_coverage)
        self.drop_fraction = check_unit_interval("drop_fraction", drop_fraction, open_high=True)
        self.ignore_index = check_ignore_index(ignore_index, num_classes)
        self.views = WeakStrongViews(out_size, mean=mean, std=std, **view_options)  # type: ignore[arg-type]
        c = num_classes
        self.register_buffer("class_values", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("has_donor", torch.ones(c, dtype=torch.bool))
        self.register_buffer("hard_mask", torch.zeros(c, dtype=torch.bool))
        self.register_buffer("probabilities", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._known_fitted = False  # a host-side copy: one read of the buffer, not one per call

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_hard={self.num_hard}, "
            f"max_donors={self.max_donors}, out_size={self.views.out_size}"
        )

    @property
    def hard_classes(self) -> torch.Tensor:
        """``(K',)`` int64 hard classes in increasing class value (empty before :meth:`update`)."""
        hard = torch.nonzero(self.hard_mask).flatten()
        return hard[torch.sort(self.class_values[hard], stable=True).indices]

    @torch.no_grad()
    def update(
        self,
        source: ClassStatistics | nn.Module | torch.Tensor,
        *,
        has_donor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Set the class values and recompute the hard set; returns the hard classes.

        Args:
            source: a round's :class:`~uda_selftrain.class_statistics.ClassStatistics` (class values and,
                from its per-sample counts, which classes have a donor); a selector with
                ``class_values`` (e.g. :class:`~uda_selftrain.selection.InstanceAdaptiveSelector`
                in an online loop); or a ``(C,)`` tensor of class values in ``[0, 1]``.
            has_donor: optional ``(C,)`` bool overriding which classes can be pasted.

        A class that has pseudo-labelled pixels but a class value of 0 means the statistics were
        saved without their class values; that is an error rather than a silent hard set made of
        the first ``K`` class indices.
        """
        donors = None
        if isinstance(source, ClassStatistics):
            if source.num_classes != self.num_classes:
                raise ValueError(
                    f"source has {source.num_classes} classes, the augmenter {self.num_classes}"
                )
            values = source.class_values
            missing = (source.class_pixels > 0) & (values.cpu() <= 0)
            if bool(missing.any()):
                raise ValueError(
                    "source.class_values are 0 for classes with pseudo-labels "
                    f"{torch.nonzero(missing).flatten().tolist()}: set them from the selector "
                    "(stats.class_values = selector.class_values) before update()"
                )
            donors = source.has_donor(drop_fraction=self.drop_fraction)
        elif isinstance(source, torch.Tensor):
            values = source
        elif isinstance(getattr(source, "class_values", None), torch.Tensor):
            values = source.class_values  # type: ignore[union-attr]
        else:
            raise TypeError(
                "source must be a ClassStatistics, a selector with class_values or a (C,) tensor, "
                f"got {type(source).__name__}"
            )
        v = check_tensor("class_values", values).detach()
        if not v.is_floating_point() or tuple(v.shape) != (self.num_classes,):
            raise ValueError(
                f"class_values must be a float ({self.num_classes},) tensor, got "
                f"{tuple(v.shape)} {v.dtype}"
            )
        v = v.to(self.class_values.device, torch.float64)
        if not bool(((v >= 0) & (v <= 1)).all()):
            raise ValueError(f"class_values must lie in [0, 1] (and not be NaN), got {v.tolist()}")
        if has_donor is not None:
            donors = check_tensor("has_donor", has_donor)
            if donors.dtype != torch.bool or tuple(donors.shape) != (self.num_classes,):
                raise ValueError(f"has_donor must be a ({self.num_classes},) bool tensor")
        donors = (
            donors.to(self.has_donor.device)
            if donors is not None
            else torch.ones_like(self.has_donor)
        )
        diff = class_difficulty(
            v, num_hard=self.num_hard, absent_classes=self.absent_classes, has_donor=donors
        )
        self.class_values.copy_(v)
        self.has_donor.copy_(donors)
        self.hard_mask.copy_(diff.hard_mask)
        self.probabilities.copy_(diff.probabilities)
        self.fitted.fill_(True)
        self._known_fitted = True
        return diff.hard_classes

    def paste(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        donor_images: torch.Tensor | None = None,
        donor_labels: torch.Tensor | None = None,
        donor_valid: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> PasteResult:
        """The hard-class paste alone, at the input size and without the views: for loops that
        make their own views (a DACS-style online loop mixes with ClassMix next).

        Same inputs as calling the module (without donors, each sample receives from another of
        the batch); returns the :class:`~uda_selftrain.paste.PasteResult` of :func:`hard_paste`
        with this augmenter's hard set.
        """
        self._check_fitted()
        donor_images, donor_labels, donor_valid = _donors(
            images, labels, donor_images, donor_labels, donor_valid, generator
        )
        return hard_paste(
            images,
            labels,
            donor_images,
            donor_labels,
            self.hard_mask,
            donor_valid,
            ignore_index=self.ignore_index,
        )

    def donor_sampler(self, stats: ClassStatistics) -> DonorSampler:
        """The :class:`~uda_selftrain.donors.DonorSampler` for a dataset, with this hard set.

        Call :meth:`update` with the same ``stats`` first.
        """
        self._check_fitted()
        sampler = DonorSampler(
            stats,
            num_hard=self.num_hard,
            absent_classes=self.absent_classes,
            max_donors=self.max_donors,
            min_coverage=self.min_coverage,
            drop_fraction=self.drop_fraction,
        )
        if not torch.equal(sampler.hard_mask, self.hard_mask.cpu()):
            raise ValueError(
                "stats give another hard set than the augmenter's: call update(stats) first"
            )
        return sampler

    def _check_fitted(self) -> None:
        if self._known_fitted:
            return
        self._known_fitted = bool(self.fitted)  # e.g. restored by load_state_dict
        if not self._known_fitted:
            raise RuntimeError(
                "HardAwareAugmenter has no class values yet: call update(stats or selector) first"
            )

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        donor_images: torch.Tensor | None = None,
        donor_labels: torch.Tensor | None = None,
        donor_valid: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> HardAwareViews:
        self._check_fitted()
        x = check_tensor("images", images)
        if x.dim() != 4:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(x.shape)}")
        n, _, h, w = x.shape
        check_labels("labels", labels, (n, h, w), self.num_classes, self.ignore_index)
        return hard_aware_augment(
            images,
            labels,
            self.hard_mask,
            donor_images,
            donor_labels,
            donor_valid,
            views=self.views,
            generator=generator,
            ignore_index=self.ignore_index,
        )
