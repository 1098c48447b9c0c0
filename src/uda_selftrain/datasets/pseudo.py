"""Target-domain dataset serving saved pseudo-labels and, for HPLA, the donors of each sample."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..donors import DonorSampler
from .image_io import read_label
from .labels import IGNORE_INDEX
from .readers import DatasetLayoutError, SegmentationFiles, _resize_image, _resize_nearest

__all__ = ["PseudoLabelDataset", "pseudo_label_path"]


def pseudo_label_path(folder: str | os.PathLike[str], name: str) -> Path:
    """Where the pseudo-label of the sample called ``name`` lives: ``folder/<name>.png``."""
    return Path(folder) / Path(name).with_suffix(".png")


class PseudoLabelDataset(Dataset):
    """Target images with their saved pseudo-labels (8-bit PNG train ids, 255 = ignored), and the
    HPLA donors drawn by a :class:`~uda_selftrain.donors.DonorSampler`.

    Items are dictionaries::

        image (3, H, W) uint8, label (H, W) int64, name, index,
        donor_images (D, 3, H, W) uint8, donor_labels (D, H, W) int64, donor_valid (D,) bool

    with ``D = sampler.max_donors`` (zero-padded; absent without a sampler). Donors are resized to
    the receiver's size. The draw for item ``i`` in epoch ``e`` uses a generator seeded from
    ``(seed, e, i)``, so it does not depend on worker count or order; call :meth:`set_epoch`.

    Args:
        images: the target training images (a reader such as ``Cityscapes(..., label_type=None)``).
        pseudo_dir: folder of the pseudo-label PNGs, named by :func:`pseudo_label_path`.
        sampler: donor sampler built from the round's statistics, whose sample names are the
            dataset's names (None: no donors).
        seed: base seed of the donor draws.
    """

    def __init__(
        self,
        images: SegmentationFiles,
        pseudo_dir: str | os.PathLike[str],
        *,
        sampler: DonorSampler | None = None,
        donor_names: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.images = images
        self.pseudo_dir = Path(pseudo_dir)
        if not self.pseudo_dir.is_dir():
            raise DatasetLayoutError(f"pseudo-label folder {self.pseudo_dir} not found")
        missing = [
            images.name(i)
            for i in range(len(images))
            if not pseudo_label_path(self.pseudo_dir, images.name(i)).is_file()
        ]
        if missing:
            raise DatasetLayoutError(
                f"{len(missing)} of {len(images)} images have no pseudo-label in "
                f"{self.pseudo_dir}, e.g. {pseudo_label_path(self.pseudo_dir, missing[0])}"
            )
        self.sampler = sampler
        self.seed = int(seed)
        self.epoch = 0
        index = {images.name(i): i for i in range(len(images))}
        names = donor_names if donor_names is not None else list(index)
        self._donor_to_item: list[int] = []
        if sampler is not None:
            unknown = [n for n in names if n not in index]
            if unknown:
                raise ValueError(f"donor {unknown[0]!r} of the statistics is not in the dataset")
            self._donor_to_item = [index[n] for n in names]

    def set_epoch(self, epoch: int) -> None:
        """Change the donor draws (call once per pass over the data)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, i: int, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(np.ascontiguousarray(self.images.read_image(i))).permute(2, 0, 1)
        lab = read_label(pseudo_label_path(self.pseudo_dir, self.images.name(i)))
        target = size or self.images.size or tuple(img.shape[1:])
        if tuple(img.shape[1:]) != target:
            img = _resize_image(img.contiguous(), target)
        if lab.shape != target:
            lab = _resize_nearest(lab, target)
        return img.contiguous(), torch.from_numpy(np.array(lab, dtype=np.int64))

    def __getitem__(self, index: int) -> dict[str, object]:
        image, label = self._load(index, None)
        item: dict[str, object] = {
            "image": image,
            "label": label,
            "name": self.images.name(index),
            "index": index,
        }
        if self.sampler is None:
            return item
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))
        draw = self.sampler.draw(generator=g)
        d = self.sampler.max_donors
        h, w = image.shape[1:]
        donor_images = torch.zeros(d, 3, h, w, dtype=torch.uint8)
        donor_labels = torch.full((d, h, w), IGNORE_INDEX, dtype=torch.int64)
        valid = torch.zeros(d, dtype=torch.bool)
        for k, donor in enumerate(draw.donors.tolist()):
            di, dl = self._load(self._donor_to_item[donor], (h, w))
            donor_images[k], donor_labels[k], valid[k] = di, dl, True
        item.update(donor_images=donor_images, donor_labels=donor_labels, donor_valid=valid)
        return item
