"""The presets' datasets and the deterministic, resumable batch order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from uda_selftrain.augment import crop_params, normalize, weak_geometry
from uda_selftrain.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_TO_OXFORD,
    CITYSCAPES_TO_THINGS,
    GTA5,
    OXFORD_CLASSES,
    SYNTHIA,
    THINGS_CLASSES,
    Cityscapes,
    MappedLabels,
    OxfordRobotCar,
    lookup_table,
    synthetic,
)
from uda_selftrain.distributed import barrier, is_main_process, rank, world_size

from . import RunError
from .config import SYNTHETIC_PRESETS, Config


def build_data(cfg: Config) -> tuple[Dataset, Any, Any, tuple[str, ...]]:
    """Source (labelled), target train (unlabelled reader), target val (labelled), class names."""
    if cfg.preset in ("synthetic", "large", "tiny", "things"):
        root = Path(cfg.data_dir)
        if is_main_process():
            synthetic.generate(
                root, synthetic.PRESETS[cfg.synthetic_preset], progress=not cfg.quiet
            )
        barrier()
        source: Dataset = GTA5(root / "source")
        if cfg.oracle:  # the target oracle: the same training on labelled target images
            source = Cityscapes(root / "target", "train")
        train = Cityscapes(root / "target", "train", label_type=None)
        val: Dataset = Cityscapes(root / "target", "val")
        if cfg.label_map == "things":
            table = lookup_table(CITYSCAPES_TO_THINGS)
            return MappedLabels(source, table), train, MappedLabels(val, table), THINGS_CLASSES
        return source, train, val, CITYSCAPES_CLASSES
    if not cfg.source_root or not cfg.target_root:
        raise RunError(f"--preset {cfg.preset} needs --source-root and --target-root")
    if cfg.preset == "gta5":
        source = GTA5(cfg.source_root, size=cfg.source_size)
    elif cfg.preset == "synthia":
        source = SYNTHIA(cfg.source_root, size=cfg.source_size)
    else:
        table = lookup_table(CITYSCAPES_TO_OXFORD)
        source = MappedLabels(Cityscapes(cfg.source_root, "train", size=cfg.source_size), table)
        train = OxfordRobotCar(cfg.target_root, "train", size=cfg.target_size)
        val = OxfordRobotCar(cfg.target_root, "val")
        return source, train, val, OXFORD_CLASSES
    train = Cityscapes(cfg.target_root, "train", label_type=None, size=cfg.target_size)
    val = Cityscapes(cfg.target_root, "val")
    return source, train, val, CITYSCAPES_CLASSES


def build_val(cfg: Config) -> Dataset:
    """The labelled target validation split of a preset, alone (no source folder needed)."""
    if cfg.preset in SYNTHETIC_PRESETS:
        root = Path(cfg.data_dir)
        if is_main_process():
            synthetic.generate(
                root, synthetic.PRESETS[cfg.synthetic_preset], progress=not cfg.quiet
            )
        barrier()
        val: Dataset = Cityscapes(root / "target", "val")
        if cfg.label_map == "things":
            return MappedLabels(val, lookup_table(CITYSCAPES_TO_THINGS))
        return val
    if not cfg.target_root:
        raise RunError(f"--preset {cfg.preset} needs --target-root")
    if cfg.preset == "cityscapes_oxford":
        return OxfordRobotCar(cfg.target_root, "val")
    return Cityscapes(cfg.target_root, "val")


def class_names(cfg: Config) -> list[str]:
    if cfg.label_map == "things":
        return list(THINGS_CLASSES)
    return list(CITYSCAPES_CLASSES if cfg.num_classes == 19 else OXFORD_CLASSES)


def loader(dataset: Dataset, sampler: Any, cfg: Config) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, persistent_workers=False
    )


def batch_stream(dataset: Any, cfg: Config, total: int, start: int, seed: int) -> Iterator[Any]:
    """A stage's deterministic, resumable batches from iteration ``start`` on."""
    batches = IterationBatches(len(dataset), cfg.batch_size, total, start, seed)
    return iter(loader(dataset, batches, cfg))


class IterationBatches(torch.utils.data.Sampler[list[int]]):
    """Index batches for iterations ``start..total-1`` of a run, the same on every resume.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; iteration ``i`` takes the *global* batch
    at position ``i · batch``, and under DDP each rank takes its ``batch / world_size`` slice, so the
    samples seen per step do not depend on the number of processes.
    """

    def __init__(
        self, length: int, batch_size: int, total: int, start: int = 0, seed: int = 0
    ) -> None:
        w = world_size()
        if batch_size % w:
            raise RunError(f"--batch-size {batch_size} must be divisible by the {w} processes")
        self.length, self.batch, self.total, self.start, self.seed = (
            length,
            batch_size,
            total,
            start,
            seed,
        )
        self.local = batch_size // w

    def __len__(self) -> int:
        return self.total - self.start

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        r = rank()
        cache: dict[int, list[int]] = {}
        for it in range(self.start, self.total):
            out = []
            for k in range(self.batch):
                epoch, j = divmod(it * self.batch + k, self.length)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                out.append(cache[epoch][j])
            yield out[r * self.local : (r + 1) * self.local]


def epoch_of(iteration: int, batch: int, length: int) -> int:
    return iteration * batch // max(length, 1)


def source_batch(batch: dict[str, Any], cfg: Config, device: torch.device, gen: torch.Generator):
    """Random-sized crop + flip of a labelled batch (the weak view's geometry), normalised."""
    images, labels = batch["image"], batch["label"]
    params = crop_params(images.shape[0], tuple(images.shape[-2:]), generator=gen)
    x, (y,) = weak_geometry(images.to(device), params, cfg.crop_size, [labels.to(device)])
    return normalize(x), y
