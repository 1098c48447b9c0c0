"""HIAST's components inside an online (DACS-style) self-training loop.

    python examples/online_selftraining.py                 # baseline and HIAST variant, ~6 min CPU
    python examples/online_selftraining.py --variants baseline --iters 2000

Baseline (DACS): each step, source cross-entropy plus a ClassMix target loss: half of the source
image's classes are pasted onto a target image whose labels are the EMA teacher's arg-max, weighted
per image by the fraction of pixels with confidence ≥ 0.968.

HIAST variant, each component switchable: the instance adaptive selector on the teacher's
predictions at every step (``--ias``: unselected pixels are ignored instead of weighted), hard-aware
copy-paste between the batch's target images (``--hpla``: hard classes from the selector's class
values), region-adaptive regularisation (``--regularisation``) and consistency to the teacher on the
pixels without pseudo-labels (``--consistency``).

Without ``--ias`` the teacher's labels cover every pixel (arg-max), so the consistency term, which
acts on the pixels without a pseudo-label, has nothing to act on; it needs the selector.

Prints (and writes to ``--out``/results.json) the target mIoU of every variant.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _pipeline_utils import (
    Config,
    IterationBatches,
    build_data,
    build_model,
    evaluate,
    loader,
    mean_std,
    progress,
    seed_everything,
)

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.augment import (
    colour_params,
    crop_params,
    normalize,
    strong_colour,
    weak_geometry,
)
from uda_selftrain.mixing import class_difficulty, hard_paste


def crops(batch, cfg: Config, device: torch.device, gen: torch.Generator, *, labelled: bool):
    """Random-sized crop + flip of a batch (and its labels) at the training size, in [0, 1]."""
    images = batch["image"].to(device)
    params = crop_params(images.shape[0], images.shape[-2:], generator=gen)
    maps = [batch["label"].to(device)] if labelled else []
    out, out_maps = weak_geometry(images, params, cfg.crop_size, maps)
    return out, (out_maps[0] if labelled else None)


def run_variant(
    name: str, opts: dict[str, bool], args: argparse.Namespace, cfg: Config, data
) -> float:
    source, target, val, _ = data
    seed_everything(args.seed)
    device = torch.device(args.device)
    student = build_model(cfg).to(device).train()
    teacher = ust.EMATeacher(student, momentum=args.ema)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / args.iters) ** 0.9)
    selector = (
        ust.InstanceAdaptiveSelector(cfg.num_classes, alpha=cfg.alpha) if opts["ias"] else None
    )
    mix = ust.ClassMix(cfg.num_classes)
    loss_fn = ust.HIASTLoss(
        ce_weight=1.0 if opts["ias"] else 0.0,  # without IAS the CE is DACS's weighted one
        smoothing_weight=0.1 if opts["regularisation"] else 0.0,
        entropy_weight=1.0 if opts["regularisation"] else 0.0,
        consistency_weight=0.5 if opts["consistency"] else 0.0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    src, tgt = (
        iter(
            loader(d, IterationBatches(len(d), args.batch_size, args.iters, 0, args.seed + i), cfg)
        )
        for i, d in ((1, source), (2, target))
    )
    bar = progress(total=args.iters, desc=name, quiet=args.quiet)
    for it in range(args.iters):
        s_img, s_lab = crops(next(src), cfg, device, gen, labelled=True)
        t_img, _ = crops(next(tgt), cfg, device, gen, labelled=False)
        n = s_img.shape[0]
        with torch.no_grad():
            targets = ust.online_targets(teacher(normalize(t_img)), selector=selector)
        t_lab = targets.labels
        if opts["hpla"] and selector is not None and bool(selector.class_seen.any()):
            # Hard-aware copy-paste between this batch's target images (the next one is the donor).
            hard = class_difficulty(
                selector.class_values.cpu(),
                num_hard=min(14, cfg.num_classes),
                has_donor=selector.class_seen.cpu(),
            ).hard_mask.to(device)
            pasted = hard_paste(
                t_img, t_lab, t_img.roll(1, 0).unsqueeze(1), t_lab.roll(1, 0).unsqueeze(1), hard
            )
            t_img, t_lab = pasted.images, pasted.labels
        mixed = mix(s_img, s_lab, t_img, t_lab, generator=gen)
        strong = normalize(strong_colour(mixed.images, colour_params(n, generator=gen)))
        x_s = normalize(s_img)
        loss_src = F.cross_entropy(student(x_s), s_lab, ignore_index=255)
        logits = student(strong)
        teacher_logits = None
        if opts["consistency"]:
            with torch.no_grad():
                teacher_logits = teacher(normalize(mixed.images))
        loss_tgt = loss_fn(logits, mixed.labels, teacher_logits).total
        if selector is None:
            # DACS: per-image confidence weight, 1 on pasted source pixels.
            w = ust.pixel_weights(targets.weight, tuple(mixed.labels.shape[-2:]), mixed.mask)
            ce = F.cross_entropy(logits, mixed.labels, ignore_index=255, reduction="none")
            loss_tgt = loss_tgt + (ce * w).mean()
        loss = loss_src + loss_tgt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        teacher.update(student)
        bar.update()
        if (it + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    scores = evaluate(teacher.module, val, cfg, device, desc=f"eval {name}")
    return scores["miou"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--variants", nargs="+", default=["baseline", "hiast"], choices=["baseline", "hiast"]
    )
    p.add_argument("--data-dir", default="data/synthetic_city")
    p.add_argument("--synthetic-preset", default="default", choices=["default", "tiny"])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: mean ± std")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/online")
    p.add_argument("--quiet", action="store_true")
    for flag in ("ias", "hpla", "regularisation", "consistency"):
        p.add_argument(
            f"--{flag}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"use {flag} in the HIAST variant (default: on)",
        )
    args = p.parse_args(argv)
    cfg = Config(
        data_dir=args.data_dir,
        synthetic_preset=args.synthetic_preset,
        width=args.width,
        quiet=args.quiet,
        device=args.device,
    )
    if args.synthetic_preset == "tiny":
        cfg.crop_size = (32, 64)
    data = build_data(cfg)
    results = {}
    seeds = args.seeds or [args.seed]
    for v in args.variants:
        opts = {
            k: (v == "hiast" and getattr(args, k))
            for k in ("ias", "hpla", "regularisation", "consistency")
        }
        start = time.perf_counter()
        per_seed = [
            run_variant(v, opts, argparse.Namespace(**{**vars(args), "seed": s}), cfg, data)
            for s in seeds
        ]
        results[v] = {
            "miou": float(np.mean(per_seed)),
            "miou_std": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else None,
            "miou_per_seed": per_seed,
            "seeds": seeds,
            "components": opts,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{v}: mIoU {mean_std(per_seed)} (seeds {seeds}, {results[v]['seconds']}s)")
    atomic_save_json(Path(args.out) / "results.json", {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
