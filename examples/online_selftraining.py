"""HIAST's and the DAFormer/MIC family's components composed inside an online (DACS-style) loop.

    python examples/online_selftraining.py                        # DACS and DACS + HIAST, ~6 min CPU
    python examples/online_selftraining.py --variants dacs dacs+rcs dacs+mic dacs+ias --seeds 0 1 2
    python examples/online_selftraining.py --variants dacs+fd --fd-encoder runs/.../model.pt
    python examples/online_selftraining.py --seeds 0 1 2 --checkpoint-every 100 --out runs/online_ckpt

Baseline (DACS): each step, source cross-entropy plus a ClassMix target loss: half of the source
image's classes are pasted onto a target image whose labels are the EMA teacher's arg-max, weighted
per image by the fraction of pixels with confidence ≥ 0.968.

A variant is ``dacs`` plus components joined by ``+``:

- ``rcs``: Rare Class Sampling of the source images (``RareClassSampler``; T = 0.01, DAFormer's
  3000-pixel rule scaled to the source image area);
- ``mic``: Masked Image Consistency (``BlockMasking`` + ``MaskedImageConsistencyLoss``): the
  student also predicts the colour-augmented target image with 70 % of its blocks masked (block
  size scaled from 64 px on 512-px crops) against the teacher's labels, weighted by their quality;
- ``fd``: thing-class feature distance (``ThingFeatureDistance``, λ = 0.005) to the frozen backbone
  of ``--fd-encoder`` (ImageNet weights cannot be downloaded here; any checkpoint of the model);
- ``ias``: the instance adaptive selector on the teacher's predictions at every step (unselected
  pixels are ignored instead of weighted);
- ``hpla``: hard-aware copy-paste between the batch's target images (hard classes from the
  selector's class values; needs ``ias``);
- ``reg``: region-adaptive regularisation; ``cst``: consistency to the teacher on the pixels
  without pseudo-labels (needs ``ias``: without it every pixel has an arg-max label).

``baseline`` is ``dacs``; ``hiast`` is ``dacs+ias+hpla+reg+cst`` minus any component switched off
with ``--no-ias``/``--no-hpla``/``--no-regularisation``/``--no-consistency``.

Prints (and writes to ``--out``/results.json) the target mIoU of every variant, mean ± std over
``--seeds``, with the per-class IoU.

``--checkpoint-every N`` also keeps the EMA teacher and the student every ``N`` steps (and after
the last) in ``--out/<variant>/seed<S>/step<k>/{teacher,student}.pt``, with the run's
``config.json``: the candidates a label-free validator chooses among
(``python -m docs.results.validators --regime online runs/online_ckpt/hiast``). Saving reads no
random number: the run and its result are the same with or without it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pipeline import RunError
from pipeline.config import Config, config_dict
from pipeline.data import IterationBatches, build_data, loader
from pipeline.progress import progress
from pipeline.report import evaluate, mean_std, seed_table
from pipeline.runs import cached_result
from pipeline.training import build_model, seed_everything
from torch.utils.data import BatchSampler

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_open, atomic_save_json, atomic_torch_save
from uda_selftrain.augment import (
    colour_params,
    crop_params,
    normalize,
    strong_colour,
    weak_geometry,
)
from uda_selftrain.models import load_checkpoint

COMPONENTS = ("rcs", "mic", "fd", "ias", "hpla", "reg", "cst")
# DAFormer's rule: more than 3000 pixels of the class at GTA5's 1914 x 1052.
RCS_MIN_PIXELS, GTA5_AREA = 3000, 1914 * 1052


def crops(batch, cfg: Config, device: torch.device, gen: torch.Generator, *, labelled: bool):
    """Random-sized crop + flip of a batch (and its labels) at the training size, in [0, 1]."""
    images = batch["image"].to(device)
    params = crop_params(images.shape[0], images.shape[-2:], generator=gen)
    maps = [batch["label"].to(device)] if labelled else []
    out, out_maps = weak_geometry(images, params, cfg.crop_size, maps)
    return out, (out_maps[0] if labelled else None)


def parse_variant(name: str, args: argparse.Namespace) -> dict[str, bool]:
    """``dacs+rcs+ias`` → the components that are on; ``baseline``/``hiast`` are aliases."""
    if name == "baseline":
        parts = []
    elif name == "hiast":
        flags = {"ias": "ias", "hpla": "hpla", "reg": "regularisation", "cst": "consistency"}
        parts = [k for k, flag in flags.items() if getattr(args, flag)]
    else:
        head, *parts = name.split("+")
        if head != "dacs":
            raise SystemExit(f"variant {name!r}: must start with 'dacs' (or be baseline/hiast)")
    unknown = sorted(set(parts) - set(COMPONENTS))
    if unknown:
        raise SystemExit(f"variant {name!r}: unknown components {unknown}; known: {COMPONENTS}")
    opts = {k: k in parts for k in COMPONENTS}
    for needs in ("hpla", "cst"):
        if opts[needs] and not opts["ias"]:
            raise SystemExit(f"variant {name!r}: {needs} needs ias (the selector's labels)")
    if opts["fd"] and not args.fd_encoder:
        raise SystemExit(f"variant {name!r}: fd needs --fd-encoder CHECKPOINT (the frozen encoder)")
    return opts


def source_batches(source, opts, args: argparse.Namespace, counts) -> BatchSampler:
    """The source index batches: uniform epochs, or Rare Class Sampling."""
    if not opts["rcs"]:
        return IterationBatches(len(source), args.batch_size, args.iters, 0, args.seed + 1)
    area = int(source[0]["label"].numel())
    sampler = ust.RareClassSampler(
        counts,
        num_samples=args.batch_size * args.iters,
        temperature=args.rcs_temperature,
        min_pixels=max(1, round(RCS_MIN_PIXELS * area / GTA5_AREA)),
        seed=args.seed + 1,
    )
    return BatchSampler(sampler, args.batch_size, drop_last=False)


def variant_parts(opts: dict[str, bool], args: argparse.Namespace, cfg: Config, device) -> dict:
    """The variant's components: selector, ClassMix, the HIAST loss, MIC and FD (if chosen)."""
    parts = {
        "selector": (
            ust.InstanceAdaptiveSelector(cfg.num_classes, alpha=cfg.alpha) if opts["ias"] else None
        ),
        "mix": ust.ClassMix(cfg.num_classes),
        "augmenter": ust.HardAwareAugmenter(cfg.num_classes, cfg.crop_size).to(device),
        "loss_fn": ust.HIASTLoss(
            ce_weight=1.0 if opts["ias"] else 0.0,  # without IAS the CE is DACS's weighted one
            smoothing_weight=0.1 if opts["reg"] else 0.0,
            entropy_weight=1.0 if opts["reg"] else 0.0,
            consistency_weight=0.5 if opts["cst"] else 0.0,
        ),
        "masking": ust.BlockMasking(ratio=0.7, block_size=ust.mic_block_size(cfg.crop_size)),
        "mic_loss": ust.MaskedImageConsistencyLoss(weight=1.0),
        "fd": None,
    }
    if opts["fd"]:
        frozen = build_model(cfg)
        load_checkpoint(frozen, args.fd_encoder)
        parts["fd"] = ust.ThingFeatureDistance(frozen.backbone, num_classes=cfg.num_classes).to(
            device
        )
    return parts


def batch_hard_paste(t_img, t_lab, augmenter, selector):
    """Hard-aware copy-paste between this batch's target images (the next one is the donor); the
    hard classes from the selector's running class values. ClassMix makes the views next."""
    augmenter.update(selector, has_donor=selector.class_seen.cpu())
    pasted = augmenter.paste(
        t_img, t_lab, t_img.roll(1, 0).unsqueeze(1), t_lab.roll(1, 0).unsqueeze(1)
    )
    return pasted.images, pasted.labels


def source_loss(student, fd, s_img, s_lab):
    """Source CE (plus the thing-class feature distance when FD is on)."""
    x_s = normalize(s_img)
    if fd is None:
        return F.cross_entropy(student(x_s), s_lab, ignore_index=255)
    feats = student.backbone(x_s)  # the student's features are needed once more: split the forward
    src_logits = F.interpolate(
        student.aspp(feats), size=x_s.shape[-2:], mode="bilinear", align_corners=False
    )
    return F.cross_entropy(src_logits, s_lab, ignore_index=255) + fd(feats, x_s, s_lab)


def target_loss(student, teacher, parts, opts, mixed, targets, t_img, t_lab, gen):
    """The mixed images' loss (HIAST terms, DACS's weighted CE without IAS) and MIC's term."""
    n = t_img.shape[0]
    strong = normalize(strong_colour(mixed.images, colour_params(n, generator=gen)))
    logits = student(strong)
    teacher_logits = None
    if opts["cst"]:
        with torch.no_grad():
            teacher_logits = teacher(normalize(mixed.images))
    loss = parts["loss_fn"](logits, mixed.labels, teacher_logits).total
    if parts["selector"] is None:
        # DACS: per-image confidence weight, 1 on pasted source pixels.
        w = ust.pixel_weights(targets.weight, tuple(mixed.labels.shape[-2:]), mixed.mask)
        ce = F.cross_entropy(logits, mixed.labels, ignore_index=255, reduction="none")
        loss = loss + (ce * w).mean()
    if opts["mic"]:
        # The (colour-augmented) target image with 70 % of its blocks masked, against the
        # teacher's labels of the full image, weighted by their quality.
        aug = normalize(strong_colour(t_img, colour_params(n, generator=gen)))
        masked = parts["masking"](aug, generator=gen)
        loss = loss + parts["mic_loss"](student(masked.images), t_lab, targets.weight)
    return loss


def checkpointer(name: str, args: argparse.Namespace, cfg: Config):
    """``save(step, student, teacher)`` for ``--checkpoint-every``: the two models after ``step``
    steps in ``step<k>/`` of the (variant, seed)'s folder; a no-op when checkpoints are off."""
    every = args.checkpoint_every
    run_dir = Path(args.out) / name / f"seed{args.seed}"
    if every > 0:
        atomic_save_json(run_dir / "config.json", {**config_dict(cfg), "seed": args.seed})

    def save(step: int, student: torch.nn.Module, teacher: ust.EMATeacher) -> None:
        if every > 0 and (step % every == 0 or step == args.iters):
            atomic_torch_save(run_dir / f"step{step}" / "teacher.pt", teacher.module.state_dict())
            atomic_torch_save(run_dir / f"step{step}" / "student.pt", student.state_dict())

    return save


def run_variant(
    name: str, opts: dict[str, bool], args: argparse.Namespace, cfg: Config, data, counts
) -> dict:
    source, target, val, _ = data
    seed_everything(args.seed)
    device = torch.device(args.device)
    student = build_model(cfg).to(device).train()
    teacher = ust.EMATeacher(student, momentum=args.ema)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / args.iters) ** 0.9)
    parts = variant_parts(opts, args, cfg, device)
    selector = parts["selector"]
    gen = torch.Generator().manual_seed(args.seed)
    src = iter(loader(source, source_batches(source, opts, args, counts), cfg))
    tgt_order = IterationBatches(len(target), args.batch_size, args.iters, 0, args.seed + 2)
    tgt = iter(loader(target, tgt_order, cfg))
    save = checkpointer(name, args, cfg)
    bar = progress(total=args.iters, desc=name, quiet=args.quiet)
    for it in range(args.iters):
        s_img, s_lab = crops(next(src), cfg, device, gen, labelled=True)
        t_img, _ = crops(next(tgt), cfg, device, gen, labelled=False)
        with torch.no_grad():
            targets = ust.online_targets(teacher(normalize(t_img)), selector=selector)
        t_lab = targets.labels
        if opts["hpla"] and bool(selector.class_seen.any()):
            t_img, t_lab = batch_hard_paste(t_img, t_lab, parts["augmenter"], selector)
        mixed = parts["mix"](s_img, s_lab, t_img, t_lab, generator=gen)
        loss_src = source_loss(student, parts["fd"], s_img, s_lab)
        loss_tgt = target_loss(student, teacher, parts, opts, mixed, targets, t_img, t_lab, gen)
        loss = loss_src + loss_tgt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        teacher.update(student)
        save(it + 1, student, teacher)
        bar.update()
        if (it + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return evaluate(teacher.module, val, cfg, device, desc=f"eval {name}")


#: Options that do not change a result: a stored (variant, seed) file is reused across them.
RUNTIME_ARGS = {"seed", "seeds", "variants", "device", "out", "quiet"}


def run_seed(
    name: str,
    opts: dict[str, bool],
    args: argparse.Namespace,
    seed: int,
    cfg: Config,
    data: tuple[Any, ...],
    counts: torch.Tensor | None,
) -> dict[str, Any]:
    """One (variant, seed): its mIoU, per-class IoU and wall time."""
    start = time.perf_counter()
    scores = run_variant(
        name, opts, argparse.Namespace(**{**vars(args), "seed": seed}), cfg, data, counts
    )
    return {
        "miou": float(scores["miou"]),
        "iou": [float(x) for x in scores["iou"]],
        "seconds": round(time.perf_counter() - start, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["baseline", "hiast"],
        help="baseline, hiast, or dacs[+rcs][+mic][+fd][+ias][+hpla][+reg][+cst]",
    )
    p.add_argument("--data-dir", default="data/synthetic_city")
    p.add_argument("--synthetic-preset", default="default", choices=["default", "tiny"])
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--rcs-temperature", type=float, default=0.01)
    p.add_argument(
        "--fd-encoder", default="", help="checkpoint whose backbone is FD's frozen encoder"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: mean ± std")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/online")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="keep the teacher and student every N steps (validator candidates; 0: off)",
    )
    for flag in ("ias", "hpla", "regularisation", "consistency"):
        p.add_argument(
            f"--{flag}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"use {flag} in the 'hiast' variant (default: on)",
        )
    args = p.parse_args(argv)
    if args.checkpoint_every < 0:
        p.error(f"--checkpoint-every must be >= 0 (0: off), got {args.checkpoint_every}")
    return args


def variant_result(per_seed: list[dict], seeds: list[int], opts: dict[str, bool]) -> dict:
    """A variant's mIoU over its seeds (mean, sample std, per seed), per-class IoU, cost."""
    mious = [r["miou"] for r in per_seed]
    return {
        "miou": float(np.mean(mious)),
        "miou_std": float(np.std(mious, ddof=1)) if len(seeds) > 1 else None,
        "miou_per_seed": mious,
        "iou_per_seed": [r["iou"] for r in per_seed],
        "seeds": seeds,
        "components": opts,
        "seconds": round(sum(r["seconds"] for r in per_seed), 1),
    }


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    variants = {v: parse_variant(v, args) for v in args.variants}
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
    counts = None
    if any(o["rcs"] for o in variants.values()):
        # Counted once per dataset and cached next to it (resumable if interrupted).
        counts = ust.class_pixel_counts(
            data[0].label_maps,
            num_classes=cfg.num_classes,
            cache=Path(args.data_dir) / "source_class_counts.npz",
        )
    out = Path(args.out)
    # A run with checkpoints is its own unit (a stored result without them has no checkpoints).
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in RUNTIME_ARGS and not (k == "checkpoint_every" and v == 0)
    }
    seeds = args.seeds or [args.seed]
    results, rows = {}, {}
    for v, opts in variants.items():
        per_seed = [
            # One file per (variant, seed): a rerun of the same command skips finished ones.
            cached_result(
                out / v / f"seed{s}.json",
                settings,
                lambda v=v, opts=opts, s=s: run_seed(v, opts, args, s, cfg, data, counts),
            )
            for s in seeds
        ]
        rows[v] = per_seed
        results[v] = variant_result(per_seed, seeds, opts)
        mious = results[v]["miou_per_seed"]
        print(f"{v}: mIoU {mean_std(mious)} (seeds {seeds}, {results[v]['seconds']}s)")
    atomic_save_json(out / "results.json", {"args": vars(args), "results": results})
    table = seed_table(rows, list(data[3]), seeds)
    with atomic_open(out / "results.md", "w") as f:
        f.write(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except RunError as err:  # a problem the user can fix: the message, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    raise SystemExit(main())
