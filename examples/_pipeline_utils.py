"""What the example scripts share, kept out of them so that each reads as its algorithm.

- the pipeline's configuration, presets and command line; data, model and optimiser set-up;
  evaluation on the labelled target split;
- run management: the run folder and its configuration check, the JSON-lines metrics log,
  progress that suits a terminal or a redirected log, resumable training state (checkpoints, RNG
  streams), DDP set-up, AMP;
- reports: results tables (with mean ± std over seeds) and plots.

Not part of the library: a user who writes their own loop needs none of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_open, atomic_save_json, atomic_torch_save
from uda_selftrain.augment import crop_params, normalize, weak_geometry
from uda_selftrain.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_TO_OXFORD,
    GTA5,
    OXFORD_CLASSES,
    SYNTHIA,
    SYNTHIA_ABSENT_CLASSES,
    Cityscapes,
    OxfordRobotCar,
    colorize,
    lookup_table,
    map_labels,
    synthetic,
)
from uda_selftrain.datasets.image_io import write_rgb
from uda_selftrain.distributed import is_distributed, is_main_process, rank, world_size
from uda_selftrain.models import deeplabv2_resnet101, deeplabv2_small
from uda_selftrain.teacher import unwrap_model

try:  # tqdm is in the examples extra; fall back to periodic prints without it
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    preset: str = "synthetic"
    model: str = "small"  # small | resnet101
    width: int = 24  # small model width
    num_classes: int = 19
    protocol: str = "cityscapes19"
    # data
    data_dir: str = "data/synthetic_city"
    synthetic_preset: str = "default"
    source_root: str = ""
    target_root: str = ""
    source_size: tuple[int, int] | None = None  # resize source images on load
    target_size: tuple[int, int] | None = None  # pseudo-label / evaluation size
    crop_size: tuple[int, int] = (64, 128)  # training output size
    # optimisation
    batch_size: int = 8
    source_iters: int = 1500
    source_lr: float = 2e-3
    warmup_iters: int = 400
    warmup_lr: float = 5e-4
    adv_weight: float = 0.01
    adv_loss: str = "mse"
    disc_lr: float = 1e-4
    disc_width: int = 32
    round_iters: int = 500
    round_lrs: tuple[float, ...] = (1e-4, 5e-5, 3e-5)
    head_lr_multiplier: float = 1.0
    weight_decay: float = 5e-4
    min_lr_ratio: float = 1e-3
    rounds: int = 3
    # HIAST components
    selector: str = "ias"  # ias | constant | argmax | cbst
    pl_batch: int = 1  # images per selector update and process (per-image IAS: 1)
    alpha: float = 0.5
    beta: float = 0.9
    gamma: float = 8.0
    constant_threshold: float = 0.9
    cbst_proportion: float = 0.2
    hpla: bool = True
    num_hard: int = 14
    max_donors: int = 3
    regularisation: bool = True
    smoothing_weight: float = 0.1
    entropy_weight: float = 1.0
    consistency: bool = True
    consistency_weight: float = 0.5
    ema_momentum: float = 0.999
    bn_mode: str = "train"
    # guards against minority-class collapse (off by default: the paper's behaviour)
    source_weight: float = 0.0  # keep source CE (this weight) in every self-training step
    min_threshold: float = 0.0  # floor under the IAS thresholds
    rampup_iters: int = 0  # ramp the regularisation and consistency weights up over this many
    collapse_guard: str = "off"  # off | keep | student: relabel a flagged class (_collapse_guard)
    # label-free model selection (examples/_model_selection.py)
    select: str = "last"  # "last": the last round's teacher; or a validator of ust.VALIDATORS
    select_images: int = 100  # target training images the validators score
    patience: int = 0  # stop when the selected model is this many rounds old (0: never)
    # run
    seed: int = 0
    accumulate: int = 1  # split each batch into this many micro-batches (gradient accumulation)
    max_iters: int = 0  # dry run: at most this many iterations per stage and one round (0: off)
    amp: bool = False
    amp_dtype: str = "bf16"
    device: str = "cpu"
    workers: int = 0
    run_dir: str = "runs/synthetic"
    quiet: bool = False
    checkpoint_every: int = 200
    init_source: str = ""  # skip source-only, start the warm-up from this checkpoint
    init_warmup: str = ""  # skip source-only and warm-up, start round 1 from this checkpoint
    backbone_weights: str = ""  # initial trunk weights for source-only training (ImageNet/COCO)
    absent_classes: tuple[int, ...] = field(default_factory=tuple)
    label_map: str = ""  # "things": merge the synthetic city's stuff classes into one background
    oracle: bool = False  # synthetic only: train "source-only" on the labelled target train split


#: Settings shared by the paper-scale presets (method §1.3).
_PAPER_SCALE: dict[str, Any] = {
    "model": "resnet101",
    "bn_mode": "frozen",
    "target_size": (768, 1536),
    "crop_size": (512, 1024),
    "batch_size": 6,
    "source_iters": 40000,
    "source_lr": 2.5e-4,
    "warmup_iters": 20000,
    "warmup_lr": 2.5e-4,
    "round_iters": 8000,
    "round_lrs": (3e-6, 2e-6, 1e-6),
    "head_lr_multiplier": 10.0,
}

#: The synthetic city with its eight "stuff" classes merged into one background (about 90 % of the
#: pixels) and its 11 thin or countable classes kept: the extreme imbalance of digits-on-photos
#: benchmarks, for the collapse study (docs/results/collapse.md).
THINGS_CLASSES = (
    "background",
    "pole",
    "traffic light",
    "traffic sign",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
THINGS_MAP = {c: 0 for c in (0, 1, 2, 3, 4, 8, 9, 10)} | {
    c: i + 1 for i, c in enumerate((5, 6, 7, 11, 12, 13, 14, 15, 16, 17, 18))
}

PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": {},
    "things": {
        "num_classes": 12,
        "protocol": "all",
        "label_map": "things",
        "num_hard": 8,
        "run_dir": "runs/things",
    },
    "large": {  # the synthetic city at 192 × 384: thin classes wide enough to learn
        "synthetic_preset": "large",
        "data_dir": "data/synthetic_city_large",
        "crop_size": (128, 256),
        "batch_size": 4,  # twice the default's pixels per step; about 14 min per seed on 2 cores
        "run_dir": "runs/large",
    },
    "tiny": {
        "synthetic_preset": "tiny",
        "data_dir": "data/synthetic_city_tiny",
        "width": 8,
        "crop_size": (32, 64),
        "batch_size": 4,
        "source_iters": 20,
        "warmup_iters": 6,
        "round_iters": 8,
        "rounds": 2,
        "num_hard": 10,
        "checkpoint_every": 5,
        "run_dir": "runs/tiny",
    },
    "gta5": {
        **_PAPER_SCALE,
        "source_size": (720, 1280),
        "adv_weight": 0.05,
        "run_dir": "runs/gta5",
    },
    "synthia": {
        **_PAPER_SCALE,
        "protocol": "synthia16",
        "absent_classes": SYNTHIA_ABSENT_CLASSES,
        "source_size": (760, 1280),
        "adv_weight": 0.01,
        "run_dir": "runs/synthia",
    },
    "cityscapes_oxford": {
        **_PAPER_SCALE,
        "num_classes": 9,
        "num_hard": 6,
        "protocol": "oxford9",
        "source_size": (512, 1024),
        "target_size": (640, 1280),
        "run_dir": "runs/cityscapes_oxford",
    },
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class MappedLabels(Dataset):
    """Wrap a reader and map its train ids through a table (Cityscapes 19 → Oxford 9)."""

    def __init__(self, base: Dataset, table: np.ndarray) -> None:
        self.base, self.table = base, table

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        item["label"] = map_labels(item["label"], self.table).long()
        return item


def build_data(cfg: Config) -> tuple[Dataset, Any, Any, tuple[str, ...]]:
    """Source (labelled), target train (unlabelled reader), target val (labelled), class names."""
    if cfg.preset in ("synthetic", "large", "tiny", "things"):
        root = Path(cfg.data_dir)
        if is_main_process():
            synthetic.generate(
                root, synthetic.PRESETS[cfg.synthetic_preset], progress=not cfg.quiet
            )
        barrier()
        source: Dataset = GTA5(root / "source")
        if cfg.oracle:  # the target oracle: the same training on labelled target images
            source = Cityscapes(root / "target", "train")
        train = Cityscapes(root / "target", "train", label_type=None)
        val: Dataset = Cityscapes(root / "target", "val")
        if cfg.label_map == "things":
            table = lookup_table(THINGS_MAP)
            return MappedLabels(source, table), train, MappedLabels(val, table), THINGS_CLASSES
        return source, train, val, CITYSCAPES_CLASSES
    if not cfg.source_root or not cfg.target_root:
        raise SystemExit(f"--preset {cfg.preset} needs --source-root and --target-root")
    if cfg.preset == "gta5":
        source = GTA5(cfg.source_root, size=cfg.source_size)
    elif cfg.preset == "synthia":
        source = SYNTHIA(cfg.source_root, size=cfg.source_size)
    else:
        table = lookup_table(CITYSCAPES_TO_OXFORD)
        source = MappedLabels(Cityscapes(cfg.source_root, "train", size=cfg.source_size), table)
        train = OxfordRobotCar(cfg.target_root, "train", size=cfg.target_size)
        val = OxfordRobotCar(cfg.target_root, "val")
        return source, train, val, OXFORD_CLASSES
    train = Cityscapes(cfg.target_root, "train", label_type=None, size=cfg.target_size)
    val = Cityscapes(cfg.target_root, "val")
    return source, train, val, CITYSCAPES_CLASSES


SYNTHETIC_PRESETS = ("synthetic", "large", "tiny", "things")


def build_val(cfg: Config) -> Dataset:
    """The labelled target validation split of a preset, alone (no source folder needed)."""
    if cfg.preset in SYNTHETIC_PRESETS:
        root = Path(cfg.data_dir)
        if is_main_process():
            synthetic.generate(
                root, synthetic.PRESETS[cfg.synthetic_preset], progress=not cfg.quiet
            )
        barrier()
        val: Dataset = Cityscapes(root / "target", "val")
        if cfg.label_map == "things":
            return MappedLabels(val, lookup_table(THINGS_MAP))
        return val
    if not cfg.target_root:
        raise SystemExit(f"--preset {cfg.preset} needs --target-root")
    if cfg.preset == "cityscapes_oxford":
        return OxfordRobotCar(cfg.target_root, "val")
    return Cityscapes(cfg.target_root, "val")


def loader(dataset: Dataset, sampler: Any, cfg: Config) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, persistent_workers=False
    )


# ---------------------------------------------------------------------------------------------
# Models, optimisers, schedules
# ---------------------------------------------------------------------------------------------


def build_model(cfg: Config) -> nn.Module:
    if cfg.model == "resnet101":
        return deeplabv2_resnet101(cfg.num_classes, bn_mode=cfg.bn_mode)
    return deeplabv2_small(cfg.num_classes, bn_mode=cfg.bn_mode, width=cfg.width)


def cosine_lambda(total: int, min_ratio: float):
    def f(step: int) -> float:
        t = min(step, total) / max(total, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def make_optimizer(model: nn.Module, lr: float, cfg: Config, total: int):
    groups = unwrap_model(model).parameter_groups(lr, head_multiplier=cfg.head_lr_multiplier)
    opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total, cfg.min_lr_ratio))
    return opt, sched


class Amp:
    """Autocast + (fp16) grad scaler on CUDA; a no-op elsewhere."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.enabled = cfg.amp and device.type == "cuda"
        self.dtype = torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.enabled and self.dtype == torch.float16
        )
        self.device_type = device.type

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()


def micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Split a collated batch into ``n`` equal parts along the first dimension (``--accumulate``)."""
    size = next(len(v) for v in batch.values() if isinstance(v, (torch.Tensor, list)))
    if size % n:
        raise SystemExit(f"--accumulate {n} must divide the per-process batch size {size}")
    m = size // n
    return [
        {
            k: v[i * m : (i + 1) * m] if isinstance(v, (torch.Tensor, list)) else v
            for k, v in batch.items()
        }
        for i in range(n)
    ]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if not is_distributed():
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return normalize(images.to(device, non_blocking=True))


def source_batch(batch: dict[str, Any], cfg: Config, device: torch.device, gen: torch.Generator):
    """Random-sized crop + flip of a labelled batch (the weak view's geometry), normalised."""
    images, labels = batch["image"], batch["label"]
    params = crop_params(images.shape[0], tuple(images.shape[-2:]), generator=gen)
    x, (y,) = weak_geometry(images.to(device), params, cfg.crop_size, [labels.to(device)])
    return normalize(x), y


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    val: Any,
    cfg: Config,
    device: torch.device,
    *,
    desc: str = "eval",
    save_predictions: Path | None = None,
    max_saved: int = 4,
) -> dict[str, Any]:
    """The library's evaluation under the run's protocol, with a progress bar and a few
    colourised predictions (image | prediction | ground truth) saved."""
    saved: list[int] = []

    def keep(i: int, item: dict[str, Any], pred: torch.Tensor) -> None:
        if save_predictions is not None and len(saved) < max_saved and is_main_process():
            row = np.concatenate(
                [
                    item["image"].permute(1, 2, 0).numpy(),
                    colorize(pred.cpu().numpy()),
                    colorize(item["label"].numpy()),
                ],
                1,
            )
            write_rgb(save_predictions / f"{Path(item['name']).stem}.png", row)
            saved.append(i)

    n = len(range(rank(), len(val), world_size()))
    bar = progress(total=n, desc=desc, quiet=cfg.quiet)
    scores = ust.evaluate_segmentation(
        unwrap_model(model),
        val,
        cfg.num_classes,
        protocol=cfg.protocol,
        input_size=cfg.target_size,
        device=device,
        on_prediction=keep,
        progress=lambda done, total: bar.update(),
    )
    bar.close()
    return scores.to_dict()


def class_names(cfg: Config) -> list[str]:
    if cfg.label_map == "things":
        return list(THINGS_CLASSES)
    return list(CITYSCAPES_CLASSES if cfg.num_classes == 19 else OXFORD_CLASSES)


def write_report(run_dir: Path, results: dict[str, dict[str, Any]], cfg: Config) -> None:
    classes = results[next(iter(results))]["classes"]
    names = [class_names(cfg)[c] for c in classes]
    lines = ["| stage | mIoU | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for stage, s in results.items():
        lines.append(
            f"| {stage} | {100 * s['miou']:.1f} | "
            + " | ".join(f"{100 * v:.1f}" for v in s["iou"])
            + " |"
        )
    table = "\n".join(lines)
    (run_dir / "results.md").write_text(table + "\n")
    atomic_save_json(run_dir / "results.json", results)
    print(table)
    try:
        _plots(run_dir, results, names)
    except ImportError:
        print(
            "matplotlib not installed: plots skipped (pip install 'uda-selftrain[examples]')",
            file=sys.stderr,
        )


def _plots(run_dir: Path, results: dict[str, dict[str, Any]], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    stages = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(stages, [100 * results[s]["miou"] for s in stages], marker="o")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("mIoU per stage")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "miou_per_stage.png", dpi=120)
    plt.close(fig)
    first, last = stages[0], stages[-1]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [100 * v for v in results[first]["iou"]], 0.4, label=first)
    ax.bar(x + 0.2, [100 * v for v in results[last]["iou"]], 0.4, label=last)
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "per_class_iou.png", dpi=120)
    plt.close(fig)
    _diagnostics_plot(run_dir, plt)
    preds = sorted((run_dir / last / "predictions").glob("*.png"))[:4]
    if preds:
        from PIL import Image

        rows = [np.asarray(Image.open(p).convert("RGB")) for p in preds]
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        write_rgb(plots / "predictions.png", np.concatenate(rows, 0))


def _diagnostics_plot(run_dir: Path, plt: Any) -> None:
    """Each class's share of the pseudo-labels per round against the source prior (log scale)."""
    rounds = sorted(run_dir.glob("round*/diagnostics.json"))
    if not rounds:
        return
    records = [json.loads(r.read_text()) for r in rounds]
    c = len(records[0]["prior"])
    names = list(
        CITYSCAPES_CLASSES if c == 19 else OXFORD_CLASSES if c == 9 else map(str, range(c))
    )
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(11, 4))
    prior = np.array(records[0]["prior"], dtype=float)
    ax.plot(x, 100 * prior, "k_", markersize=14, mew=2, label="source prior")
    for i, (path, rec) in enumerate(zip(rounds, records, strict=True)):
        comp = np.array(rec["composition"], dtype=float)
        ax.scatter(
            x + 0.12 * (i - len(records) / 2),
            100 * np.maximum(comp, 1e-5),
            s=14,
            label=path.parent.name,
        )
        for c in rec["vanishing"]:
            ax.annotate("!", (c, 100 * max(comp[c], 1e-5)), color="red", ha="center")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right")
    ax.set_ylabel("% of pseudo-labelled pixels")
    ax.set_title("pseudo-label share per class (! = vanishing)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "pseudo_label_shares.png", dpi=120)
    plt.close(fig)


def mean_std(values: list[float]) -> str:
    """``"mean ± std"`` of fractions in percent (sample std, ddof 1; the mean alone for one value)."""
    return _mean_std(values)


def _mean_std(values: list[float]) -> str:
    a = 100 * np.asarray(values, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1):.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def seed_table(rows: dict[str, list[dict[str, Any]]], names: list[str], seeds: list[int]) -> str:
    """Markdown table: per row (stage or variant), mIoU and per-class IoU as mean ± std."""
    head = f"| (seeds {', '.join(map(str, seeds))}) | mIoU | " + " | ".join(names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    for row, scores in rows.items():
        per_class = [_mean_std([s["iou"][c] for s in scores]) for c in range(len(names))]
        lines.append(
            f"| {row} | {_mean_std([s['miou'] for s in scores])} | " + " | ".join(per_class) + " |"
        )
    return "\n".join(lines) + "\n"


def parse_args(
    argv: list[str] | None = None, *, description: str | None = None
) -> tuple[Config, bool, list[int]]:
    """The pipeline's command line: every :class:`Config` field as a flag, plus ``--preset``,
    ``--ablation`` and ``--seeds``."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    p.add_argument("--ablation", action="store_true", help="run the ablation table")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run once per seed in RUN_DIR/seed<S> and report mean ± std (with --ablation too); "
        "'{seed}' in --init-source/--init-warmup is replaced by each seed",
    )
    defaults = Config()
    skip = {"preset", "absent_classes"}
    for f in dataclasses.fields(Config):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif isinstance(value, tuple) or value is None:
            conv = float if f.name == "round_lrs" else int
            p.add_argument(flag, dest=f.name, type=conv, nargs="+", default=None)
        else:
            p.add_argument(flag, dest=f.name, type=type(value), default=None)
    args = p.parse_args(argv)
    values = {**PRESETS[args.preset]}
    for f in dataclasses.fields(Config):
        v = getattr(args, f.name, None)
        if f.name not in skip and v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    if values.get("max_iters"):  # dry run: every stage, a few iterations, one round
        n = values["max_iters"]
        cfg0 = Config(preset=args.preset, **{k: v for k, v in values.items()})
        values.update(
            source_iters=min(n, cfg0.source_iters),
            warmup_iters=min(n, cfg0.warmup_iters),
            round_iters=min(n, cfg0.round_iters),
            rounds=min(1, cfg0.rounds),
            checkpoint_every=max(1, n),
        )
    values.setdefault("run_dir", f"runs/{args.preset}")
    return Config(preset=args.preset, **values), args.ablation, args.seeds or []


# ---------------------------------------------------------------------------------------------
# Run folder and configuration
# ---------------------------------------------------------------------------------------------

#: Keys that may differ between runs sharing a folder (they do not change results).
RUNTIME_KEYS = {
    "device",
    "workers",
    "run_dir",
    "quiet",
    "data_dir",
    "eval_only",
    "amp_dtype",
    "checkpoint_every",
    # Selection reads finished rounds and changes no training: a rerun may choose differently.
    "select",
    "select_images",
    "patience",
}


def check_run_config(
    run_dir: Path, config: dict[str, Any], defaults: dict[str, Any] | None = None
) -> None:
    """Write ``config.json`` in a new run folder; refuse a different configuration in an old one.

    An option added after a run folder was made is no difference when this command leaves it at
    its default (``defaults``): such runs resume.
    """
    path = run_dir / "config.json"
    # Temporary files of atomic writes interrupted by a kill (".<name>.<random>.tmp"). Only rank 0
    # deletes them, and every rank waits for it: a rank still sweeping while rank 0 writes
    # config.json would delete rank 0's temporary file under it (a flaky DDP test did just that).
    if is_main_process():
        for orphan in run_dir.rglob(".*.tmp"):
            orphan.unlink(missing_ok=True)
    barrier()
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise SystemExit(
                f"{path} is damaged ({err}); restore it or choose another --run-dir"
            ) from None
        for k, v in (defaults or {}).items():
            old.setdefault(k, v)
        diff = {
            k: (old.get(k), config.get(k))
            for k in sorted(set(old) | set(config))
            if k not in RUNTIME_KEYS and old.get(k) != config.get(k)
        }
        if diff:
            lines = "\n".join(
                f"  {k}: run folder has {a!r}, this command has {b!r}" for k, (a, b) in diff.items()
            )
            raise SystemExit(
                f"{run_dir} was started with another configuration:\n{lines}\n"
                "Rerun with the same options to resume, or choose another --run-dir."
            )
    elif is_main_process():
        atomic_save_json(path, config)


def cached_result(path: Path, settings: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """The result stored at ``path`` if it was made with ``settings``; else ``compute()``, stored.

    One file per unit of work (a seed, a variant and seed) lets a rerun of the same command skip
    the units already done; a file made with other settings is refused rather than silently
    mixed into the new results.
    """
    if path.is_file():
        try:
            done = json.loads(path.read_text())
        except ValueError as err:
            raise SystemExit(f"{path} is damaged ({err}); delete it to recompute") from None
        # A file of an older layout (no "result" key) is refused too, not read half-way.
        if not isinstance(done, dict) or done.get("settings") != settings or "result" not in done:
            raise SystemExit(
                f"{path} was made with other settings (or an older version); use another --out"
            )
        return done["result"]
    result = compute()
    atomic_save_json(path, {"settings": settings, "result": result})
    return result


class MetricsLog:
    """JSON-lines log: one object per event, appended and flushed (rank 0 only).

    A run killed while writing can leave a torn last line; opening the log again (on resume)
    drops it, so every line of the file stays a whole JSON object. ``resumed`` tells whether the
    log already held records.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.resumed = path.is_file() and path.stat().st_size > 0
        if self.resumed and is_main_process():
            with open(path, "r+b") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # only a torn log is read in full
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)

    def forget_after(self, stage: str, iteration: int) -> None:
        """Drop the records of ``stage`` past ``iteration``: a resumed stage logs them again."""
        if not is_main_process() or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            r = json.loads(line)
            if not (r.get("stage") == stage and r.get("iteration", 0) > iteration):
                kept.append(line)
        atomic_save_text(self.path, "".join(line + "\n" for line in kept))

    def __call__(self, **record: Any) -> None:
        if not is_main_process():
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def progress(
    iterable: Any = None, *, total: int, initial: int = 0, desc: str, quiet: bool = False
) -> Any:
    """A progress bar with rate and ETA.

    On a terminal: tqdm (when installed). Otherwise — output redirected to a file, the usual way on
    a cluster — one line every 5 % or 60 s, whichever comes later, and at the end, instead of a
    line per iteration.
    """
    if quiet or not is_main_process():
        return _Silent(iterable, total, initial)
    if tqdm is not None and sys.stderr.isatty():
        return tqdm(
            iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr
        )
    return _PrintBar(iterable, total, initial, desc)


class _Silent:
    def __init__(self, iterable: Any, total: int, initial: int) -> None:
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _PrintBar(_Silent):
    def __init__(
        self, iterable: Any, total: int, initial: int, desc: str, *, min_interval: float = 60.0
    ) -> None:
        super().__init__(iterable, total, initial)
        self.desc, self.start, self.first = desc, time.perf_counter(), initial
        self.postfix = ""
        self.min_interval = min_interval
        self.last_time, self.last_n = self.start, initial

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        step = max(1, self.total // 20)
        due = self.n - self.last_n >= step and now - self.last_time >= self.min_interval
        if due or self.n == self.total:
            self.last_time, self.last_n = now, self.n
            done = self.n - self.first
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(
                f"{self.desc}: {self.n}/{self.total} {rate:.2f} it/s ETA {eta:.0f}s {self.postfix}",
                file=sys.stderr,
                flush=True,
            )

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())


# ---------------------------------------------------------------------------------------------
# RNG state and resumable training state
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the global state
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: Path, **objects: Any) -> None:
    """Checkpoint everything a resumed loop needs (rank 0 writes, atomically)."""
    if not is_main_process():
        return
    state = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in objects.items()}
    state["rng"] = rng_state()
    atomic_torch_save(path, state)


def load_training_state(path: Path, device: torch.device, **objects: Any) -> dict[str, Any] | None:
    """Restore the objects saved by :func:`save_training_state`; returns the raw state (or None).

    The global RNG is *not* restored here: call :func:`set_rng_state` with ``state["rng"]`` once
    the loop has made everything that draws from it at start-up (data-loader iterators), so that
    a resumed loop continues the uninterrupted run's random stream exactly.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torn or damaged: say which file, and what to do
        raise SystemExit(
            f"{path} is damaged ({type(err).__name__}: {err}); delete it to restart this stage "
            "from its beginning"
        ) from None
    for k, obj in objects.items():
        if hasattr(obj, "load_state_dict") and k in state:
            obj.load_state_dict(state[k])
    return state


def load_weights(path: Path, device: torch.device) -> dict[str, Any]:
    """A finished stage's weights; a damaged file is an error that says what to delete."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise SystemExit(
            f"{path} is damaged ({type(err).__name__}: {err}); delete it (and {path.parent}/rng.pt) "
            "to train that stage again"
        ) from None


def atomic_save_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def finish_stage(stage_dir: Path) -> None:
    """Record the global RNG state at the end of a training stage (before its final files)."""
    if is_main_process():
        atomic_torch_save(stage_dir / "rng.pt", rng_state())


def resume_finished_stage(stage_dir: Path) -> None:
    """Skipping a finished stage: continue from the RNG state it ended with, as if it had run."""
    if is_main_process():
        print(f"{stage_dir}: finished earlier, reusing it", file=sys.stderr)
    path = stage_dir / "rng.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=False))


class StageCost:
    """Logs a stage's wall time (per iteration too), peak RSS and peak GPU memory when it ends."""

    def __init__(
        self, log: MetricsLog, name: str, device: torch.device, *, iterations: int = 0
    ) -> None:
        self.log, self.name, self.device, self.iterations = log, name, device, iterations

    def __enter__(self) -> StageCost:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        record: dict[str, Any] = {"seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib()}
        if self.iterations:
            record["seconds_per_iteration"] = round(seconds / self.iterations, 4)
        if self.device.type == "cuda":
            record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        self.log(stage=self.name, event="cost", **record)


def peak_rss_mib() -> int:
    """This process's peak resident memory so far (MiB; Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10))


class StageRun:
    """Run management of one training stage, so that the stage's code is only its algorithm.

    Resumes from ``stage_dir/ckpt.pt`` (the ``objects``' state dicts, ``generator`` and the
    ``tensors``, copied back in place), shows progress, logs scalars every 20 iterations, writes a
    checkpoint every ``cfg.checkpoint_every`` and, at :meth:`finish`, the stage's final files.

    Usage::

        run = StageRun(stage_dir, "warmup", total, cfg, log, device, gen, model=model, ...)
        batches = iter(...)          # data iterators first: making them draws from the global RNG
        for it in run.iterations():  # restores the RNG of a resumed run, then counts
            ...
            run.step_done(it, loss=loss)
        run.finish({"model.pt": model.state_dict()})
    """

    def __init__(
        self,
        stage_dir: Path,
        name: str,
        total: int,
        cfg: Any,
        log: MetricsLog,
        device: torch.device,
        generator: torch.Generator,
        *,
        tensors: dict[str, torch.Tensor] | None = None,
        **objects: Any,
    ) -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.stage_dir, self.name, self.total, self.cfg, self.log = stage_dir, name, total, cfg, log
        self.generator, self.objects, self.tensors = generator, objects, tensors or {}
        self.ckpt = stage_dir / "ckpt.pt"
        self.device = device
        self.state = load_training_state(self.ckpt, device, **objects)
        self.start = self.state["iteration"] if self.state else 0
        if self.state:
            generator.set_state(self.state["generator"])
            for key, t in self.tensors.items():
                t.copy_(self.state[key])

    def iterations(self) -> Iterator[int]:
        if self.state:
            set_rng_state(self.state["rng"])
            self.log.forget_after(self.name, self.start)
            if is_main_process():
                print(
                    f"{self.name}: resuming at iteration {self.start} of {self.total} "
                    f"from {self.ckpt}",
                    file=sys.stderr,
                )
        self.bar = progress(
            total=self.total, initial=self.start, desc=self.name, quiet=self.cfg.quiet
        )
        with StageCost(self.log, self.name, self.device, iterations=self.total - self.start):
            yield from range(self.start, self.total)
        self.bar.close()

    def step_done(self, it: int, lr: float, **scalars: torch.Tensor) -> None:
        """After iteration ``it``: progress, the metrics log (every 20), a checkpoint (every N)."""
        self.bar.update()
        if (it + 1) % 20 == 0 or it + 1 == self.total:
            values = {k: float(v.detach()) for k, v in scalars.items()}
            self.bar.set_postfix(**{k: f"{v:.3f}" for k, v in values.items()})
            self.log(stage=self.name, iteration=it + 1, **values, lr=lr)
        if (it + 1) % self.cfg.checkpoint_every == 0 and it + 1 < self.total:
            save_training_state(
                self.ckpt,
                iteration=it + 1,
                generator=self.generator.get_state(),
                **self.tensors,
                **self.objects,
            )

    def finish(self, files: dict[str, Any]) -> None:
        """Write the stage's final files (state dicts or JSON-able values) and drop the checkpoint."""
        finish_stage(self.stage_dir)
        if is_main_process():
            for name, obj in files.items():
                if name.endswith(".json"):
                    atomic_save_json(self.stage_dir / name, obj)
                else:
                    atomic_torch_save(self.stage_dir / name, obj)
            self.ckpt.unlink(missing_ok=True)
        barrier()


# ---------------------------------------------------------------------------------------------
# Deterministic, resumable batch order
# ---------------------------------------------------------------------------------------------


class IterationBatches(torch.utils.data.Sampler[list[int]]):
    """Index batches for iterations ``start..total-1`` of a run, the same on every resume.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; iteration ``i`` takes the *global* batch
    at position ``i · batch``, and under DDP each rank takes its ``batch / world_size`` slice, so the
    samples seen per step do not depend on the number of processes.
    """

    def __init__(
        self, length: int, batch_size: int, total: int, start: int = 0, seed: int = 0
    ) -> None:
        w = world_size()
        if batch_size % w:
            raise SystemExit(f"--batch-size {batch_size} must be divisible by the {w} processes")
        self.length, self.batch, self.total, self.start, self.seed = (
            length,
            batch_size,
            total,
            start,
            seed,
        )
        self.local = batch_size // w

    def __len__(self) -> int:
        return self.total - self.start

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        r = rank()
        cache: dict[int, list[int]] = {}
        for it in range(self.start, self.total):
            out = []
            for k in range(self.batch):
                epoch, j = divmod(it * self.batch + k, self.length)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._perm(epoch)
                out.append(cache[epoch][j])
            yield out[r * self.local : (r + 1) * self.local]


def epoch_of(iteration: int, batch: int, length: int) -> int:
    return iteration * batch // max(length, 1)


# ---------------------------------------------------------------------------------------------
# Distributed setup
# ---------------------------------------------------------------------------------------------


def init_distributed(device: str) -> torch.device:
    """Initialise the process group under ``torchrun`` (``WORLD_SIZE`` > 1); return the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device.startswith("cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def config_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
