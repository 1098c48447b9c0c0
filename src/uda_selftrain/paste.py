"""Hard-aware copy-paste: the donors' hard-class pixels pasted onto the receivers (§3.2), alone
(:func:`hard_paste`, :class:`HardAwarePaste`) or together with the weak and strong views in the
cheaper order (:func:`paste_views`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_label_map,
    check_tensor,
    value_checks_enabled,
)
from .augment import (
    ColourParams,
    CropParams,
    WeakStrongViews,
    _normalize_,
    _to_unit,
    check_image_scale,
    strong_colour,
    weak_geometry,
)

__all__ = [
    "HardAwarePaste",
    "HardAwareViews",
    "PasteResult",
    "hard_paste",
    "paste_views",
]


class PasteResult(NamedTuple):
    """Output of :func:`hard_paste`.

    Attributes:
        images: ``(N, 3, H, W)`` receivers with the donors' hard-class pixels pasted.
        labels: ``(N, H, W)`` pseudo-labels with the pasted labels.
        pasted: ``(N, H, W)`` (the labels' dtype), the pasted class per pixel, ``ignore_index``
            elsewhere.
    """

    images: torch.Tensor
    labels: torch.Tensor
    pasted: torch.Tensor


def hard_paste(
    images: torch.Tensor,
    labels: torch.Tensor,
    donor_images: torch.Tensor,
    donor_labels: torch.Tensor,
    hard_mask: torch.Tensor,
    donor_valid: torch.Tensor | None = None,
    *,
    ignore_index: int = 255,
) -> PasteResult:
    """Paste every donor pixel whose label is a hard class onto its receiver, at the same position.

    Donors are pasted in order (a later donor wins where two overlap). Donors whose size differs
    from the receiver are resized first (bilinear for images, nearest for labels). One pass per
    donor slot, no loop over samples or pixels.

    Args:
        images: ``(N, 3, H, W)`` receivers (any float or uint8 dtype).
        labels: ``(N, H, W)`` integer pseudo-labels (``ignore_index`` = none).
        donor_images: ``(N, D, 3, H', W')`` donors of each receiver.
        donor_labels: ``(N, D, H', W')`` their pseudo-labels.
        hard_mask: ``(C,)`` bool, the hard classes.
        donor_valid: optional ``(N, D)`` bool; invalid slots (padding) paste nothing.
        ignore_index: label of unlabelled pixels.

    Returns:
        :class:`PasteResult` with the mixed images and labels and the pasted-class map.

    >>> import torch
    >>> img, lab = torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 0], [255, 0]]])
    >>> dimg, dlab = torch.ones(1, 1, 3, 2, 2), torch.tensor([[[[1, 2], [1, 255]]]])
    >>> out = hard_paste(img, lab, dimg, dlab, torch.tensor([False, True, False]))
    >>> out.labels.tolist(), out.pasted.tolist()
    ([[[1, 0], [1, 0]]], [[[1, 255], [1, 255]]])
    """
    img = check_tensor("images", images)
    if img.dim() != 4:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(img.shape)}")
    n, ch, h, w = img.shape
    lab = check_label_map("labels", labels, (n, h, w), device=img.device)
    dimg = check_tensor("donor_images", donor_images)
    if dimg.dim() != 5 or dimg.shape[0] != n or dimg.shape[2] != ch:
        raise ValueError(
            f"donor_images must have shape ({n}, D, {ch}, H', W'), got {tuple(dimg.shape)}"
        )
    d = dimg.shape[1]
    dlab = check_label_map("donor_labels", donor_labels, (n, d, *dimg.shape[-2:]))
    hm = check_tensor("hard_mask", hard_mask)
    if hm.dtype != torch.bool or hm.dim() != 1:
        raise TypeError(f"hard_mask must be a (C,) bool tensor, got {tuple(hm.shape)} {hm.dtype}")
    _check_donor_valid(donor_valid, n, d)
    _check_same_images(img, dimg, [lab, dlab])
    if dimg.shape[-2:] != (h, w):
        dimg, dlab = _resize_donors(dimg, dlab, (h, w))
    # Lookup table over every possible label value: hard classes true, the rest (ignore) false.
    lut = torch.zeros(max(hm.shape[0], ignore_index + 1, 256), dtype=torch.bool, device=img.device)
    lut[: hm.shape[0]] = hm.to(img.device)
    # Labels of classes the hard mask does not cover would paste (or keep) a class the model
    # does not have: every label must be a class of the mask or the ignore index (one host sync).
    if value_checks_enabled():
        c = hm.shape[0]
        for name, t in (("labels", lab), ("donor_labels", dlab)):
            bad = (t != ignore_index) & ((t < 0) | (t >= c))
            if t.numel() and bool(bad.any()):
                raise ValueError(
                    f"{name} has value {int(t[bad].flatten()[0])} outside the hard mask's "
                    f"{c} classes that is not the ignore index {ignore_index}"
                )
    out_img, out_lab = img, lab
    pasted = torch.full((n, h, w), ignore_index, dtype=lab.dtype, device=img.device)
    for k in range(d):
        src_lab = dlab[:, k].to(img.device)
        m = lut[src_lab.long()]
        if donor_valid is not None:
            m &= donor_valid[:, k].to(img.device).view(n, 1, 1)
        out_img = torch.where(m.unsqueeze(1), dimg[:, k].to(img.device, img.dtype), out_img)
        out_lab = torch.where(m, src_lab.to(lab.dtype), out_lab)
        pasted = torch.where(m, src_lab.to(lab.dtype), pasted)
    return PasteResult(out_img, out_lab, pasted)


def _check_donor_valid(donor_valid: torch.Tensor | None, n: int, d: int) -> None:
    if donor_valid is None:
        return
    check_tensor("donor_valid", donor_valid)
    if donor_valid.dtype != torch.bool:
        raise TypeError(f"donor_valid must be a bool tensor, got {donor_valid.dtype}")
    if tuple(donor_valid.shape) != (n, d):
        raise ValueError(f"donor_valid must have shape ({n}, {d}), got {tuple(donor_valid.shape)}")


def _check_same_images(
    images: torch.Tensor, donor_images: torch.Tensor, labels: Sequence[torch.Tensor]
) -> None:
    """Receivers and donors share dtype (a uint8/float mix pastes 0s or 204s) and device."""
    if donor_images.dtype != images.dtype:
        raise TypeError(
            f"donor_images must have the images' dtype {images.dtype}, got {donor_images.dtype}"
        )
    for name, t in (
        ("donor_images", donor_images),
        *zip(("labels", "donor_labels"), labels, strict=True),
    ):
        if t.device != images.device:
            raise ValueError(
                f"{name} must be on the images' device {images.device}, got {t.device}"
            )
    check_image_scale("images", images)
    check_image_scale("donor_images", donor_images)


def _resize_donors(
    images: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = images.shape[:2]
    flat = images.flatten(0, 1)
    resized = F.interpolate(flat.float(), size=size, mode="bilinear", align_corners=False)
    if not images.is_floating_point():
        info = torch.iinfo(images.dtype)
        resized = resized.round_().clamp_(info.min, info.max)
    resized = resized.to(images.dtype).view(n, d, images.shape[2], *size)
    lab = F.interpolate(labels.flatten(0, 1).unsqueeze(1).float(), size=size, mode="nearest")
    return resized, lab.squeeze(1).to(labels.dtype).view(n, d, *size)


class HardAwarePaste(nn.Module):
    """Module form of :func:`hard_paste`, holding the hard-class mask as a buffer.

    Args:
        hard_mask: ``(C,)`` bool hard classes (e.g. ``DonorSampler(...).hard_mask``).
        ignore_index: label of unlabelled pixels.

    >>> import torch
    >>> paste = HardAwarePaste(torch.tensor([False, True]))
    >>> out = paste(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long),
    ...             torch.ones(2, 1, 3, 8, 8), torch.ones(2, 1, 8, 8, dtype=torch.long))
    >>> bool(out.images.eq(1).all()), out.pasted.unique().tolist()
    (True, [1])
    """

    hard_mask: torch.Tensor

    def __init__(self, hard_mask: torch.Tensor, *, ignore_index: int = 255) -> None:
        super().__init__()
        if hard_mask.dtype != torch.bool or hard_mask.dim() != 1:
            raise TypeError("hard_mask must be a (C,) bool tensor")
        self.register_buffer("hard_mask", hard_mask.clone())
        self.ignore_index = ignore_index

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        donor_images: torch.Tensor,
        donor_labels: torch.Tensor,
        donor_valid: torch.Tensor | None = None,
    ) -> PasteResult:
        return hard_paste(
            images,
            labels,
            donor_images,
            donor_labels,
            self.hard_mask,
            donor_valid,
            ignore_index=self.ignore_index,
        )


class HardAwareViews(NamedTuple):
    """Output of :func:`paste_views`, :func:`~uda_selftrain.hard_aware.hard_aware_augment` and
    :class:`~uda_selftrain.hard_aware.HardAwareAugmenter`.

    Attributes:
        weak: ``(N, 3, h, w)`` normalised weak view (teacher input).
        strong: ``(N, 3, h, w)`` normalised strong view (student input), same geometry.
        labels: ``(N, h, w)`` pseudo-labels after the paste (labels' dtype).
        pasted: ``(N, h, w)`` pasted class per pixel, ``ignore_index`` where nothing was pasted.
        crop: the :class:`~uda_selftrain.augment.CropParams` used.
        colour: the :class:`~uda_selftrain.augment.ColourParams` used.
    """

    weak: torch.Tensor
    strong: torch.Tensor
    labels: torch.Tensor
    pasted: torch.Tensor
    crop: CropParams
    colour: ColourParams


def paste_views(
    images: torch.Tensor,
    labels: torch.Tensor,
    donor_images: torch.Tensor,
    donor_labels: torch.Tensor,
    hard_mask: torch.Tensor,
    donor_valid: torch.Tensor | None = None,
    *,
    views: WeakStrongViews,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> HardAwareViews:
    """HPLA and the two views in one call, in the order that does the least work.

    Mathematically ``views(hard_paste(...))``: the receivers and their donors go through the
    *same* crop, flip and resize, then the donors' hard-class pixels are pasted at the output
    resolution, then the colour operations run. Pasting at the same positions commutes with the
    shared geometry for the labels exactly; for the images the only difference is at the one-pixel
    rim of a pasted region, where bilinear resizing would otherwise blend receiver and donor.
    This costs a quarter of pasting at 1024 × 2048 first.

    Args:
        images: ``(N, 3, H, W)`` receivers (uint8 or float in ``[0, 1]``).
        labels: ``(N, H, W)`` their pseudo-labels.
        donor_images: ``(N, D, 3, H', W')`` donors.
        donor_labels: ``(N, D, H', W')`` donor pseudo-labels.
        hard_mask: ``(C,)`` bool hard classes.
        donor_valid: optional ``(N, D)`` bool, padding slots false (required when the donors
            come from :meth:`DonorSampler.draw_batch`, whose padding would otherwise paste).
        views: the :class:`~uda_selftrain.augment.WeakStrongViews` to apply (keyword-only).
        generator: draws the views' randomness.

    Returns:
        :class:`HardAwareViews`: the views, the mixed pseudo-labels ``labels`` and the pasted
        class per pixel ``pasted`` (``ignore_index`` elsewhere), all in the weak geometry.

    >>> import torch
    >>> from uda_selftrain.augment import WeakStrongViews
    >>> out = paste_views(torch.rand(2, 3, 32, 64), torch.zeros(2, 32, 64, dtype=torch.long),
    ...                   torch.rand(2, 1, 3, 32, 64), torch.ones(2, 1, 32, 64, dtype=torch.long),
    ...                   torch.tensor([False, True]), views=WeakStrongViews((16, 32)),
    ...                   generator=torch.Generator().manual_seed(0))
    >>> out.labels.unique().tolist(), out.pasted.unique().tolist(), out.strong.shape
    ([1], [1], torch.Size([2, 3, 16, 32]))
    """
    img = check_tensor("images", images)
    dimg = check_tensor("donor_images", donor_images)
    dlab = check_tensor("donor_labels", donor_labels)
    if img.dim() != 4 or dimg.dim() != 5 or dlab.dim() != 4:
        raise ValueError(
            "images must be (N, 3, H, W), donor_images (N, D, 3, H', W') and donor_labels "
            f"(N, D, H', W'), got {tuple(img.shape)}, {tuple(dimg.shape)}, {tuple(dlab.shape)}"
        )
    n, _, h, w = img.shape
    if dimg.shape[0] != n or dlab.shape[:2] != dimg.shape[:2]:
        raise ValueError(f"donors must have batch size {n} and matching donor counts")
    if not isinstance(views, WeakStrongViews):
        raise TypeError(f"views must be a WeakStrongViews, got {type(views).__name__}")
    _check_donor_valid(donor_valid, n, dimg.shape[1])
    # Named here: weak_geometry would call them maps[0].
    lab = check_label_map("labels", labels, (n, h, w))
    check_label_map("donor_labels", dlab, dlab.shape)
    _check_same_images(img, dimg, [lab, dlab])
    if dimg.shape[-2:] != (h, w):
        dimg, dlab = _resize_donors(dimg, dlab, (h, w))
    d = dimg.shape[1]
    crop, colour = views.draw(n, (h, w), generator=generator)
    weak, (weak_labels,) = weak_geometry(img, crop, views.out_size, [labels], keep_uint8=True)
    rep = CropParams(crop.boxes.repeat_interleave(d, 0), crop.flips.repeat_interleave(d, 0))
    d_weak, (d_weak_labels,) = weak_geometry(
        dimg.flatten(0, 1), rep, views.out_size, [dlab.flatten(0, 1)], keep_uint8=True
    )
    out_h, out_w = views.out_size
    mixed = hard_paste(
        weak,
        weak_labels,
        d_weak.view(n, d, 3, out_h, out_w),
        d_weak_labels.view(n, d, out_h, out_w),
        hard_mask,
        donor_valid,
        ignore_index=ignore_index,
    )
    weak = _to_unit(mixed.images)
    strong = strong_colour(weak, colour)
    return HardAwareViews(
        _normalize_(weak, views.mean, views.std),
        _normalize_(strong, views.mean, views.std),
        mixed.labels,
        mixed.pasted,
        crop,
        colour,
    )
