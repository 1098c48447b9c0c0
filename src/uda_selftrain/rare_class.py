"""Rare Class Sampling (RCS, DAFormer): draw source images that contain rare classes more often.

With ``f_c`` the share of class ``c`` among all labelled source pixels, a class is drawn with

    P(c) = exp((1 − f_c) / T) / Σ_c' exp((1 − f_c') / T),      T = 0.01 (DAFormer),

then an image uniformly among those holding more than ``min_pixels`` pixels of ``c`` (DAFormer:
3000 at GTA5's full 1914 × 1052 resolution; scale it with the label area). A small ``T`` makes
the draw nearly uniform over the rare classes; ``T → ∞`` gives uniform classes. Classes that no
image holds with more than ``min_pixels`` pixels get probability 0 and the rest are renormalised
(DAFormer would fail on them; here they are simply never drawn).

The per-image class pixel counts are computed once from the source labels by
:func:`class_pixel_counts`, cached to a ``.npz`` file, resumable (partial results are saved every
``checkpoint_every`` images) and shardable (``shard=(k, n)`` counts every ``n``-th image starting at
``k``; a later unsharded call merges the shards' files and counts whatever is missing).

>>> import torch
>>> counts = torch.tensor([[5000, 0], [4000, 4000], [9000, 0]])   # 3 images, 2 classes
>>> sampler = RareClassSampler(counts, num_samples=4, min_pixels=3000, seed=0)
>>> [round(p, 3) for p in sampler.probabilities.tolist()]          # class 1 is rare
[0.0, 1.0]
>>> list(sampler)                                                  # only image 1 holds class 1
[1, 1, 1, 1]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from ._checks import check_positive_int, check_tensor
from .atomic import atomic_open

__all__ = [
    "RareClassDraw",
    "RareClassSampler",
    "class_pixel_counts",
    "rare_class_probabilities",
    "rare_class_sample",
]


def _check_counts(name: str, counts: object) -> torch.Tensor:
    t = check_tensor(name, counts)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of pixel counts, got dtype {t.dtype}")
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, C) with C >= 1, got {tuple(t.shape)}")
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} holds negative pixel counts")
    return t


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return t


def _check_min_pixels(min_pixels: object) -> int:
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0:
        raise ValueError(f"min_pixels must be a non-negative integer, got {min_pixels!r}")
    return min_pixels


def rare_class_probabilities(
    counts: torch.Tensor, *, temperature: float = 0.01, min_pixels: int = 0
) -> torch.Tensor:
    """``(C,)`` float64 RCS class probabilities ``softmax((1 − f) / T)`` over the drawable classes.

    Args:
        counts: ``(N, C)`` int pixels of each class in each source image (or ``(1, C)`` totals).
        temperature: ``T`` (DAFormer: 0.01).
        min_pixels: a class is drawable only if some image holds more than this many of its
            pixels; others get probability 0 (as do classes with no pixels at all).

    Returns:
        ``(C,)`` float64 probabilities summing to 1, or all zeros if no class is drawable.

    Shape:
        counts ``(N, C)`` → ``(C,)``.

    >>> import torch
    >>> p = rare_class_probabilities(torch.tensor([[90, 10]]), temperature=0.1)
    >>> [round(v, 4) for v in p.tolist()]                # ∝ exp(0.1/0.1), exp(0.9/0.1)
    [0.0003, 0.9997]
    """
    c = _check_counts("counts", counts)
    t = _check_temperature(temperature)
    m = _check_min_pixels(min_pixels)
    c = c.to(torch.float64)
    totals = c.sum(0)
    drawable = (c > m).any(0) if c.shape[0] else torch.zeros_like(totals, dtype=torch.bool)
    drawable &= totals > 0
    freq = totals / totals.sum().clamp(min=1.0)
    # DAFormer's frequencies are over the classes present in the dataset; absent classes have
    # totals 0 and add nothing to the sum, so restricting the softmax to drawable classes is the
    # same softmax, renormalised.
    logits = torch.where(drawable, (1.0 - freq) / t, torch.full_like(freq, -math.inf))
    if not bool(drawable.any()):
        return torch.zeros_like(freq)
    return torch.softmax(logits, 0)


class RareClassDraw(NamedTuple):
    """One RCS draw.

    Attributes:
        indices: ``(S,)`` int64 image indices.
        classes: ``(S,)`` int64 class that drew each image (the class to keep in view when
            cropping, as DAFormer's crop retry does).
    """

    indices: torch.Tensor
    classes: torch.Tensor


def _eligible(counts: torch.Tensor, min_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images holding more than ``min_pixels`` of each class, as CSR: flat image indices grouped
    by class (ascending image index within a class) and the ``(C + 1,)`` offsets."""
    ok = counts > min_pixels  # (N, C)
    _, img = ok.t().nonzero(as_tuple=True)  # sorted by class, then image
    per_class = ok.sum(0)
    offsets = torch.zeros(counts.shape[1] + 1, dtype=torch.long)
    offsets[1:] = per_class.cumsum(0)
    return img, offsets


def rare_class_sample(
    counts: torch.Tensor,
    num_samples: int,
    *,
    temperature: float = 0.01,
    min_pixels: int = 3000,
    generator: torch.Generator | None = None,
) -> RareClassDraw:
    """Draw ``num_samples`` source images by RCS: a class ``c ~ P`` (see
    :func:`rare_class_probabilities`), then an image uniformly among those holding more than
    ``min_pixels`` pixels of ``c``. Vectorised: one multinomial for the classes, one uniform draw
    for the images. Draws on the CPU from ``generator``.

    Args:
        counts: ``(N, C)`` int pixels of each class in each image (:func:`class_pixel_counts`).
        num_samples: how many images to draw (with replacement).
        temperature: ``T``.
        min_pixels: the per-image pixel rule.
        generator: CPU generator for reproducible draws.

    Returns:
        :class:`RareClassDraw` of ``(num_samples,)`` indices and classes.

    Raises:
        ValueError: if no class is drawable (no image has more than ``min_pixels`` of any class).

    Shape:
        counts ``(N, C)`` → indices, classes ``(S,)``.

    >>> import torch
    >>> d = rare_class_sample(torch.tensor([[10, 0], [5, 5]]), 3, min_pixels=1,
    ...                       temperature=1.0, generator=torch.Generator().manual_seed(0))
    >>> d.indices.shape, bool(((d.classes == 0) | (d.indices == 1)).all())
    (torch.Size([3]), True)
    """
    check_positive_int("num_samples", num_samples)
    # The draw is made on the CPU (the generator's device), whatever device the counts are on.
    counts_cpu = _check_counts("counts", counts).detach().cpu()
    probs = rare_class_probabilities(counts_cpu, temperature=temperature, min_pixels=min_pixels)
    if not bool(probs.sum() > 0):
        raise ValueError(
            f"no class is drawable: no image holds more than min_pixels={min_pixels} pixels of any "
            "class (lower min_pixels, scaled to your label size)"
        )
    counts_cpu = counts_cpu.long()
    img, offsets = _eligible(counts_cpu, min_pixels)
    classes = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    start, size = offsets[classes], offsets[classes + 1] - offsets[classes]
    pick = start + (u * size).long().clamp(max=size - 1)
    return RareClassDraw(img[pick], classes)


class RareClassSampler(Sampler[int]):
    """A ``torch.utils.data.Sampler`` drawing source indices by Rare Class Sampling.

    Usable with any dataset whose ``i``-th item is the image counted in row ``i`` of ``counts``:
    ``DataLoader(dataset, batch_size=B, sampler=RareClassSampler(counts, num_samples=B * iters))``.
    Deterministic: the draw depends on ``seed`` and the epoch set by :meth:`set_epoch` only (call
    it before each epoch for new draws, as with ``DistributedSampler``). Under data parallelism
    give every process the same ``seed`` and its ``rank`` and ``world_size``: one draw of
    ``num_samples × world_size`` indices is made and each process takes every ``world_size``-th,
    so the processes see different images and together the distribution of one draw.

    Args:
        counts: ``(N, C)`` int pixels of each class in each image.
        num_samples: indices per epoch (default ``N``).
        temperature: ``T`` (0.01).
        min_pixels: per-image pixel rule (3000 at GTA5's full resolution).
        seed: base seed of the draws (the same on every process).
        rank, world_size: this process's share under data parallelism.

    Attributes:
        probabilities: ``(C,)`` float64 class probabilities.
        last_draw: the :class:`RareClassDraw` of the latest epoch (its classes), or None.

    Shape:
        counts ``(N, C)``; iterating yields ``num_samples`` ints in ``[0, N)``.

    >>> import torch
    >>> s = RareClassSampler(torch.tensor([[100, 0, 1], [50, 60, 0]]), min_pixels=10, seed=1)
    >>> len(s), sorted(set(s)) == [1]
    (2, True)
    """

    def __init__(
        self,
        counts: torch.Tensor,
        *,
        num_samples: int | None = None,
        temperature: float = 0.01,
        min_pixels: int = 3000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        c = _check_counts("counts", counts)
        self.counts = c.detach().cpu().long()
        self.num_samples = check_positive_int(
            "num_samples", c.shape[0] if num_samples is None else num_samples
        )
        self.temperature = _check_temperature(temperature)
        self.min_pixels = _check_min_pixels(min_pixels)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.world_size = check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.rank = rank
        self.epoch = 0
        self.probabilities = rare_class_probabilities(
            self.counts, temperature=self.temperature, min_pixels=self.min_pixels
        )
        if not bool(self.probabilities.sum() > 0):
            raise ValueError(
                f"no class is drawable: no image holds more than min_pixels={min_pixels} pixels of "
                "any class (lower min_pixels, scaled to your label size)"
            )
        self.last_draw: RareClassDraw | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the draws of ``epoch`` on the next iteration."""
        self.epoch = int(epoch)

    def draw(self) -> RareClassDraw:
        """This process's share of this epoch's draw (the same every call until
        :meth:`set_epoch` changes the epoch)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        d = rare_class_sample(
            self.counts,
            self.num_samples * self.world_size,
            temperature=self.temperature,
            min_pixels=self.min_pixels,
            generator=gen,
        )
        r, w = self.rank, self.world_size
        return RareClassDraw(d.indices[r::w], d.classes[r::w])

    def __iter__(self) -> Iterator[int]:
        self.last_draw = self.draw()
        return iter(self.last_draw.indices.tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"RareClassSampler(images={self.counts.shape[0]}, classes={self.counts.shape[1]}, "
            f"num_samples={self.num_samples}, temperature={self.temperature}, "
            f"min_pixels={self.min_pixels}, seed={self.seed})"
        )


# ---------------------------------------------------------------------------------------------
# Counting the source labels once: cached, resumable, sharded.


def _part_path(cache: Path, k: int, n: int) -> Path:
    return cache.with_name(f"{cache.stem}.part{k}-of-{n}.npz")


def _load_part(path: Path, num_images: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            counts, done = z["counts"], z["done"]
    except Exception as e:  # any damage: name the file
        raise ValueError(f"{path}: not a readable class-count cache ({e}); delete it") from e
    if counts.shape != (num_images, num_classes) or done.shape != (num_images,):
        raise ValueError(
            f"{path} holds counts of shape {counts.shape} for {done.shape[0]} images, expected "
            f"({num_images}, {num_classes}): it was made for another label set; delete it"
        )
    return counts.astype(np.int64), done.astype(bool)


def _save(path: Path, counts: np.ndarray, done: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, counts=counts, done=done)


def class_pixel_counts(
    labels: Sequence[Any],
    *,
    num_classes: int,
    cache: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    ignore_index: int = 255,
    checkpoint_every: int = 200,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """``(N, C)`` int64 pixels of each class in each label map, counted once and cached.

    Args:
        labels: a sequence of ``(H, W)`` integer label maps in train ids (numpy arrays or
            tensors), read lazily by index — e.g. ``dataset.label_maps`` of the dataset readers,
            or any ``Sequence`` whose ``__getitem__`` reads a file.
        num_classes: ``C``; values outside ``[0, C)`` other than ``ignore_index`` are an error.
        cache: a ``.npz`` file. If it exists and is complete, it is returned without reading a
            label; partial results are saved to it every ``checkpoint_every`` images, so a killed
            run resumes where it stopped. Shards write ``<stem>.part<k>-of-<n>.npz`` next to it.
        shard: ``(k, n)``: count only images ``k, k + n, k + 2n, …`` (to spread the work over
            ``n`` processes or machines); rows of other shards stay 0. An unsharded call then merges
            every shard file it finds and counts what is still missing.
        ignore_index: label value not counted.
        checkpoint_every: images between two saves of the partial counts.
        progress: called as ``progress(done, total)`` after each saved block.

    Returns:
        ``(N, C)`` int64 counts (for a shard: its rows filled, the others 0).

    >>> import numpy as np
    >>> maps = [np.array([[0, 1], [1, 255]]), np.array([[2, 2], [2, 2]])]
    >>> class_pixel_counts(maps, num_classes=3).tolist()
    [[1, 2, 0], [0, 0, 4]]
    """
    check_positive_int("num_classes", num_classes)
    check_positive_int("checkpoint_every", checkpoint_every)
    if (
        not isinstance(shard, tuple)
        or len(shard) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        or not 0 <= shard[0] < shard[1]
    ):
        raise ValueError(f"shard must be a tuple (k, n) of ints with 0 <= k < n, got {shard!r}")
    if not hasattr(labels, "__len__") or not hasattr(labels, "__getitem__"):
        raise TypeError(f"labels must be a sequence of label maps, got {type(labels).__name__}")
    n_img = len(labels)
    k, n = shard
    path = Path(cache) if cache is not None else None
    counts = np.zeros((n_img, num_classes), dtype=np.int64)
    done = np.zeros(n_img, dtype=bool)
    target = path if (path is not None and n == 1) else None
    if path is not None:
        if n == 1:
            if path.exists():
                counts, done = _load_part(path, n_img, num_classes)
            # Merge whatever shard files exist (any sharding), then count the rest here.
            for part in sorted(path.parent.glob(f"{path.stem}.part*-of-*.npz")):
                pc, pd = _load_part(part, n_img, num_classes)
                new = pd & ~done
                counts[new], done[new] = pc[new], True
        else:
            target = _part_path(path, k, n)
            if target.exists():
                counts, done = _load_part(target, n_img, num_classes)
    mine = np.zeros(n_img, dtype=bool)
    mine[k::n] = True
    todo = np.flatnonzero(mine & ~done)
    for j, i in enumerate(todo.tolist(), 1):
        lab = labels[i]
        arr = lab.cpu().numpy() if isinstance(lab, torch.Tensor) else np.asarray(lab)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"labels[{i}] must be an (H, W) integer label map, got shape {arr.shape} "
                f"dtype {arr.dtype}"
            )
        flat = arr.reshape(-1).astype(np.int64)
        flat = flat[flat != ignore_index]
        if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
            bad = flat[(flat < 0) | (flat >= num_classes)][0]
            raise ValueError(
                f"labels[{i}] has value {bad} outside [0, {num_classes}) that is not the ignore "
                f"index {ignore_index} (are the labels mapped to train ids?)"
            )
        counts[i] = np.bincount(flat, minlength=num_classes)
        done[i] = True
        if target is not None and (j % checkpoint_every == 0 or j == len(todo)):
            _save(target, counts, done)
        if progress is not None and (j % checkpoint_every == 0 or j == len(todo)):
            progress(int((mine & done).sum()), int(mine.sum()))
    if target is not None and not target.exists():
        _save(target, counts, done)
    return torch.from_numpy(counts)
