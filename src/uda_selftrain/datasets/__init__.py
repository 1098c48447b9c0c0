"""Datasets: readers for GTA5, SYNTHIA, Cityscapes and Oxford RobotCar, label protocols, the
pseudo-label target dataset, and the built-in synthetic city (``uda_selftrain.datasets.synthetic``).

Image files are decoded with Pillow (and OpenCV for 16-bit labels), from the ``data`` extra,
imported only when a file is read.
"""

from .labels import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    CITYSCAPES_TO_OXFORD,
    CITYSCAPES_TO_THINGS,
    IGNORE_INDEX,
    OXFORD_CLASSES,
    OXFORD_ID_TO_TRAINID,
    OXFORD_PALETTE,
    SYNTHIA_ABSENT_CLASSES,
    SYNTHIA_ID_TO_TRAINID,
    THINGS_CLASSES,
    colorize,
    decolorize,
    lookup_table,
    map_labels,
)
from .pseudo import PseudoLabelDataset, pseudo_label_path
from .readers import (
    GTA5,
    SYNTHIA,
    Cityscapes,
    DatasetLayoutError,
    MappedLabels,
    OxfordRobotCar,
    SegmentationFiles,
)

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELID_TO_TRAINID",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_TO_OXFORD",
    "CITYSCAPES_TO_THINGS",
    "GTA5",
    "IGNORE_INDEX",
    "OXFORD_CLASSES",
    "OXFORD_ID_TO_TRAINID",
    "OXFORD_PALETTE",
    "SYNTHIA",
    "SYNTHIA_ABSENT_CLASSES",
    "SYNTHIA_ID_TO_TRAINID",
    "THINGS_CLASSES",
    "Cityscapes",
    "DatasetLayoutError",
    "MappedLabels",
    "OxfordRobotCar",
    "PseudoLabelDataset",
    "SegmentationFiles",
    "colorize",
    "decolorize",
    "lookup_table",
    "map_labels",
    "pseudo_label_path",
]
