"""Offline pseudo-labelling: a model over a target set, a selector, label PNGs and statistics files.

What every offline self-training method (IAST, HIAST, CBST, CRST) does between rounds, as one call:

1. run the model over every target image (optionally at several scales and mirrored, softmax
   averaged), in a fixed order;
2. select pseudo-labels with any :class:`~uda_selftrain.selection.Selector` (the instance adaptive
   selector carries its thresholds from image to image; CBST first observes the whole set);
3. write ``<out_dir>/pseudo/<name>.png`` (8-bit train ids, 255 = unlabelled) and the statistics
   files of :class:`~uda_selftrain.class_statistics.ClassStatistics` in ``<out_dir>/stats`` (the public
   implementation's formats), plus ``<out_dir>/stats/done.json``.

It is resumable — the selector state and statistics are checkpointed every ``checkpoint_every``
steps, a rerun after a kill continues from the last checkpoint (recomputing at most that many steps,
to identical files) and a finished folder is only read back — and distributed: under a
``torch.distributed`` process group, step ``s`` gives rank ``r`` the images
``[s·w·b + r·b, s·w·b + (r + 1)·b)`` (``w`` ranks, ``b`` = ``batch_size``) and every selector update
is synchronised, so all ranks hold the same thresholds and the files equal one process's with batch
``w·b``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_int
from .atomic import atomic_save_json, atomic_torch_save
from .augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from .class_statistics import ClassStatistics
from .distributed import all_reduce_sum, is_distributed, is_main_process, rank, world_size
from .selection import CBSTSelector, Selector

__all__ = ["generate_pseudo_labels", "predict_probabilities"]

DONE_FILE = "done.json"


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> torch.Tensor:
    """Class probabilities of ``images``, averaged over scales (and a horizontal flip).

    Each scale resizes the normalised batch bilinearly, runs the model, and resizes the logits back
    to the input size before the softmax; the probabilities of all passes are averaged.

    Args:
        model: maps ``(N, 3, h, w)`` normalised images to ``(N, C, h, w)`` logits (in eval mode).
        images: ``(N, 3, H, W)`` uint8 or float in ``[0, 1]``.
        scales: resize factors (``(1.0,)`` = a single pass).
        flip: also run the mirrored images (their output mirrored back).
        mean, std: the normalisation the model was trained with (``None`` for none).

    Returns:
        ``(N, C, H, W)`` float32 probabilities.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Conv2d(3, 4, 1)
    >>> p = predict_probabilities(model, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), flip=True)
    >>> p.shape, bool(torch.allclose(p.sum(1), torch.ones(1, 8, 8)))
    (torch.Size([1, 4, 8, 8]), True)
    """
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be positive numbers, got {scales!r}")
    if mean is None or std is None:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    else:
        x = normalize(images, mean=mean, std=std)
    size = tuple(x.shape[-2:])
    total: torch.Tensor | None = None
    passes = 0
    for s in scales:
        xs = (
            x
            if s == 1.0
            else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        )
        for mirrored in (False, True) if flip else (False,):
            inp = xs.flip(-1) if mirrored else xs
            logits = model(inp).float()
            if mirrored:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            p = torch.softmax(logits, dim=1)
            total = p if total is None else total.add_(p)
            passes += 1
    assert total is not None
    return total.div_(passes)


def _items(dataset: Any, indices: range) -> list[dict[str, Any]]:
    items = [dataset[i] for i in indices]
    unnamed = [i for i, item in zip(indices, items, strict=True) if "name" not in item]
    if unnamed:
        raise ValueError(
            f"dataset item {unnamed[0]} has no 'name': the pseudo-label files are named "
            "after it (readers of uda_selftrain.datasets provide one)"
        )
    return items


def _fit_cbst(
    selector: CBSTSelector,
    probabilities: Callable[[int], tuple[list[dict[str, Any]], torch.Tensor]],
    n_steps: int,
) -> None:
    for step in range(n_steps):
        items, p = probabilities(step)
        if items:
            selector.observe(p, probabilities=True)
    selector.fit()


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    params = next(iter(model.parameters()), None)
    return params.device if params is not None else torch.device("cpu")


def _resume(
    state_path: Path, selector: Selector, stats: ClassStatistics, dev: torch.device
) -> tuple[int, int]:
    """The step and labelled-pixel count to continue from (0, 0 without a checkpoint)."""
    if not state_path.is_file():
        return 0, 0
    try:
        st = torch.load(state_path, map_location=dev, weights_only=False)
    except Exception as err:  # a torn file from a kill during the write: start over
        raise ValueError(
            f"{state_path} is damaged ({type(err).__name__}); delete it to restart this "
            "round's pseudo-labelling"
        ) from None
    selector.load_state_dict(st["selector"])
    stats.add(st["names"], st["pixels"])
    return st["step"], st["labelled_pixels"]


def _checkpoint(
    state_path: Path, selector: Selector, stats: ClassStatistics, step: int, labelled: int
) -> None:
    atomic_torch_save(
        state_path,
        {
            "selector": selector.state_dict(),
            "names": stats.names,
            "pixels": stats.sample_class_pixels,
            "step": step,
            "labelled_pixels": labelled,
        },
    )


def _save_round(stats: ClassStatistics, stats_dir: Path, labelled: int, dev: torch.device) -> None:
    """The statistics files and the done marker with the selected fraction (rank 0 writes)."""
    total = int(all_reduce_sum(torch.tensor([labelled], device=dev)).item())
    if is_main_process():
        stats.save(stats_dir)
        selected = int(stats.class_pixels.sum())
        atomic_save_json(
            stats_dir / DONE_FILE,
            {
                "images": len(stats),
                "selected_fraction": selected / max(1, total),
                "selected_pixels_per_image": selected / max(1, len(stats)),
                "total_pixels": total,
            },
        )


def generate_pseudo_labels(
    model: nn.Module,
    dataset: Any,
    selector: Selector,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 1,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    checkpoint_every: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> ClassStatistics:
    """Pseudo-label every image of ``dataset`` and write the labels and statistics files.

    Args:
        model: the labelling model (put in eval mode for the call, restored afterwards).
        dataset: indexable; item ``i`` is a dict with ``image`` ``(3, H, W)`` (uint8, or float
            in ``[0, 1]``) and ``name`` (unique; the label goes to ``pseudo/<name>.png``). All
            images of a batch must share a size.
        selector: any :class:`~uda_selftrain.selection.Selector`, in its initial state; an
            unfitted :class:`~uda_selftrain.selection.CBSTSelector` observes the whole set first.
        out_dir: the round's folder (``pseudo/`` and ``stats/`` are created in it).
        batch_size: images per selector call and process (1 = per-image updates, the paper).
        scales, flip: test-time augmentation (:func:`predict_probabilities`).
        device: where the model runs (default: the model's).
        mean, std: the model's input normalisation.
        checkpoint_every: steps between resume checkpoints.
        progress: called as ``progress(done_steps, total_steps)`` after every step (rank 0).

    Returns:
        The round's :class:`~uda_selftrain.class_statistics.ClassStatistics` (class values and thresholds
        from the selector), identical on every rank.
    """
    from .datasets.image_io import write_label
    from .datasets.pseudo import pseudo_label_path

    check_positive_int("batch_size", batch_size)
    check_positive_int("checkpoint_every", checkpoint_every)
    if not isinstance(selector, Selector):
        raise TypeError(
            f"selector must implement uda_selftrain.Selector, got {type(selector).__name__}"
        )
    out = Path(out_dir)
    stats_dir, pseudo_dir = out / "stats", out / "pseudo"
    num_classes = selector.num_classes
    if (stats_dir / DONE_FILE).is_file():
        return ClassStatistics.load(stats_dir, num_classes)
    dev = _device_of(model, device)
    was_training = model.training
    model.eval()
    w, b = world_size(), batch_size
    n_steps = math.ceil(len(dataset) / (w * b))

    def indices(step: int) -> range:
        first = step * w * b + rank() * b
        return range(min(first, len(dataset)), min(first + b, len(dataset)))

    def probabilities(step: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
        items = _items(dataset, indices(step))
        if not items:
            return items, torch.empty(0, num_classes, 1, 1, device=dev)
        images = torch.stack([item["image"] for item in items]).to(dev)
        p = predict_probabilities(model, images, scales=scales, flip=flip, mean=mean, std=std)
        return items, p

    stats = ClassStatistics(num_classes)
    state_path = out / f"pseudo_state_rank{rank()}.pt"
    start, labelled = _resume(state_path, selector, stats, dev)
    with torch.no_grad():
        if isinstance(selector, CBSTSelector) and not bool(selector.fitted):
            _fit_cbst(selector, probabilities, n_steps)  # CBST sees the whole set first
        for step in range(start, n_steps):
            items, p = probabilities(step)
            if items or is_distributed():
                # An empty batch still takes part in a synchronised update (ranks without images).
                sel = selector(p, probabilities=True)
                for j, item in enumerate(items):
                    write_label(
                        pseudo_label_path(pseudo_dir, item["name"]), sel.labels[j].cpu().numpy()
                    )
                if items:
                    labelled += sel.labels.numel()
                    stats.add([item["name"] for item in items], sel.class_pixels.cpu())
            if progress is not None and is_main_process():
                progress(step + 1, n_steps)
            if (step + 1) % checkpoint_every == 0 and step + 1 < n_steps:
                _checkpoint(state_path, selector, stats, step + 1, labelled)
    stats.class_values = selector.class_values.detach().double().cpu()
    stats.thresholds = selector.thresholds.detach().double().cpu()
    _save_round(_gather(stats), stats_dir, labelled, dev)
    if is_distributed():
        torch.distributed.barrier()
    state_path.unlink(missing_ok=True)
    model.train(was_training)
    return ClassStatistics.load(stats_dir, num_classes)


def _gather(stats: ClassStatistics) -> ClassStatistics:
    """Every rank's samples in one ClassStatistics (values from this rank: all ranks agree)."""
    if not is_distributed():
        return stats
    parts: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(parts, (stats.names, stats.sample_class_pixels))
    merged = ClassStatistics(stats.num_classes)
    for names, pixels in parts:
        merged.add(names, pixels)
    merged.class_values, merged.thresholds = stats.class_values, stats.thresholds
    return merged
