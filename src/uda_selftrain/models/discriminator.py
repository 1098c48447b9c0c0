"""The AdaptSegNet output-space discriminator (method §1.1)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .._checks import check_float, check_positive_int

__all__ = ["FCDiscriminator"]


class FCDiscriminator(nn.Module):
    """Five 4 × 4 stride-2 convolutions ``C → ndf → 2ndf → 4ndf → 8ndf → 1`` with LeakyReLU 0.2.

    Input ``(N, C, H, W)`` class probabilities; output ``(N, 1, H/32, W/32)`` domain logits
    (≥ 1 × 1: inputs smaller than 32 pixels still give one cell per 2 pixels of the last stage).

    >>> import torch
    >>> FCDiscriminator(19)(torch.rand(2, 19, 64, 128)).shape
    torch.Size([2, 1, 2, 4])
    """

    def __init__(self, num_classes: int, *, ndf: int = 64) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("ndf", ndf)
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(chans):
            layers += [nn.Conv2d(a, b, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(chans[-1], 1, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float("x", x, ndim=4, shape_hint="(N, C, H, W) class probabilities")
        return self.net(x)
