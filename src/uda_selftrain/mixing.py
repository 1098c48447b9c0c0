"""ClassMix: half of the classes of one image pasted onto another (Olsson et al., WACV 2021; DACS).

Per image, half of the classes present in the source label (rounded up, chosen uniformly) are
pasted onto the target image; the mask is returned. Hard-aware copy-paste, HIAST's own mixing, is
in :mod:`uda_selftrain.paste`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._checks import (
    check_ignore_index,
    check_label_map,
    check_labels,
    check_positive_int,
    check_tensor,
)
from ._histogram import count

__all__ = [
    "ClassMix",
    "ClassMixResult",
    "classmix",
    "classmix_masks",
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
