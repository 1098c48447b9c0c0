"""Models: DeepLabV2 (ResNet-101 and a CPU-sized variant), the AdaptSegNet discriminator, and
checkpoint import (public HIAST files, torchvision ImageNet and MS-COCO DeepLab initial weights)."""

from .checkpoint import LoadReport, convert_state_dict, load_backbone, load_checkpoint
from .deeplab import ASPP, DeepLabV2, ResNet, deeplabv2_resnet101, deeplabv2_small
from .discriminator import FCDiscriminator

__all__ = [
    "ASPP",
    "DeepLabV2",
    "FCDiscriminator",
    "LoadReport",
    "ResNet",
    "convert_state_dict",
    "deeplabv2_resnet101",
    "deeplabv2_small",
    "load_backbone",
    "load_checkpoint",
]
