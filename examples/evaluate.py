"""Evaluate any checkpoint on a labelled target set, single- or multi-scale, with flip testing.

    python examples/evaluate.py runs/synthetic/final.pt                     # synthetic city val
    python examples/evaluate.py HIAST_final.pth --preset gta5 --target-root data/cityscapes \\
        --scales 0.75 1.0 1.25 --flip --device cuda --out runs/eval_gta5

Accepts our checkpoints (``final.pt``, ``round*/teacher.pt``, ``*/model.pt``) and the public HIAST
files (``module.seg_model.*`` keys). Prints the protocol's mIoU and per-class IoU, writes
``scores.json`` and colourised predictions (image | prediction | ground truth) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _pipeline_utils import (
    PRESETS,
    Config,
    build_data,
    build_model,
    init_distributed,
    progress,
    to_input,
)

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.datasets import CITYSCAPES_CLASSES, OXFORD_CLASSES, colorize
from uda_selftrain.datasets.image_io import write_rgb
from uda_selftrain.distributed import is_main_process, rank, world_size
from uda_selftrain.models import load_checkpoint


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    image: torch.Tensor,
    size: tuple[int, int],
    scales: list[float],
    flip: bool,
    base: tuple[int, int] | None,
    device: torch.device,
) -> torch.Tensor:
    """Average of the softmax over scales (and flips), at the label size ``size``: ``(1, C, H, W)``."""
    h0, w0 = base or tuple(image.shape[-2:])
    total = None
    for s in scales:
        hs, ws = max(8, round(h0 * s)), max(8, round(w0 * s))
        x = F.interpolate(image.float(), size=(hs, ws), mode="bilinear", align_corners=False)
        x = to_input(x.round().clamp(0, 255).to(torch.uint8), device)
        for flipped in [False, True] if flip else [False]:
            inp = x.flip(-1) if flipped else x
            logits = model(inp).float()
            if flipped:
                logits = logits.flip(-1)
            p = F.softmax(
                F.interpolate(logits, size=size, mode="bilinear", align_corners=False), dim=1
            )
            total = p if total is None else total + p
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint")
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--target-root", default="")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--flip", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for scores.json and predictions")
    p.add_argument("--max-saved", type=int, default=20, help="colourised predictions to write")
    args = p.parse_args(argv)
    values = dict(PRESETS[args.preset])
    if args.data_dir:
        values["data_dir"] = args.data_dir
    cfg = Config(
        preset=args.preset,
        target_root=args.target_root,
        source_root=args.target_root,
        quiet=True,
        **values,
    )
    device = init_distributed(args.device)
    _, _, val, _ = build_data(cfg)
    model = build_model(cfg).to(device)
    report = load_checkpoint(model, args.checkpoint)
    if report.unused and is_main_process():
        print(f"unused checkpoint keys: {report.unused}", file=sys.stderr)
    model.eval()
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "evaluation"
    cm = ust.ConfusionMatrix(cfg.num_classes)
    idx = list(range(rank(), len(val), world_size()))
    saved = 0
    for i in progress(idx, total=len(idx), desc="evaluate"):
        item = val[i]
        label = item["label"]
        prob = predict(
            model,
            item["image"].unsqueeze(0),
            tuple(label.shape),
            args.scales,
            args.flip,
            cfg.target_size,
            device,
        )
        pred = prob.argmax(1)
        cm.update(pred, label.unsqueeze(0).to(device))
        if saved < args.max_saved and is_main_process():
            row = np.concatenate(
                [item["image"].permute(1, 2, 0).numpy(), colorize(pred[0].cpu()), colorize(label)],
                1,
            )
            write_rgb(out / "predictions" / f"{Path(item['name']).stem}.png", row)
            saved += 1
    scores = cm.scores(cfg.protocol)
    if is_main_process():
        names = CITYSCAPES_CLASSES if cfg.num_classes == 19 else OXFORD_CLASSES
        print(
            f"mIoU ({cfg.protocol}, scales {args.scales}, flip {args.flip}): {100 * scores['miou']:.2f}"
        )
        for c, v in zip(scores["classes"], scores["iou"], strict=True):
            print(f"  {names[c]:>14s}: {100 * v:5.1f}")
        atomic_save_json(
            out / "scores.json",
            {**scores, "scales": args.scales, "flip": args.flip, "checkpoint": args.checkpoint},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
