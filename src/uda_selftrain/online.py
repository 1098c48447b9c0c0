"""Online self-training primitives: ClassMix, the confidence-fraction weight, online targets.

These are what DACS/DAFormer-style methods use at every step, so that HIAST's components can be
plugged into them (the instance adaptive selector on the EMA teacher's predictions, hard-aware
copy-paste, region-adaptive regularisation, consistency):

- :func:`classmix_masks` / :func:`classmix` / :class:`ClassMix`: per image, half of the classes
  present in the source label (rounded up, chosen uniformly) are pasted onto the target image
  (Olsson et al., ClassMix, WACV 2021; as used by DACS). The mask is returned.
- :func:`confidence_weight`: per image, the fraction of pixels whose confidence is at least
  ``threshold`` (0.968 in DACS/DAFormer), the weight of the pseudo-label loss.
- :func:`online_targets`: teacher logits → pseudo-labels (argmax, or an IAS/constant selector's
  choice, 255 = ignored) and the per-image weight, in one call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._checks import (
    check_finite,
    check_float,
    check_ignore_index,
    check_label_map,
    check_labels,
    check_positive_int,
    check_tensor,
    check_unit_interval,
)
from ._histogram import count
from .selection import Selector

__all__ = [
    "ClassMix",
    "ClassMixResult",
    "OnlineTargets",
    "classmix",
    "classmix_masks",
    "confidence_weight",
    "online_targets",
    "pixel_weights",
]


def classmix_masks(
    labels: torch.Tensor,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """``(N, H, W)`` bool masks: per image, the pixels of ``⌈k/2⌉`` of its ``k`` present classes.

    The classes are chosen uniformly without replacement from a CPU ``generator`` (the same on any
    device); an image without any labelled pixel gets an empty mask. No loop over images.

    Args:
        labels: ``(N, H, W)`` integer source labels (``ignore_index`` never chosen).
        num_classes: ``C``.

    >>> import torch
    >>> lab = torch.tensor([[[0, 0, 1, 2]], [[255, 255, 255, 255]]])
    >>> m = classmix_masks(lab, 3, generator=torch.Generator().manual_seed(0))
    >>> int(m[0].sum()) in (1, 2, 3), bool(m[1].any())
    (True, False)
    """
    check_positive_int("num_classes", num_classes)
    lab = check_tensor("labels", labels)
    if lab.dim() != 3 or lab.shape[0] == 0:
        raise ValueError(f"labels must have shape (N, H, W) with N >= 1, got {tuple(lab.shape)}")
    check_labels("labels", lab, lab.shape, num_classes, ignore_index)
    n = lab.shape[0]
    flat = lab.reshape(n, -1).long()
    valid = flat != ignore_index
    offsets = torch.arange(n, device=lab.device).view(-1, 1) * num_classes
    # Ignored pixels go to one extra bin (a where, not a boolean gather: no host sync on a GPU).
    idx = torch.where(valid, flat.clamp(0, num_classes - 1) + offsets, n * num_classes)
    present = count(idx.view(-1), n * num_classes + 1)[:-1].view(n, num_classes) > 0
    keys = torch.rand(n, num_classes, generator=generator).to(lab.device)
    keys = torch.where(present, keys, torch.full_like(keys, 2.0))  # absent classes sort last
    order = keys.argsort(dim=1)
    rank_of = torch.empty_like(order).scatter_(
        1, order, torch.arange(num_classes, device=lab.device).expand(n, -1)
    )
    k = (present.sum(1, keepdim=True) + 1) // 2
    chosen = present & (rank_of < k)
    mask = chosen.gather(1, flat.clamp(0, num_classes - 1)) & valid
    return mask.view_as(lab)


class ClassMixResult(NamedTuple):
    """Output of :func:`classmix`: mixed ``images`` ``(N, 3, H, W)``, ``labels`` ``(N, H, W)``
    and the ``mask`` ``(N, H, W)`` bool (true where the source was pasted)."""

    images: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor


def classmix(
    source_images: torch.Tensor,
    source_labels: torch.Tensor,
    target_images: torch.Tensor,
    target_labels: torch.Tensor,
    mask: torch.Tensor,
) -> ClassMixResult:
    """Paste the source pixels under ``mask`` onto the target images and their (pseudo-)labels.

    Shapes: images ``(N, 3, H, W)``, labels ``(N, H, W)``, ``mask`` ``(N, H, W)`` bool.

    >>> import torch
    >>> out = classmix(torch.ones(1, 3, 1, 2), torch.tensor([[[4, 5]]]), torch.zeros(1, 3, 1, 2),
    ...                torch.tensor([[[1, 1]]]), torch.tensor([[[True, False]]]))
    >>> out.labels.tolist(), out.images[0, 0].tolist()
    ([[[4, 1]]], [[1.0, 0.0]])
    """
    for name, t in (("source_images", source_images), ("target_images", target_images)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(t.shape)}")
    if source_images.shape != target_images.shape:
        raise ValueError(
            f"source and target images must have the same shape, got {tuple(source_images.shape)} "
            f"and {tuple(target_images.shape)}"
        )
    n, _, h, w = target_images.shape
    m = check_tensor("mask", mask)
    if m.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {m.dtype}")
    if tuple(m.shape) != (n, h, w):
        raise ValueError(f"mask must have shape {(n, h, w)}, got {tuple(m.shape)}")
    for name, t in (("source_images", source_images), ("mask", m)):
        if t.device != target_images.device:
            raise ValueError(
                f"{name} is on {t.device} but target_images is on {target_images.device}: put "
                "them on one device"
            )
    for name, t in (("source_labels", source_labels), ("target_labels", target_labels)):
        check_label_map(name, t, (n, h, w), device=target_images.device, reference="target_images")
    if source_images.dtype != target_images.dtype:
        raise TypeError(
            "source_images and target_images must share a dtype (a uint8/float mix pastes 0-255 "
            f"values into [0, 1] images), got {source_images.dtype} and {target_images.dtype}"
        )
    for name, t in (
        ("source_images", source_images),
        ("source_labels", source_labels),
        ("target_labels", target_labels),
        ("mask", m),
    ):
        if t.device != target_images.device:
            raise ValueError(
                f"{name} must be on target_images' device {target_images.device}, got {t.device}"
            )
    images = torch.where(m.unsqueeze(1), source_images, target_images)
    labels = torch.where(m, source_labels.to(target_labels.dtype), target_labels)
    return ClassMixResult(images, labels, m)


class ClassMix(nn.Module):
    """Module form: draws the masks from the source labels, then mixes.

    >>> import torch
    >>> mix = ClassMix(19)
    >>> out = mix(torch.rand(2, 3, 8, 8), torch.randint(0, 19, (2, 8, 8)), torch.rand(2, 3, 8, 8),
    ...           torch.randint(0, 19, (2, 8, 8)), generator=torch.Generator().manual_seed(0))
    >>> out.images.shape, out.mask.dtype
    (torch.Size([2, 3, 8, 8]), torch.bool)
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.ignore_index = check_ignore_index(ignore_index, self.num_classes)

    def forward(
        self,
        source_images: torch.Tensor,
        source_labels: torch.Tensor,
        target_images: torch.Tensor,
        target_labels: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> ClassMixResult:
        mask = classmix_masks(
            source_labels, self.num_classes, generator=generator, ignore_index=self.ignore_index
        )
        return classmix(source_images, source_labels, target_images, target_labels, mask)


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
