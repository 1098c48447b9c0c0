"""HIAST for semi-supervised segmentation: a labelled fraction of the target plus the rest unlabelled.

    python examples/semi_supervised.py                          # fractions 1/8, 1/4, 1/2, ~8 min CPU
    python examples/semi_supervised.py --fractions 0.125 --iters 800
    python examples/semi_supervised.py --seeds 0 1 2            # mean ± std; reruns skip done seeds

For each fraction: a model is trained on the labelled images for ``--iters`` steps; then
(a) **supervised only** continues for ``--iters`` more steps on the labelled images, and
(b) **HIAST** continues for the same number of steps with, each step, the labelled cross-entropy plus
self-training on an unlabelled batch: the EMA teacher's predictions on the weak view are selected
by the instance adaptive selector, hard classes are copy-pasted between unlabelled images, and the
student is trained on the strong view with the HIAST loss (CE + region-adaptive regularisation +
consistency). Both therefore see the same number of steps. Prints the mIoU per fraction.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pipeline import RunError
from pipeline.config import Config
from pipeline.data import IterationBatches, loader, source_batch
from pipeline.progress import progress
from pipeline.report import evaluate, mean_std
from pipeline.runs import cached_result
from pipeline.training import build_model, seed_everything
from torch.utils.data import Subset

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_open, atomic_save_json
from uda_selftrain.augment import normalize
from uda_selftrain.datasets import Cityscapes, synthetic


def batches(dataset, args, cfg, seed: int):
    """The dataset's deterministic batch order for the whole run."""
    return iter(
        loader(dataset, IterationBatches(len(dataset), args.batch_size, args.iters, 0, seed), cfg)
    )


def rampup(it: int, args) -> float:
    """Sigmoid ramp-up of the unlabelled loss (Laine & Aila): early teachers are poor."""
    if args.rampup <= 0:
        return 1.0
    t = min(1.0, it / max(1, args.rampup * args.iters))
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


def unlabelled_loss(model, teacher, selector, augmenter, loss_fn, images, pseudo, gen):
    """HIAST's loss on the unlabelled batch: hard-aware paste between its images, the views."""
    # The hard classes from the selector's running class values (classes it has seen can donate).
    augmenter.update(selector, has_donor=selector.class_seen.cpu())
    v = augmenter(  # each image receives from the next one of the batch
        images,
        pseudo,
        images.roll(1, 0).unsqueeze(1),
        pseudo.roll(1, 0).unsqueeze(1),
        generator=gen,
    )
    with torch.no_grad():
        teacher_logits = teacher(v.weak)
    return loss_fn(model(v.strong), v.labels.long(), teacher_logits).total


def train(model, labelled, unlabelled, val, cfg, args, device, *, semi: bool, desc: str) -> float:
    gen = torch.Generator().manual_seed(args.seed + (7 if semi else 3))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=cfg.weight_decay)
    lab_it = batches(labelled, args, cfg, args.seed + 1)
    unl_it = None
    if semi:
        teacher = ust.EMATeacher(model, momentum=args.ema)
        selector = ust.InstanceAdaptiveSelector(cfg.num_classes, alpha=cfg.alpha)
        augmenter = ust.HardAwareAugmenter(cfg.num_classes, cfg.crop_size).to(device)
        loss_fn = ust.HIASTLoss()
        unl_it = batches(unlabelled, args, cfg, args.seed + 2)
    bar = progress(total=args.iters, desc=desc, quiet=args.quiet)
    model.train()
    for it in range(args.iters):
        x, y = source_batch(next(lab_it), cfg, device, gen)
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        if semi:
            images = next(unl_it)["image"].to(device)
            with torch.no_grad():
                pseudo = ust.online_targets(teacher(normalize(images)), selector=selector).labels
            ramp = rampup(it, args)
            loss = loss + args.unsup_weight * ramp * unlabelled_loss(
                model, teacher, selector, augmenter, loss_fn, images, pseudo, gen
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if semi:
            teacher.update(model)
        bar.update()
    bar.close()
    final = teacher.module if semi else model
    return evaluate(final, val, cfg, device, desc=f"eval {desc}")["miou"]


#: Arguments that do not change results (a rerun may change them).
RUNTIME_ARGS = {"seed", "seeds", "device", "out", "quiet"}


def run_fractions(args, cfg, train_set, val, device, seed: int) -> dict[str, dict]:
    """Supervised-only and semi-supervised training for every labelled fraction, one seed."""
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    args = argparse.Namespace(**{**vars(args), "seed": seed})
    results = {}
    for f in args.fractions:
        k = max(args.batch_size, round(f * len(train_set)))
        labelled, unlabelled = Subset(train_set, order[:k]), Subset(train_set, order[k:])
        seed_everything(seed)
        base = build_model(cfg).to(device)
        train(base, labelled, None, val, cfg, args, device, semi=False, desc=f"{f:g} warm")
        sup = train(
            copy.deepcopy(base),
            labelled,
            None,
            val,
            cfg,
            args,
            device,
            semi=False,
            desc=f"{f:g} supervised",
        )
        semi = train(
            copy.deepcopy(base),
            labelled,
            unlabelled,
            val,
            cfg,
            args,
            device,
            semi=True,
            desc=f"{f:g} hiast",
        )
        results[str(f)] = {"labelled": k, "supervised_only": sup, "hiast": semi}
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    p.add_argument("--data-dir", default="data/synthetic_city")
    p.add_argument("--synthetic-preset", default="default", choices=["default", "tiny"])
    p.add_argument("--iters", type=int, default=300, help="steps of each phase")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument(
        "--unsup-weight", type=float, default=1.0, help="weight of the self-training loss"
    )
    p.add_argument(
        "--rampup", type=float, default=0.0, help="fraction of steps to ramp it up over (0: none)"
    )
    p.add_argument("--width", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: mean ± std")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/semi_supervised")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def fraction_row(f: float, runs: dict[str, dict]) -> tuple[dict, str]:
    """One labelled fraction over the seeds: its record and its table line (paired by seed)."""
    rows = [r[str(f)] for r in runs.values()]
    sup, semi = [r["supervised_only"] for r in rows], [r["hiast"] for r in rows]
    record = {
        "labelled": rows[0]["labelled"],
        "supervised_only": sup,
        "hiast": semi,
        "seeds": list(runs),
    }
    diff = [b - a for a, b in zip(sup, semi, strict=True)]
    line = (
        f"| {f:g} ({rows[0]['labelled']}) | {mean_std(sup)} | {mean_std(semi)} | "
        f"{mean_std(diff)} ({', '.join(f'{100 * d:+.1f}' for d in diff)}) |"
    )
    print(
        f"fraction {f:g} ({rows[0]['labelled']} labelled): supervised only "
        f"{mean_std(sup)}, with HIAST {mean_std(semi)} mIoU (seeds {list(runs)})"
    )
    return record, line


def run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    cfg = Config(data_dir=args.data_dir, width=args.width, quiet=args.quiet, device=args.device)
    if args.synthetic_preset == "tiny":
        cfg.crop_size = (32, 64)
    root = Path(args.data_dir)
    synthetic.generate(root, synthetic.PRESETS[args.synthetic_preset], progress=not args.quiet)
    train_set = Cityscapes(root / "target", "train")  # the synthetic target train split has labels
    val = Cityscapes(root / "target", "val")
    device = torch.device(args.device)
    out = Path(args.out)
    # One file per seed: a rerun skips the seeds already done (and refuses other settings).
    settings = {k: v for k, v in vars(args).items() if k not in RUNTIME_ARGS}
    runs = {
        str(s): cached_result(
            out / f"seed{s}.json",
            settings,
            lambda s=s: run_fractions(args, cfg, train_set, val, device, s),
        )
        for s in args.seeds or [args.seed]
    }
    results, lines = {}, []
    for f in args.fractions:
        results[str(f)], line = fraction_row(f, runs)
        lines.append(line)
    table = [
        f"Seeds {', '.join(runs)}; mIoU %, mean ± sample std; the difference is paired by seed.",
        "",
        "| labelled fraction (images) | supervised only | with HIAST | HIAST − supervised (per seed) |",
        "|---|---|---|---|",
        *lines,
    ]
    with atomic_open(out / "results.md", "w") as fh:
        fh.write("\n".join(table) + "\n")
    atomic_save_json(out / "results.json", {"args": vars(args), "results": results})
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except RunError as err:  # a problem the user can fix: the message, no traceback
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    raise SystemExit(main())
