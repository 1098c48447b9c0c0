"""Regenerate the pictures of the docs from the synthetic city (and a trained model if given).

python docs/make_figures.py --data-dir data/synthetic_city [--model runs/synthetic/warmup/model.pt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import uda_selftrain as ust
from uda_selftrain.augment import denormalize
from uda_selftrain.datasets import CITYSCAPES_CLASSES, GTA5, Cityscapes, colorize, synthetic
from uda_selftrain.datasets.image_io import write_rgb
from uda_selftrain.models import deeplabv2_small, load_checkpoint

OUT = Path(__file__).parent / "img"


def rgb(x: torch.Tensor) -> np.ndarray:
    return (x.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def upscale(a: np.ndarray, k: int = 3) -> np.ndarray:
    return a.repeat(k, 0).repeat(k, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="data/synthetic_city")
    p.add_argument("--model", default=None)
    p.add_argument("--width", type=int, default=24)
    args = p.parse_args()
    root = synthetic.generate(args.data_dir, progress=False)
    OUT.mkdir(exist_ok=True)
    src, tgt = GTA5(root / "source"), Cityscapes(root / "target", "train")
    rows = [
        np.concatenate(
            [
                src[i]["image"].permute(1, 2, 0).numpy(),
                colorize(src[i]["label"]),
                tgt[i]["image"].permute(1, 2, 0).numpy(),
                colorize(tgt[i]["label"]),
            ],
            1,
        )
        for i in range(3)
    ]
    write_rgb(OUT / "synthetic_city.png", upscale(np.concatenate(rows, 0), 2))

    images = torch.stack([tgt[i]["image"] for i in range(4)])
    labels = torch.stack([tgt[i]["label"] for i in range(4)])
    if args.model:
        model = deeplabv2_small(width=args.width)
        load_checkpoint(model, args.model)
        model.eval()
        with torch.no_grad():
            logits = model(ust.normalize(images))
        sel = ust.InstanceAdaptiveSelector(19)(logits)
        const = ust.ConstantThresholdSelector(19)(logits)
        rows = [
            np.concatenate(
                [
                    images[i].permute(1, 2, 0).numpy(),
                    colorize(sel.prediction[i]),
                    colorize(const.labels[i]),
                    colorize(sel.labels[i]),
                ],
                1,
            )
            for i in range(3)
        ]
        write_rgb(OUT / "selection.png", upscale(np.concatenate(rows, 0), 2))
        pseudo = sel.labels.long()
    else:
        pseudo = labels
    hard = torch.zeros(19, dtype=torch.bool)
    hard[[3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18]] = True
    g = torch.Generator().manual_seed(3)
    out = ust.hard_paste(
        images.float() / 255,
        pseudo,
        images.roll(1, 0).unsqueeze(1).float() / 255,
        pseudo.roll(1, 0).unsqueeze(1),
        hard,
    )
    rows = [
        np.concatenate(
            [
                images[i].permute(1, 2, 0).numpy(),
                rgb(images.roll(1, 0)[i].float() / 255),
                rgb(out.images[i]),
                colorize(out.labels[i]),
                colorize(out.pasted[i]),
            ],
            1,
        )
        for i in range(3)
    ]
    write_rgb(OUT / "hard_paste.png", upscale(np.concatenate(rows, 0), 2))
    views = ust.WeakStrongViews((64, 128))(images, [pseudo], generator=g)
    rows = [
        np.concatenate(
            [
                rgb(denormalize(views.weak)[i]),
                rgb(denormalize(views.strong)[i]),
                colorize(views.maps[0][i]),
            ],
            1,
        )
        for i in range(4)
    ]
    write_rgb(OUT / "views.png", upscale(np.concatenate(rows, 0), 3))
    daformer_figures(root)


def daformer_figures(root: Path) -> None:
    """The MIC block mask on target images, and the RCS class distribution of the source."""
    tgt = Cityscapes(root / "target", "train")
    images = torch.stack([tgt[i]["image"] for i in range(3)])
    x = ust.normalize(images)
    masked = ust.BlockMasking(block_size=ust.mic_block_size((96, 192)))(
        x, generator=torch.Generator().manual_seed(0)
    )
    rows = [
        np.concatenate(
            [
                images[i].permute(1, 2, 0).numpy(),
                rgb(masked.mask[i].expand(3, -1, -1)),
                rgb(denormalize(masked.images)[i]),
            ],
            1,
        )
        for i in range(3)
    ]
    write_rgb(OUT / "mic_mask.png", upscale(np.concatenate(rows, 0), 2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source = GTA5(root / "source")
    counts = ust.class_pixel_counts(source.label_maps, num_classes=19)
    area = int(source[0]["label"].numel())
    min_pixels = max(1, round(3000 * area / (1914 * 1052)))
    freq = (counts.sum(0) / counts.sum()).numpy()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    pos = np.arange(19)
    ax.bar(pos - 0.3, freq, 0.2, label="pixel frequency f_c")
    for k, t in enumerate((0.01, 0.1, 1.0)):
        p = ust.rare_class_probabilities(counts, temperature=t, min_pixels=min_pixels).numpy()
        ax.bar(pos - 0.1 + 0.2 * k, p, 0.2, label=f"P(c), T = {t}")
    ax.set_xticks(pos, CITYSCAPES_CLASSES, rotation=60, ha="right")
    ax.set_ylabel("share")
    ax.set_title(f"Rare Class Sampling on the synthetic city's source (min_pixels = {min_pixels})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "rcs_distribution.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
