"""HIAST in one page of the library's public API: a source model in, an adapted model out.

    python examples/hiast_minimal.py --checkpoint runs/synthetic/warmup/model.pt \\
        --target-root data/synthetic_city/target --out runs/minimal

The algorithm (HIAST, Zhu et al., TPAMI 2025), round by round:

1. pseudo-label every target image with the instance adaptive selector (IAS), recording which
   classes each image holds and how confident each class is (the class values);
2. self-train on the target only: each batch gets the hard classes of other target images
   pasted in (hard-aware copy-paste, HPLA), the student sees the strong view, an EMA teacher the
   weak one, and the loss is pseudo-label CE + region-adaptive regularisation + consistency to
   the teacher on the unlabelled pixels;
3. the next round's pseudo-labels come from this round's teacher.

With ``--select VALIDATOR`` the adapted model is not simply the last teacher: the starting model
and every round's teacher are scored on unlabelled target images by a label-free validator, and
the best-scoring one is kept (no target label is read for the choice).

No resume, logging, mixed precision or multi-GPU here: ``examples/hiast_full.py`` adds them (and
the source-only and adversarial warm-up stages). The target folder uses the Cityscapes layout.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import uda_selftrain as ust
from uda_selftrain.datasets import Cityscapes, PseudoLabelDataset
from uda_selftrain.models import deeplabv2_resnet101, deeplabv2_small, load_checkpoint


def hiast_round(model, target, stats, round_dir, args, k):
    """Step 2: one round of self-training on the round's pseudo-labels; returns the teacher."""
    augmenter = ust.HardAwareAugmenter(args.num_classes, args.crop, num_hard=args.num_hard)
    augmenter.update(stats)  # class values → hard classes and their drawing probabilities
    data = PseudoLabelDataset(
        target,
        round_dir / "pseudo",
        sampler=augmenter.donor_sampler(stats),
        donor_names=stats.names,
        seed=args.seed + k,
    )
    gen = torch.Generator().manual_seed(args.seed + k)
    batches = DataLoader(data, args.batch_size, shuffle=True, drop_last=True, generator=gen)
    loss_fn = ust.HIASTLoss()  # CE + RegionAdaptiveLoss() + 0.5 · ConsistencyLoss()
    teacher = ust.EMATeacher(model, momentum=args.momentum)
    lr = args.lr[min(k, len(args.lr)) - 1]
    optimizer = torch.optim.Adam(
        model.parameter_groups(lr, head_multiplier=10.0), lr=lr, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * i / args.iters))
    )
    model.train()
    for step, batch in enumerate(itertools.chain.from_iterable(itertools.repeat(batches))):
        if step == args.iters:
            break
        data.set_epoch(step * args.batch_size // len(data))
        views = augmenter(
            batch["image"].to(args.device),
            batch["label"].to(args.device),
            batch["donor_images"].to(args.device),
            batch["donor_labels"].to(args.device),
            batch["donor_valid"].to(args.device),
            generator=gen,
        )
        with torch.no_grad():
            teacher_logits = teacher(views.weak)
        loss = loss_fn(model(views.strong), views.labels.long(), teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        schedule.step()
        teacher.update(model)
        if (step + 1) % max(1, args.iters // 5) == 0:
            print(f"  round {k} step {step + 1}/{args.iters}: loss {loss.total.item():.3f}")
    return teacher


def evaluate(model, val, args) -> float:
    """mIoU over every class on the labelled target validation images (the library's scoring)."""
    return ust.evaluate_segmentation(model, val, args.num_classes, device=args.device).miou


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    target = Cityscapes(args.target_root, "train", label_type=None)
    val = Cityscapes(args.target_root, "val")
    if args.model == "resnet101":
        model = deeplabv2_resnet101(args.num_classes)
    else:
        model = deeplabv2_small(args.num_classes, width=args.width)
    load_checkpoint(model, args.checkpoint)
    model.to(args.device)
    print(f"source model: mIoU {100 * evaluate(model, val, args):.1f}")
    labeller = model
    candidates = {"start": copy.deepcopy(model)}
    for k in range(1, args.rounds + 1):
        round_dir = args.out / f"round{k}"
        # Step 1: pseudo-labels and statistics (PNGs and the public statistics files).
        selector = ust.InstanceAdaptiveSelector(args.num_classes).to(args.device)
        stats = ust.generate_pseudo_labels(labeller, target, selector, round_dir)
        print(
            f"round {k}: {100 * stats.class_pixels.sum() / (len(stats) * target_pixels(target)):.1f}% of pixels pseudo-labelled"
        )
        teacher = hiast_round(model, target, stats, round_dir, args, k)
        labeller = teacher.module  # step 3
        candidates[f"round{k}"] = copy.deepcopy(teacher.module)
        miou = evaluate(teacher.module, val, args)
        print(f"round {k}: teacher mIoU {100 * miou:.1f}")
    adapted = labeller
    if args.select != "last":
        adapted = select(candidates, target, args)
        miou = evaluate(adapted, val, args)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(adapted.state_dict(), args.out / "adapted.pt")
    print(f"adapted model: {args.out / 'adapted.pt'}")
    return miou


def select(candidates, target, args):
    """The candidate the validator scores best on 100 evenly spaced target images (no labels)."""
    idx = torch.linspace(0, len(target) - 1, min(100, len(target))).round().long().tolist()
    images = [
        torch.stack([target[i]["image"] for i in idx[j : j + 10]]) for j in range(0, len(idx), 10)
    ]
    images = [x.to(args.device) for x in images]
    scores = ust.score_candidates(list(candidates.values()), images, args.num_classes)
    name = list(candidates)[ust.select_candidate(scores, args.select)]
    print(f"{args.select} picks {name}")
    rows = [{"name": n, "scores": s} for n, s in zip(candidates, scores, strict=True)]
    (args.out / "selection.json").write_text(json.dumps({"picked": name, "candidates": rows}))
    return candidates[name]


def target_pixels(target) -> int:
    image = target[0]["image"]
    return image.shape[-2] * image.shape[-1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the source (or warm-up) model's weights")
    p.add_argument("--target-root", type=Path, required=True, help="Cityscapes-layout target")
    p.add_argument("--out", type=Path, default=Path("runs/minimal"))
    p.add_argument("--model", choices=["small", "resnet101"], default="small")
    p.add_argument("--width", type=int, default=24, help="width of the small model")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--num-hard", type=int, default=14)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=500, help="iterations per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, nargs=2, default=(64, 128), help="training view size")
    p.add_argument("--lr", type=float, nargs="+", default=(1e-4, 5e-5, 3e-5), help="per round")
    p.add_argument("--momentum", type=float, default=0.999, help="EMA teacher momentum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--select",
        choices=["last", *ust.VALIDATORS, *ust.COMBINED],
        default="last",
        help="keep the last teacher, or the model a label-free validator scores best",
    )
    args = p.parse_args(argv)
    args.crop = tuple(args.crop)
    return args


if __name__ == "__main__":
    main()
