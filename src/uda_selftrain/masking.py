"""Masked Image Consistency (MIC): learn target context from images with most patches removed.

The target image is cut into ``b × b`` blocks and each block is dropped independently with
probability ``r`` (MIC: ``r = 0.7``, ``b = 64`` on 512 × 512 crops, i.e. 1/8 of the crop side):

    M_{mb+i, nb+j} = [u_mn > r],   u_mn ~ U(0, 1),        x_M = M ⊙ x

applied to *normalised* images, so a dropped block reads as the mean colour (0). The student
predicts the masked image and is trained on the teacher's pseudo-labels of the *unmasked* image,
weighted by their quality ``q`` (the fraction of the teacher's pixels with confidence ≥ 0.968):

    L_mic = λ · 1/(N·H·W) Σ_n Σ_p q_{n,p} · CE(f_θ(x_M)_{n,p}, ŷ_{n,p}),     λ = 1,

where pixels without a pseudo-label (``ignore_index``) contribute 0 but count in the mean (MIC's
convention). :func:`mic_block_size` scales the published block size to another crop.

>>> import torch
>>> x = torch.randn(2, 3, 64, 128)
>>> masked = mask_images(x, block_size=16, generator=torch.Generator().manual_seed(0))
>>> masked.images.shape, masked.mask.shape
(torch.Size([2, 3, 64, 128]), torch.Size([2, 1, 64, 128]))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_finite,
    check_float,
    check_labels,
    check_positive_int,
    check_unit_interval,
    check_weight,
)

__all__ = [
    "BlockMasking",
    "MaskedImageConsistencyLoss",
    "MaskedImages",
    "block_mask",
    "mask_images",
    "masked_consistency_loss",
    "mic_block_size",
]


def mic_block_size(crop_size: tuple[int, int], *, reference: int = 512, block: int = 64) -> int:
    """The published block size (64 px on 512-px crops) scaled to ``crop_size``'s shorter side.

    >>> mic_block_size((512, 1024)), mic_block_size((64, 128))
    (64, 8)
    """
    check_positive_int("reference", reference)
    check_positive_int("block", block)
    side = min(int(s) for s in crop_size)
    check_positive_int("crop_size", side)
    return max(1, round(block * side / reference))


def _check_ratio(ratio: object) -> float:
    return check_unit_interval("ratio", ratio, open_high=True)  # type: ignore[arg-type]


def block_mask(
    n: int,
    size: tuple[int, int],
    *,
    ratio: float = 0.7,
    block_size: int = 64,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(N, 1, H, W)`` block mask: 1 where the pixel is kept, 0 where its block is dropped.

    The ``⌈H/b⌉ × ⌈W/b⌉`` block draws come from ``generator`` on the CPU (the same mask on every
    device for a seed) and are expanded to pixels on ``device`` (edge blocks are cut at the border).

    Args:
        n: images.
        size: ``(H, W)``.
        ratio: probability ``r`` that a block is dropped (MIC: 0.7), in ``[0, 1)``.
        block_size: ``b`` in pixels (MIC: 64 on 512-px crops; see :func:`mic_block_size`).

    Shape:
        → ``(N, 1, H, W)`` in ``dtype``.

    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> block_mask(1, (4, 6), ratio=0.5, block_size=2, generator=gen)[0, 0].tolist()
    [[0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]
    """
    check_positive_int("n", n)
    r = _check_ratio(ratio)
    b = check_positive_int("block_size", block_size)
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(isinstance(s, int) and s > 0 for s in size)
    ):
        raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
    h, w = int(size[0]), int(size[1])
    gh, gw = math.ceil(h / b), math.ceil(w / b)
    keep = torch.rand(n, 1, gh, gw, generator=generator) > r
    keep = keep.to(device=device)
    return keep.repeat_interleave(b, 2)[:, :, :h].repeat_interleave(b, 3)[..., :w].to(dtype)


class MaskedImages(NamedTuple):
    """Masked images and their mask.

    Attributes:
        images: ``(N, 3, H, W)`` the input with dropped blocks set to 0.
        mask: ``(N, 1, H, W)`` 1 where kept, 0 where dropped (input dtype).
    """

    images: torch.Tensor
    mask: torch.Tensor


def mask_images(
    images: torch.Tensor,
    *,
    ratio: float = 0.7,
    block_size: int = 64,
    generator: torch.Generator | None = None,
) -> MaskedImages:
    """Drop random ``block_size`` blocks of each (normalised) image with probability ``ratio``.

    Args:
        images: ``(N, 3, H, W)`` float, normalised (0 is the mean colour).
        ratio: ``r`` (0.7).
        block_size: ``b`` (64 on 512-px crops).
        generator: CPU generator of the block draws.

    Returns:
        :class:`MaskedImages` on the images' device and dtype.

    Shape:
        images ``(N, 3, H, W)`` → images ``(N, 3, H, W)``, mask ``(N, 1, H, W)``.

    >>> import torch
    >>> out = mask_images(torch.ones(1, 3, 8, 8), ratio=0.0, block_size=4)
    >>> bool(out.mask.all()), bool(out.images.eq(1).all())
    (True, True)
    """
    x = check_float("images", images, ndim=4, shape_hint="(N, 3, H, W)")
    if x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (N, 3, H, W) with N >= 1, got {tuple(x.shape)}")
    m = block_mask(
        x.shape[0],
        (x.shape[2], x.shape[3]),
        ratio=ratio,
        block_size=block_size,
        generator=generator,
        device=x.device,
        dtype=x.dtype,
    )
    return MaskedImages(x * m, m)


class BlockMasking(nn.Module):
    """:func:`mask_images` with its options held: random block masking of target images.

    Args:
        ratio: probability a block is dropped (0.7).
        block_size: block side in pixels (64 on 512-px crops).

    Shape:
        images ``(N, 3, H, W)`` → :class:`MaskedImages` (``(N, 3, H, W)``, ``(N, 1, H, W)``).

    >>> import torch
    >>> masking = BlockMasking(block_size=mic_block_size((64, 128)))
    >>> masking(torch.randn(2, 3, 64, 128), generator=torch.Generator().manual_seed(0)).mask.shape
    torch.Size([2, 1, 64, 128])
    """

    def __init__(self, *, ratio: float = 0.7, block_size: int = 64) -> None:
        super().__init__()
        self.ratio = _check_ratio(ratio)
        self.block_size = check_positive_int("block_size", block_size)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, block_size={self.block_size}"

    def forward(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> MaskedImages:
        return mask_images(
            images, ratio=self.ratio, block_size=self.block_size, generator=generator
        )


def _check_quality(weight: object, n: int, hw: tuple[int, int]) -> torch.Tensor | None:
    if weight is None:
        return None
    w = check_float("weight", weight)
    if tuple(w.shape) not in ((n,), (n, *hw)):
        raise ValueError(
            f"weight must have shape ({n},) (one quality per image) or {(n, *hw)} (per pixel), got "
            f"{tuple(w.shape)}"
        )
    check_finite("weight", w)
    return w


def masked_consistency_loss(
    logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    ignore_index: int = 255,
) -> torch.Tensor:
    """MIC's masked-image loss: quality-weighted CE of the student's prediction on the masked
    image against the teacher's pseudo-labels of the full image, averaged over all pixels.

    ``1/(N·H·W) Σ q · CE``; pixels at ``ignore_index`` add 0 but count in the mean. Computed in
    float32 (float64 for float64 input).

    Args:
        logits: ``(N, C, H, W)`` student logits on the masked images.
        pseudo_labels: ``(N, H, W)`` int teacher labels (arg-max of the unmasked image).
        weight: ``(N,)`` per-image quality (e.g. :func:`confidence_weight`) or ``(N, H, W)``
            per-pixel weights; None for 1.

    Returns:
        Scalar loss (0 with a zero gradient when every pixel is ignored).

    Shape:
        logits ``(N, C, H, W)``, pseudo_labels ``(N, H, W)``, weight ``(N,)`` or ``(N, H, W)`` → ``()``.

    >>> import torch
    >>> y = torch.zeros(1, 2, 2, dtype=torch.long)
    >>> round(masked_consistency_loss(torch.zeros(1, 4, 2, 2), y, torch.tensor([0.5])).item(), 4)
    0.6931
    """
    x = check_float("logits", logits, ndim=4, shape_hint="(N, C, H, W)")
    n, c, h, w = x.shape
    if n == 0:  # the mean over no pixels would be NaN and poison the total loss
        raise ValueError("logits must hold at least one image (N >= 1), got an empty batch")
    y = check_labels("pseudo_labels", pseudo_labels, (n, h, w), c, ignore_index)
    check_finite("logits", x)
    q = _check_quality(weight, n, (h, w))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(x.to(dtype), y.long(), ignore_index=ignore_index, reduction="none")
    if q is not None:
        ce = ce * (q.to(ce.dtype).view(n, 1, 1) if q.dim() == 1 else q.to(ce.dtype))
    return ce.mean()


class MaskedImageConsistencyLoss(nn.Module):
    """:func:`masked_consistency_loss` times ``weight`` (MIC's ``λ = 1``).

    Args:
        weight: ``λ``.
        ignore_index: pseudo-label of pixels without one.

    Shape:
        logits ``(N, C, H, W)``, pseudo_labels ``(N, H, W)``, quality ``(N,)`` / ``(N, H, W)`` → ``()``.

    >>> import torch
    >>> loss = MaskedImageConsistencyLoss()
    >>> loss(torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8)), torch.ones(2)).shape
    torch.Size([])
    """

    def __init__(self, *, weight: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.weight = check_weight("weight", weight)
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"weight={self.weight}, ignore_index={self.ignore_index}"

    def forward(
        self,
        logits: torch.Tensor,
        pseudo_labels: torch.Tensor,
        quality: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.weight * masked_consistency_loss(
            logits, pseudo_labels, quality, ignore_index=self.ignore_index
        )
