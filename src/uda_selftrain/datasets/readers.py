"""``torch.utils.data.Dataset`` readers for GTA5, SYNTHIA, Cityscapes and Oxford RobotCar (method §6).

Every reader discovers its files from the dataset's standard layout (or from an optional
split-list file of relative paths), checks that each image has its label, maps label ids to train
ids through a lookup table and returns::

    {"image": uint8 (3, H, W), "label": int64 (H, W) (255 = ignore), "name": str, "index": int}

Unlabelled splits return an all-255 label. ``size=(H, W)`` resizes on load (bilinear image,
nearest label); a label whose size differs from its image (a few GTA5 files) is resized to the
image with nearest neighbour. Missing folders, empty folders, unreadable files and images without
labels raise errors that name the path and the expected layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .image_io import read_label, read_rgb
from .labels import (
    CITYSCAPES_LABELID_TO_TRAINID,
    IGNORE_INDEX,
    OXFORD_ID_TO_TRAINID,
    SYNTHIA_ID_TO_TRAINID,
    lookup_table,
    map_labels,
)

__all__ = [
    "GTA5",
    "SYNTHIA",
    "Cityscapes",
    "DatasetLayoutError",
    "MappedLabels",
    "OxfordRobotCar",
    "SegmentationFiles",
]

PathLike = str | os.PathLike[str]


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder does not have the expected layout (missing, empty or unpaired files)."""


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DatasetLayoutError(f"folder {path} not found; expected layout:\n{layout}")
    return path


def _list(folder: Path, pattern: str, layout: str, recursive: bool = False) -> list[Path]:
    files = sorted(folder.rglob(pattern) if recursive else folder.glob(pattern))
    if not files:
        raise DatasetLayoutError(
            f"no files matching {pattern!r} in {folder}; expected layout:\n{layout}"
        )
    return files


def _from_list(root: Path, split_list: PathLike, layout: str) -> list[Path]:
    lst = Path(split_list)
    if not lst.is_file():
        raise DatasetLayoutError(f"split list {lst} not found")
    names = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
    if not names:
        raise DatasetLayoutError(f"split list {lst} is empty")
    files = [root / n for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} files of {lst} are missing, e.g. {missing[0]}; expected layout:\n{layout}"
        )
    return files


def _pair(images: list[Path], label_of: Callable[[Path], Path], layout: str) -> list[Path]:
    labels = [label_of(p) for p in images]
    missing = [(i, lab) for i, lab in zip(images, labels, strict=True) if not lab.is_file()]
    if missing:
        img, lab = missing[0]
        raise DatasetLayoutError(
            f"{len(missing)} of {len(images)} images have no label, e.g. {img} (expected {lab}); "
            f"expected layout:\n{layout}"
        )
    return labels


def _same_name_pairs(
    image_dir: Path, label_dir: Path, split_list: PathLike | None, layout: str
) -> tuple[list[Path], list[Path], Path]:
    """``image_dir/*.png`` (or the split list's files) paired with ``label_dir/<same name>``."""
    _require_dir(image_dir, layout)
    _require_dir(label_dir, layout)
    if split_list is not None:
        images = _from_list(image_dir, split_list, layout)
    else:
        images = _list(image_dir, "*.png", layout)
    return images, _pair(images, lambda p: label_dir / p.name, layout), image_dir


class SegmentationFiles(Dataset):
    """A list of image files with optional label files, read and mapped on access.

    Args:
        images: image paths.
        labels: label paths (same length) or None for an unlabelled set.
        table: lookup table from file ids to train ids (None: ids are train ids already).
        size: optional ``(H, W)`` to resize to.
        read_label_fn: how to read a label file (``read_label`` by default).
        root: folder the names are made relative to.
    """

    def __init__(
        self,
        images: Sequence[Path],
        labels: Sequence[Path] | None = None,
        *,
        table: np.ndarray | None = None,
        size: tuple[int, int] | None = None,
        read_label_fn: Callable[[Path], np.ndarray] = read_label,
        root: Path | None = None,
    ) -> None:
        self.images = list(images)
        self.labels = list(labels) if labels is not None else None
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetLayoutError(
                f"{len(self.images)} images but {len(self.labels)} labels"
                + (f" under {root}" if root else "")
            )
        self.table = table
        self.size = tuple(size) if size is not None else None
        self.read_label_fn = read_label_fn
        self.root = root

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        """The image's path relative to the dataset root (its identifier)."""
        p = self.images[index]
        return str(p.relative_to(self.root)) if self.root is not None else p.name

    def read_image(self, index: int) -> np.ndarray:
        return read_rgb(self.images[index])

    def read_train_ids(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        if self.labels is None:
            return np.full(shape, IGNORE_INDEX, dtype=np.uint8)
        raw = self.read_label_fn(self.labels[index])
        ids = map_labels(raw, self.table) if self.table is not None else raw.astype(np.uint8)
        if ids.shape != shape:
            ids = _resize_nearest(ids, shape)
        return ids

    @property
    def label_maps(self) -> Sequence[np.ndarray]:
        """The train-id label maps at their files' own size, read lazily by index (no image is
        read): the input of :func:`uda_selftrain.class_pixel_counts`."""
        if self.labels is None:
            raise ValueError(
                "this dataset has no labels" + (f" (under {self.root})" if self.root else "")
            )
        return _LabelMaps(self)

    def __getitem__(self, index: int) -> dict[str, object]:
        img = self.read_image(index)
        lab = self.read_train_ids(index, img.shape[:2])
        image = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
        label = torch.from_numpy(np.array(lab, dtype=np.int64))
        if self.size is not None and tuple(image.shape[1:]) != self.size:
            image = _resize_image(image, self.size)
            label = torch.from_numpy(_resize_nearest(lab, self.size)).long()
        return {"image": image, "label": label, "name": self.name(index), "index": index}


class _LabelMaps(Sequence):
    def __init__(self, files: SegmentationFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        f = self.files
        raw = f.read_label_fn(f.labels[index])
        return map_labels(raw, f.table) if f.table is not None else raw.astype(np.uint8)


def _resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = labels.shape
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return labels[ys[:, None], xs[None, :]]


def _resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    x = image.unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


_GTA5_LAYOUT = "  <root>/images/*.png\n  <root>/labels/*.png  (Cityscapes label ids, same names)"


class GTA5(SegmentationFiles):
    """GTA5: ``<root>/images/*.png`` with ``<root>/labels/*.png`` (Cityscapes label ids).

    >>> GTA5("/no/such/folder")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    uda_selftrain.datasets.readers.DatasetLayoutError: folder /no/such/folder/images not found...
    """

    def __init__(
        self,
        root: PathLike,
        *,
        split_list: PathLike | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        images, labels, image_dir = _same_name_pairs(
            Path(root) / "images", Path(root) / "labels", split_list, _GTA5_LAYOUT
        )
        super().__init__(
            images,
            labels,
            table=lookup_table(CITYSCAPES_LABELID_TO_TRAINID),
            size=size,
            root=image_dir,
        )


_SYNTHIA_LAYOUT = (
    "  <root>/RGB/*.png\n  <root>/GT/LABELS/*.png  (16-bit PNG, class id in channel 0, same names)"
)


class SYNTHIA(SegmentationFiles):
    """SYNTHIA RAND-CITYSCAPES: ``<root>/RGB/*.png``, ``<root>/GT/LABELS/*.png`` (16-bit, channel 0).

    Train ids 9 (terrain), 14 (truck) and 16 (train) never occur.
    """

    def __init__(
        self,
        root: PathLike,
        *,
        split_list: PathLike | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        images, labels, image_dir = _same_name_pairs(
            Path(root) / "RGB", Path(root) / "GT" / "LABELS", split_list, _SYNTHIA_LAYOUT
        )
        super().__init__(
            images,
            labels,
            table=lookup_table(SYNTHIA_ID_TO_TRAINID, size=65536),
            size=size,
            root=image_dir,
        )


_CITYSCAPES_LAYOUT = (
    "  <root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png\n"
    "  <root>/gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png (or _labelTrainIds.png)"
)


class Cityscapes(SegmentationFiles):
    """Cityscapes ``train``/``val`` images, labelled from ``*_gtFine_labelIds.png`` (mapped to train
    ids) or ``*_gtFine_labelTrainIds.png`` (used as is), or unlabelled (``label_type=None``).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        label_type: str | None = "labelIds",
        split_list: PathLike | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        if label_type not in ("labelIds", "labelTrainIds", None):
            raise ValueError(
                f"label_type must be 'labelIds', 'labelTrainIds' or None, got {label_type!r}"
            )
        root = Path(root)
        image_dir = _require_dir(root / "leftImg8bit" / split, _CITYSCAPES_LAYOUT)
        if split_list is not None:
            images = _from_list(image_dir, split_list, _CITYSCAPES_LAYOUT)
        else:
            images = _list(image_dir, "*_leftImg8bit.png", _CITYSCAPES_LAYOUT, recursive=True)
        labels = None
        table = None
        if label_type is not None:
            gt_dir = _require_dir(root / "gtFine" / split, _CITYSCAPES_LAYOUT)
            suffix = f"_gtFine_{label_type}.png"

            def label_of(p: Path) -> Path:
                rel = p.relative_to(image_dir)
                return gt_dir / rel.parent / p.name.replace("_leftImg8bit.png", suffix)

            labels = _pair(images, label_of, _CITYSCAPES_LAYOUT)
            if label_type == "labelIds":
                table = lookup_table(CITYSCAPES_LABELID_TO_TRAINID)
        super().__init__(images, labels, table=table, size=size, root=image_dir)


_OXFORD_LAYOUT = (
    "  <root>/train/<sequence>/*.png   (unlabelled)\n"
    "  <root>/val/*.png\n  <root>/anno/*.png   (RGBA, annotation id in channel 0, same names)"
)


class OxfordRobotCar(SegmentationFiles):
    """Oxford RobotCar (the Cityscapes → Oxford benchmark): unlabelled ``train`` (recursive) and
    labelled ``val`` (``<root>/anno``, annotation ids mapped to the 9 Oxford classes).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        split_list: PathLike | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        image_dir = _require_dir(root / split, _OXFORD_LAYOUT)
        if split_list is not None:
            images = _from_list(image_dir, split_list, _OXFORD_LAYOUT)
        else:
            images = _list(image_dir, "*.png", _OXFORD_LAYOUT, recursive=split == "train")
        labels = None
        table = None
        if split == "val":
            anno = _require_dir(root / "anno", _OXFORD_LAYOUT)
            labels = _pair(images, lambda p: anno / p.name, _OXFORD_LAYOUT)
            table = lookup_table(OXFORD_ID_TO_TRAINID)
        super().__init__(images, labels, table=table, size=size, root=image_dir)


class MappedLabels(Dataset):
    """A reader whose train ids go through a lookup table: another label protocol of the same
    images (Cityscapes 19 → Oxford 9 for Cityscapes → Oxford RobotCar, the city 19 → things 12).

    Args:
        base: a dataset of ``{"image", "label", "name"}`` items (``label`` ``(H, W)`` train ids).
        table: a ``(K,)`` uint8 table from :func:`~uda_selftrain.datasets.lookup_table`.

    >>> import numpy as np, torch
    >>> from uda_selftrain.datasets import lookup_table
    >>> base = [{"image": torch.zeros(3, 1, 2), "label": torch.tensor([[0, 5]]), "name": "a"}]
    >>> MappedLabels(base, lookup_table({5: 1}))[0]["label"].tolist()
    [[255, 1]]
    """

    def __init__(self, base: Dataset, table: np.ndarray) -> None:
        self.base, self.table = base, table

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["label"] = map_labels(item["label"], self.table).long()
        return item
