"""Evaluate any checkpoint on a preset's labelled target set, single- or multi-scale, with flips.

    python examples/evaluate.py runs/synthetic/final.pt                     # synthetic city val
    python examples/evaluate.py HIAST_final.pth --preset gta5 --target-root data/cityscapes \\
        --scales 0.75 1.0 1.25 --flip --device cuda --out runs/eval_gta5

Every preset of ``examples/hiast_full.py`` works (synthetic, large, things, tiny, gta5, synthia,
cityscapes_oxford); the paper presets need only ``--target-root`` (the labelled validation
split is read, nothing else). Accepts our checkpoints (``final.pt``, ``round*/teacher.pt``,
``*/model.pt``) and the public HIAST files (``module.seg_model.*`` keys). The scoring is the
library's :func:`uda_selftrain.evaluate_segmentation` under the preset's protocol; prints the mIoU
and per-class IoU, writes ``scores.json`` and colourised predictions (image | prediction |
ground truth) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pipeline import RunError
from pipeline.config import PRESETS, Config
from pipeline.data import build_val, class_names
from pipeline.training import build_model, init_distributed

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.datasets import colorize
from uda_selftrain.datasets.image_io import write_rgb
from uda_selftrain.distributed import is_main_process
from uda_selftrain.models import load_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint")
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    p.add_argument("--data-dir", default=None, help="the synthetic presets' folder")
    p.add_argument("--target-root", default="", help="the paper presets' target dataset")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--flip", action="store_true")
    p.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize images to this before the model (default: the preset's evaluation size)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for scores.json and predictions")
    p.add_argument("--max-saved", type=int, default=20, help="colourised predictions to write")
    return p.parse_args(argv)


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    values = dict(PRESETS[args.preset])
    if args.data_dir:
        values["data_dir"] = args.data_dir
    if args.input_size:
        values["target_size"] = tuple(args.input_size)
    cfg = Config(preset=args.preset, target_root=args.target_root, quiet=True, **values)
    device = init_distributed(args.device)
    val = build_val(cfg)
    model = build_model(cfg).to(device)
    report = load_checkpoint(model, args.checkpoint)
    if report.unused and is_main_process():
        print(f"unused checkpoint keys: {report.unused}", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "evaluation"
    saved: list[int] = []

    def save(i: int, item: dict[str, Any], pred: torch.Tensor) -> None:
        if len(saved) < args.max_saved and is_main_process():
            row = np.concatenate(
                [
                    item["image"].permute(1, 2, 0).numpy(),
                    colorize(pred.cpu()),
                    colorize(item["label"]),
                ],
                1,
            )
            write_rgb(out / "predictions" / f"{Path(item['name']).stem}.png", row)
            saved.append(i)

    scores = ust.evaluate_segmentation(
        model,
        val,
        cfg.num_classes,
        protocol=cfg.protocol,
        scales=args.scales,
        flip=args.flip,
        input_size=cfg.target_size,
        device=device,
        on_prediction=save,
    )
    if is_main_process():
        names = class_names(cfg)
        print(
            f"mIoU ({cfg.protocol}, scales {args.scales}, flip {args.flip}): {100 * scores.miou:.2f}"
        )
        for c, v in zip(scores.classes, scores.iou, strict=True):
            print(f"  {names[c]:>14s}: {100 * v:5.1f}")
        atomic_save_json(
            out / "scores.json",
            {
                **scores.to_dict(),
                "scales": args.scales,
                "flip": args.flip,
                "checkpoint": args.checkpoint,
            },
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except RunError as err:  # a problem the user can fix: the message, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    raise SystemExit(main())
