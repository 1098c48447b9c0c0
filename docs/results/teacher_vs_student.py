"""What each model of a run predicts on the target training images, class by class.

    python -m docs.results.teacher_vs_student runs/things/hiast --images 100

For every seed folder of a ``--seeds`` run: the starting model, and each round's EMA teacher and
student, predict (arg-max) on ``--images`` evenly spaced target training images; per class the
share of the pixels each predicts as the class, and the precision of those pixels against the
target training labels. The labels are read to *report* what the models do (why a class leaves the
pseudo-labels), never to choose anything. Mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from docs.results.validators import run_config
from examples.pipeline.data import class_names
from examples.pipeline.selection import evenly_spaced, run_candidates
from examples.pipeline.training import build_model

import uda_selftrain as ust
from uda_selftrain.datasets import CITYSCAPES_TO_THINGS, Cityscapes, MappedLabels, lookup_table
from uda_selftrain.models import load_checkpoint


def shares(seed_dir: Path, images: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cfg = run_config(seed_dir)
    root = Path(cfg.data_dir) / "target"
    labelled = Cityscapes(root, "train")
    if cfg.label_map == "things":
        labelled = MappedLabels(labelled, lookup_table(CITYSCAPES_TO_THINGS))
    idx = evenly_spaced(len(labelled), images)  # the images the validators score
    items = [labelled[int(i)] for i in idx]
    x = torch.stack([it["image"] for it in items])
    y = torch.stack([it["label"] for it in items]).long()
    start = cfg.init_warmup or cfg.init_source
    out = {}
    for name, path in run_candidates(seed_dir, Path(start) if start else None, cfg.rounds):
        model = build_model(cfg)
        load_checkpoint(model, path)
        model.eval()
        preds = torch.cat(
            [
                ust.predict_probabilities(model, x[i : i + 10]).argmax(1)
                for i in range(0, len(x), 10)
            ]
        )
        c = cfg.num_classes
        predicted = torch.bincount(preds.flatten(), minlength=c).double()
        right = torch.bincount(preds[preds == y], minlength=c).double()
        out[name] = (
            (predicted / preds.numel()).numpy(),
            (right / predicted.clamp(min=1)).numpy(),
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    per_seed = [shares(args.run / f"seed{s}", args.images) for s in args.seeds]
    cfg = run_config(args.run / f"seed{args.seeds[0]}")
    names = class_names(cfg)
    lines = [
        f"Predicted share of the target pixels, % (precision %), mean over seeds "
        f"{', '.join(map(str, args.seeds))} of `{args.run}`:",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for model in per_seed[0]:
        share = np.mean([s[model][0] for s in per_seed], 0)
        prec = np.mean([s[model][1] for s in per_seed], 0)
        cells = [f"{100 * a:.2f} ({100 * b:.0f})" for a, b in zip(share, prec, strict=True)]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(json.dumps({"images": args.images}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
