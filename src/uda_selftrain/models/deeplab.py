"""DeepLabV2 with a ResNet backbone, as in the public HIAST implementation, and a small variant.

``deeplabv2_resnet101``: a torchvision-layout ResNet-101 (Bottleneck v1.5, stride on the 3 × 3
convolution) whose layers 3 and 4 use dilation 2 and 4 instead of stride (output stride 8), and a
classifier of four parallel 3 × 3 convolutions with dilations 6, 12, 18, 24 (with bias) whose
outputs are *summed*. Parameter names follow torchvision under ``backbone.`` and ``aspp.conv2d_list``,
so the public checkpoints and torchvision's ImageNet weights load by name
(:mod:`uda_selftrain.models.checkpoint`).

``deeplabv2_small``: the same design with basic blocks, widths 16–128 and one block per stage,
which trains on a 2-core CPU in minutes (the synthetic-city default).

Batch norm (method §1.5): ``bn_mode="frozen"`` (default) keeps every BN layer in eval mode with its
affine parameters fixed, whatever ``model.train()`` says; ``"public"`` fixes the affine parameters but
keeps updating running statistics in training mode (the public implementation's behaviour);
``"train"`` is ordinary batch norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_positive_int, check_tensor

__all__ = ["ASPP", "DeepLabV2", "ResNet", "deeplabv2_resnet101", "deeplabv2_small"]

BN_MODES = ("frozen", "public", "train")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet trunk (no pooling/fc) with layers 3 and 4 dilated (stride 8).

    Args:
        block: ``Bottleneck`` or ``BasicBlock``.
        layers: blocks per stage (``[3, 4, 23, 3]`` for ResNet-101).
        widths: base width of each stage (``[64, 128, 256, 512]``).
        stem: channels of the 7 × 7 stem convolution.
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: Sequence[int],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: int = 64,
    ) -> None:
        super().__init__()
        self.inplanes = stem
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2, dilate=True)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, dilate=True)
        self.out_channels = widths[3] * block.expansion  # type: ignore[attr-defined]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        # As torchvision's replace_stride_with_dilation: the first block keeps the previous
        # dilation, the others use the new one.
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, previous, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPP(nn.Module):
    """DeepLabV2 classifier: parallel dilated 3 × 3 convolutions (with bias), summed."""

    def __init__(
        self, in_channels: int, num_classes: int, *, dilations: Sequence[int] = (6, 12, 18, 24)
    ) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True)
            for d in dilations
        )
        for m in self.conv2d_list:
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """Backbone + ASPP. ``forward(x)`` returns logits at the input size (bilinear upsampling);
    :meth:`forward_features`... :meth:`logits` returns them at the feature size (stride 8).

    Args:
        backbone: a :class:`ResNet`.
        num_classes: output classes.
        dilations: ASPP dilations.
        bn_mode: ``"frozen"`` (default), ``"public"`` or ``"train"`` (module docstring).

    Input ``(N, 3, H, W)`` normalised with the ImageNet mean/std; output ``(N, C, H, W)``.
    """

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int = 19,
        *,
        dilations: Sequence[int] = (6, 12, 18, 24),
        bn_mode: str = "frozen",
    ) -> None:
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        check_positive_int("num_classes", num_classes)
        self.backbone = backbone
        self.aspp = ASPP(backbone.out_channels, num_classes, dilations=dilations)
        self.num_classes = num_classes
        self.bn_mode = bn_mode
        if bn_mode in ("frozen", "public"):
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.bn_mode == "frozen":
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` logits at the feature resolution (``h = ⌈H / 8⌉`` for the stem)."""
        return self.aspp(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)
        if not x.is_floating_point():
            raise TypeError(
                f"x must be a float tensor of normalised images, got {x.dtype} (convert uint8 "
                "images with uda_selftrain.normalize)"
            )
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (N, 3, H, W), got {tuple(x.shape)}")
        out = self.logits(x)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def parameter_groups(self, lr: float, *, head_multiplier: float = 10.0) -> list[dict]:
        """Optimiser groups: backbone at ``lr``, the head at ``lr × head_multiplier`` (method §1.3)."""
        return [
            {
                "params": [p for p in self.backbone.parameters() if p.requires_grad],
                "lr": lr,
                "base_lr": lr,
            },
            {
                "params": list(self.aspp.parameters()),
                "lr": lr * head_multiplier,
                "base_lr": lr * head_multiplier,
            },
        ]


def deeplabv2_resnet101(num_classes: int = 19, *, bn_mode: str = "frozen") -> DeepLabV2:
    """The paper's model: DeepLabV2 on ResNet-101 (about 43 M parameters).

    >>> m = deeplabv2_resnet101()
    >>> sum(p.numel() for p in m.parameters()) // 10**6
    43
    """
    return DeepLabV2(ResNet(Bottleneck, [3, 4, 23, 3]), num_classes, bn_mode=bn_mode)


def deeplabv2_small(num_classes: int = 19, *, bn_mode: str = "train", width: int = 16) -> DeepLabV2:
    """A CPU-sized DeepLabV2 (basic blocks, widths ``width·(1, 2, 4, 8)``, ASPP dilations 1–4).

    Trained from scratch, so its batch norm trains by default.

    >>> import torch
    >>> m = deeplabv2_small().eval()
    >>> m(torch.zeros(1, 3, 48, 96)).shape
    torch.Size([1, 19, 48, 96])
    """
    check_positive_int("width", width)
    widths = (width, 2 * width, 4 * width, 8 * width)
    backbone = ResNet(BasicBlock, [1, 1, 1, 1], widths=widths, stem=width)
    return DeepLabV2(backbone, num_classes, dilations=(1, 2, 3, 4), bn_mode=bn_mode)
