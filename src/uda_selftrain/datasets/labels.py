"""Label protocols: class names, id maps, the Cityscapes palette, colourising (method §6).

Everything here is plain numpy/torch (no image library). Maps are applied through a lookup table,
so a whole label image is converted in one indexing operation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELID_TO_TRAINID",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_TO_OXFORD",
    "CITYSCAPES_TO_THINGS",
    "IGNORE_INDEX",
    "OXFORD_CLASSES",
    "OXFORD_ID_TO_TRAINID",
    "OXFORD_PALETTE",
    "SYNTHIA_ABSENT_CLASSES",
    "SYNTHIA_ID_TO_TRAINID",
    "THINGS_CLASSES",
    "colorize",
    "decolorize",
    "lookup_table",
    "map_labels",
]

IGNORE_INDEX = 255

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

#: The official Cityscapes colours of the 19 train ids.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
        (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
        (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
        (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip

#: Cityscapes (and GTA5) labelId → trainId; every other id is ignored.
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

#: SYNTHIA RAND-CITYSCAPES class id (channel 0 of the 16-bit label) → trainId.
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip

#: Train ids that never occur in SYNTHIA: terrain, truck, train.
SYNTHIA_ABSENT_CLASSES = (9, 14, 16)

OXFORD_CLASSES = (
    "car", "person", "bike", "pole", "sky", "traffic light", "traffic sign", "building", "road",
)  # fmt: skip

#: Oxford RobotCar annotation id (channel 0 of the RGBA label) → Oxford train id (9 classes).
OXFORD_ID_TO_TRAINID: dict[int, int] = {
    1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 10: 7, 11: 8, 12: 8, 13: 8, 14: 8, 17: 8,
}  # fmt: skip

#: Cityscapes train id → Oxford train id (the 19 → 9 protocol of Cityscapes → Oxford RobotCar).
CITYSCAPES_TO_OXFORD: dict[int, int] = {
    0: 8, 1: 7, 2: 6, 6: 5, 7: 4, 10: 0, 11: 1, 12: 1, 13: 3, 14: 3, 15: 3, 17: 2, 18: 2,
}  # fmt: skip

#: The "things" protocol of the synthetic city's imbalance study: its eight stuff classes (road,
#: sidewalk, building, wall, fence, vegetation, terrain, sky) merged into one background, about
#: 90 % of the pixels, and its 11 thin or countable classes kept.
THINGS_CLASSES = (
    "background", "pole", "traffic light", "traffic sign", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: Cityscapes train id → things train id (19 → 12).
CITYSCAPES_TO_THINGS: dict[int, int] = {c: 0 for c in (0, 1, 2, 3, 4, 8, 9, 10)} | {
    c: i + 1 for i, c in enumerate((5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18))
}

#: Colours of the 9 Oxford classes (taken from their Cityscapes counterparts).
OXFORD_PALETTE = CITYSCAPES_PALETTE[[13, 11, 18, 5, 10, 6, 7, 2, 0]]


def lookup_table(
    mapping: Mapping[int, int], *, size: int = 256, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """A ``(size,)`` uint8 table with ``table[k] = mapping.get(k, ignore_index)``.

    >>> lookup_table({7: 0, 8: 1}, size=10).tolist()
    [255, 255, 255, 255, 255, 255, 255, 0, 1, 255]
    """
    if size <= max(mapping, default=0):
        raise ValueError(f"size {size} is too small for id {max(mapping)}")
    table = np.full(size, ignore_index, dtype=np.uint8)
    for k, v in mapping.items():
        table[int(k)] = int(v)
    return table


def map_labels(labels: np.ndarray | torch.Tensor, table: np.ndarray) -> np.ndarray | torch.Tensor:
    """Map every id of an integer label array through ``table`` (ids beyond it are ignored).

    Works on numpy arrays and tensors (on their device); returns uint8.

    >>> import numpy as np
    >>> map_labels(np.array([[7, 8], [0, 300]]), lookup_table({7: 0, 8: 1})).tolist()
    [[0, 1], [255, 255]]
    """
    if isinstance(labels, torch.Tensor):
        t = torch.as_tensor(np.append(table, IGNORE_INDEX).astype(np.uint8), device=labels.device)
        idx = labels.long().clamp(0, len(table))
        idx = torch.where((labels < 0) | (labels >= len(table)), len(table), idx)
        return t[idx]
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got {arr.dtype}")
    ext = np.append(table, IGNORE_INDEX).astype(np.uint8)
    # As intp: under NumPy >= 2.5 an out-of-range index such as 256 no longer fits a uint8 array.
    idx = np.where((arr < 0) | (arr >= len(table)), len(table), arr.astype(np.intp, copy=False))
    return ext[idx]


def colorize(
    labels: np.ndarray | torch.Tensor, *, palette: np.ndarray = CITYSCAPES_PALETTE
) -> np.ndarray:
    """RGB image ``(..., H, W, 3)`` uint8 of a train-id map; ignored (and unknown) ids are black.

    >>> colorize(np.array([[0, 255]])).tolist()
    [[[128, 64, 128], [0, 0, 0]]]
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got {arr.dtype}")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    return table[np.clip(arr, 0, 255)]


def decolorize(rgb: np.ndarray, *, palette: np.ndarray = CITYSCAPES_PALETTE) -> np.ndarray:
    """Inverse of :func:`colorize`: ``(..., H, W, 3)`` uint8 → train ids, other colours → 255.

    >>> decolorize(colorize(np.array([[3, 255, 18]]))).tolist()
    [[3, 255, 18]]
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb must end with 3 channels, got shape {rgb.shape}")
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pal = (
        (palette[:, 0].astype(np.int64) << 16)
        | (palette[:, 1].astype(np.int64) << 8)
        | palette[:, 2]
    )
    order = np.argsort(pal)
    pos = np.clip(np.searchsorted(pal[order], code), 0, len(pal) - 1)
    found = pal[order][pos] == code
    return np.where(found, order[pos], IGNORE_INDEX).astype(np.uint8)
