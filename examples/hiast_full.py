"""The full HIAST pipeline (method §1), end to end, resumable, on one or many devices.

    python examples/hiast_full.py                      # built-in synthetic city, CPU, ~10 min
    python examples/hiast_full.py --preset gta5 --source-root data/GTA5 --target-root data/cityscapes \\
        --device cuda --amp
    torchrun --nproc_per_node 4 examples/hiast_full.py --preset gta5 ...   # multi-GPU

Stages: source-only training → adversarial warm-up (AdaptSegNet output space) → for each round:
pseudo-labels with the instance adaptive selector (PNGs + statistics files) → self-training on the
target with hard-aware copy-paste, weak/strong views, the HIAST loss and an EMA teacher →
evaluation. Every stage writes into ``--run-dir``; rerunning the same command resumes from the last
completed step, and a different configuration on an existing run folder is refused. ``--init-*``
start a stage from a given checkpoint (e.g. the public warm-up file) and skip what precedes it.

Ablations from the command line: ``--selector {ias,constant,argmax,cbst}``, ``--no-hpla``,
``--no-regularisation``, ``--no-consistency``; ``--ablation`` runs the whole table (CT, +IAS,
+HPLA, +regularisation, +consistency) from one shared warm-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pipeline_utils import (
    IterationBatches,
    MetricsLog,
    barrier,
    check_run_config,
    config_dict,
    epoch_of,
    init_distributed,
    load_training_state,
    progress,
    save_training_state,
    seed_everything,
)

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json, atomic_torch_save
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
    PseudoLabelDataset,
    colorize,
    lookup_table,
    map_labels,
    pseudo_label_path,
    synthetic,
)
from uda_selftrain.datasets.image_io import write_label, write_rgb
from uda_selftrain.distributed import (
    all_reduce_sum,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)
from uda_selftrain.mixing import ClassStatistics, DonorSampler, paste_views
from uda_selftrain.models import (
    FCDiscriminator,
    deeplabv2_resnet101,
    deeplabv2_small,
    load_checkpoint,
)
from uda_selftrain.teacher import unwrap_model

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
    # run
    seed: int = 0
    amp: bool = False
    amp_dtype: str = "bf16"
    device: str = "cpu"
    workers: int = 0
    run_dir: str = "runs/synthetic"
    quiet: bool = False
    checkpoint_every: int = 200
    init_source: str = ""  # skip source-only, start the warm-up from this checkpoint
    init_warmup: str = ""  # skip source-only and warm-up, start round 1 from this checkpoint
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
    if cfg.preset in ("synthetic", "tiny", "things"):
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
    groups = unwrap_model(model).parameter_groups(lr, cfg.head_lr_multiplier)
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

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


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
# Stage 1 and 2: source-only and adversarial warm-up
# ---------------------------------------------------------------------------------------------


def train_source(
    cfg: Config,
    stage_dir: Path,
    model: nn.Module,
    source: Dataset,
    target: Dataset | None,
    device: torch.device,
    log: MetricsLog,
    *,
    adversarial: bool,
) -> None:
    """Source CE training; with ``adversarial``, plus output-space alignment to the target."""
    final = stage_dir / "model.pt"
    if final.is_file():
        unwrap_model(model).load_state_dict(
            torch.load(final, map_location=device, weights_only=True)
        )
        return
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = "warmup" if adversarial else "source_only"
    total = cfg.warmup_iters if adversarial else cfg.source_iters
    lr = cfg.warmup_lr if adversarial else cfg.source_lr
    net = wrap_ddp(model, device)
    opt, sched = make_optimizer(model, lr, cfg, total)
    amp = Amp(cfg, device)
    disc = disc_opt = None
    if adversarial:
        disc = wrap_ddp(FCDiscriminator(cfg.num_classes, cfg.disc_width).to(device), device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + (2 if adversarial else 1) * 1000 + rank())
    ckpt = stage_dir / "ckpt.pt"
    objects = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": amp.scaler,  # fp16 loss scale: resumed, not re-learned
        "generator": None,
    }
    if disc is not None:
        objects.update(disc=unwrap_model(disc), disc_optimizer=disc_opt)
    state = load_training_state(ckpt, device, **{k: v for k, v in objects.items() if v is not None})
    start = state["iteration"] if state else 0
    if state:
        gen.set_state(state["generator"])
    src_iter = iter(
        loader(
            source, IterationBatches(len(source), cfg.batch_size, total, start, cfg.seed + 1), cfg
        )
    )
    tgt_iter = None
    if adversarial:
        tgt_iter = iter(
            loader(
                target,
                IterationBatches(len(target), cfg.batch_size, total, start, cfg.seed + 2),
                cfg,
            )
        )
    bar = progress(total=total, initial=start, desc=name, quiet=cfg.quiet)
    net.train()
    for it in range(start, total):
        x, y = source_batch(next(src_iter), cfg, device, gen)
        with amp.autocast():
            out = net(x)
            loss = F.cross_entropy(out.float(), y, ignore_index=255)
            adv = torch.zeros((), device=device)
            if adversarial:
                xt, _ = source_batch(next(tgt_iter), cfg, device, gen)
                pt = F.softmax(net(xt).float(), dim=1)
                d_out = disc(pt)
                adv = _adv_loss(d_out, 0.0, cfg)  # fool D: target looks like source (label 0)
                loss = loss + cfg.adv_weight * adv
        opt.zero_grad(set_to_none=True)
        amp.step(loss, opt)
        sched.step()
        if adversarial:
            disc_opt.zero_grad(set_to_none=True)
            ps = F.softmax(out.detach().float(), dim=1)
            d_loss = 0.5 * (_adv_loss(disc(ps), 0.0, cfg) + _adv_loss(disc(pt.detach()), 1.0, cfg))
            d_loss.backward()
            disc_opt.step()
        bar.update()
        if (it + 1) % 20 == 0 or it + 1 == total:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log(
                stage=name,
                iteration=it + 1,
                loss=float(loss.detach()),
                adv=float(adv.detach()),
                lr=sched.get_last_lr()[0],
            )
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < total:
            save_training_state(
                ckpt,
                iteration=it + 1,
                generator=gen.get_state(),
                **{k: v for k, v in objects.items() if k != "generator" and v is not None},
            )
    bar.close()
    if is_main_process():
        atomic_torch_save(final, unwrap_model(model).state_dict())
        ckpt.unlink(missing_ok=True)
    barrier()


def _adv_loss(d_out: torch.Tensor, label: float, cfg: Config) -> torch.Tensor:
    target = torch.full_like(d_out, label)
    if cfg.adv_loss == "bce":
        return F.binary_cross_entropy_with_logits(d_out, target)
    return F.mse_loss(d_out, target)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
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
    """mIoU on the labelled target set (logits upsampled to the label size), reduced over ranks."""
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    cm = ust.ConfusionMatrix(cfg.num_classes)
    idx = list(range(rank(), len(val), world_size()))
    bar = progress(total=len(idx), desc=desc, quiet=cfg.quiet)
    saved = 0
    for i in idx:
        item = val[i]
        image = item["image"].unsqueeze(0)
        x = image
        if cfg.target_size is not None and tuple(image.shape[-2:]) != tuple(cfg.target_size):
            x = F.interpolate(
                image.float(), size=cfg.target_size, mode="bilinear", align_corners=False
            )
            x = x.round().clamp(0, 255).to(torch.uint8)
        logits = model(to_input(x, device))
        logits = F.interpolate(
            logits.float(), size=item["label"].shape, mode="bilinear", align_corners=False
        )
        pred = logits.argmax(1)
        cm.update(pred, item["label"].unsqueeze(0).to(device))
        if save_predictions is not None and saved < max_saved and is_main_process():
            p = pred[0].cpu().numpy()
            row = np.concatenate(
                [image[0].permute(1, 2, 0).numpy(), colorize(p), colorize(item["label"].numpy())], 1
            )
            write_rgb(save_predictions / f"{Path(item['name']).stem}.png", row)
            saved += 1
        bar.update()
    bar.close()
    model.train(was_training)
    return cm.scores(None if cfg.protocol == "all" else cfg.protocol)


# ---------------------------------------------------------------------------------------------
# Stage 3a: pseudo-labels
# ---------------------------------------------------------------------------------------------


def build_selector(cfg: Config, device: torch.device) -> nn.Module:
    if cfg.selector == "ias":
        return ust.InstanceAdaptiveSelector(
            cfg.num_classes,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            granularity="batch" if cfg.pl_batch > 1 else "image",
            min_threshold=cfg.min_threshold,
        ).to(device)
    if cfg.selector == "constant":
        return ust.ConstantThresholdSelector(cfg.num_classes, threshold=cfg.constant_threshold).to(
            device
        )
    if cfg.selector == "argmax":
        return ust.ArgmaxSelector(cfg.num_classes).to(device)
    if cfg.selector == "cbst":
        return ust.CBSTSelector(cfg.num_classes, proportion=cfg.cbst_proportion).to(device)
    raise SystemExit(f"unknown --selector {cfg.selector!r}")


@torch.no_grad()
def _probabilities(
    model: nn.Module, items: list[dict[str, Any]], cfg: Config, device: torch.device
) -> torch.Tensor:
    if not items:
        return torch.empty(0, cfg.num_classes, 1, 1, device=device)
    images = torch.stack([item["image"] for item in items])
    return F.softmax(model(to_input(images, device)).float(), dim=1)


@torch.no_grad()
def generate_pseudo_labels(
    cfg: Config,
    round_dir: Path,
    model: nn.Module,
    target: Any,
    device: torch.device,
    log: MetricsLog,
) -> ClassStatistics:
    """Pseudo-label every target image (IAS state carried image by image) and record statistics.

    Resumable: the selector state, statistics and position are checkpointed every 50 images; the
    PNGs of a finished run are kept. Under DDP, ranks take images in turn and every selector update
    is synchronised, so all ranks hold the same thresholds.
    """
    stats_dir = round_dir / "stats"
    pseudo_dir = round_dir / "pseudo"
    if (stats_dir / "done.json").is_file():
        return ClassStatistics.load(stats_dir, cfg.num_classes)
    model = unwrap_model(model)
    model.eval()
    selector = build_selector(cfg, device)
    stats = ClassStatistics(cfg.num_classes)
    # Each step, rank r takes images [base + r·b, base + (r + 1)·b) with b = pl_batch, and the
    # synchronised selector updates θ once on the union over ranks: the same as one process
    # taking pl_batch × world_size images per update.
    w, b = world_size(), cfg.pl_batch
    n_steps = math.ceil(len(target) / (w * b))

    def items_of(step: int) -> list[dict[str, Any]]:
        first = step * w * b + rank() * b
        return [target[i] for i in range(first, min(first + b, len(target)))]

    state_path = round_dir / f"pseudo_state_rank{rank()}.pt"
    start = 0
    labelled_pixels = 0  # every pixel given a pseudo-label or 255, this rank
    if state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=False)
        selector.load_state_dict(st["selector"])
        stats.add(st["names"], st["pixels"])
        start = st["step"]
        labelled_pixels = st["labelled_pixels"]
    if cfg.selector == "cbst" and start == 0:
        for step in progress(range(n_steps), total=n_steps, desc="cbst fit", quiet=cfg.quiet):
            items = items_of(step)
            if items:
                selector.observe(_probabilities(model, items, cfg, device), probabilities=True)
        selector.fit()
    bar = progress(
        total=n_steps, initial=start, desc=f"pseudo-labels {round_dir.name}", quiet=cfg.quiet
    )
    for step in range(start, n_steps):
        items = items_of(step)
        if not items and not is_distributed():
            bar.update()
            continue
        # An empty batch still takes part in the synchronised update (ranks without images).
        sel = selector(_probabilities(model, items, cfg, device), probabilities=True)
        for j, item in enumerate(items):
            write_label(pseudo_label_path(pseudo_dir, item["name"]), sel.labels[j].cpu().numpy())
        if items:
            labelled_pixels += sel.labels.numel()
            stats.add([item["name"] for item in items], sel.class_pixels.cpu())
        bar.update()
        if (step + 1) % 50 == 0 and step + 1 < n_steps:
            atomic_torch_save(
                state_path,
                {
                    "selector": selector.state_dict(),
                    "names": stats.names,
                    "pixels": stats.sample_class_pixels,
                    "step": step + 1,
                    "labelled_pixels": labelled_pixels,
                },
            )
    bar.close()
    stats.class_values = selector.class_values.detach().double().cpu()
    stats.thresholds = selector.thresholds.detach().double().cpu()
    stats = _gather_statistics(stats)
    total = int(all_reduce_sum(torch.tensor([labelled_pixels], device=device)).item())
    if is_main_process():
        stats.save(stats_dir)
        pix = stats.class_pixels
        selected = int(pix.sum())
        fraction = selected / max(1, total)
        atomic_save_json(
            stats_dir / "done.json",
            {
                "images": len(stats),
                "selected_fraction": fraction,
                "selected_pixels_per_image": selected / max(1, len(stats)),
                "total_pixels": total,
            },
        )
        log(
            stage=round_dir.name,
            event="pseudo_labels",
            selected_fraction=fraction,
            thresholds=stats.thresholds.tolist(),
            class_values=stats.class_values.tolist(),
            class_pixels=pix.tolist(),
        )
    barrier()
    state_path.unlink(missing_ok=True)
    return ClassStatistics.load(stats_dir, cfg.num_classes)


def _gather_statistics(stats: ClassStatistics) -> ClassStatistics:
    if not is_distributed():
        return stats
    parts: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(parts, (stats.names, stats.sample_class_pixels))
    merged = ClassStatistics(stats.num_classes)
    for names, pixels in parts:
        merged.add(names, pixels)
    merged.class_values, merged.thresholds = stats.class_values, stats.thresholds
    return merged


# ---------------------------------------------------------------------------------------------
# Stage 3b: self-training
# ---------------------------------------------------------------------------------------------


def self_train(
    cfg: Config,
    round_dir: Path,
    k: int,
    student: nn.Module,
    target: Any,
    source: Dataset,
    stats: ClassStatistics,
    device: torch.device,
    log: MetricsLog,
) -> ust.EMATeacher:
    final = round_dir / "student.pt"
    teacher = ust.EMATeacher(student, momentum=cfg.ema_momentum)  # re-initialised from the student
    if final.is_file():
        student.load_state_dict(torch.load(final, map_location=device, weights_only=True))
        teacher.load_state_dict(
            torch.load(round_dir / "teacher.pt", map_location=device, weights_only=True)
        )
        return teacher
    total = cfg.round_iters
    sampler = None
    if cfg.hpla:
        sampler = DonorSampler(
            stats,
            num_hard=cfg.num_hard,
            absent_classes=cfg.absent_classes,
            max_donors=cfg.max_donors,
        )
        hard_mask = sampler.hard_mask.to(device)
        log(
            stage=round_dir.name,
            event="hard_classes",
            hard=sampler.hard_classes.tolist(),
            probabilities=sampler.probabilities[sampler.hard_classes].tolist(),
        )
    data = PseudoLabelDataset(
        target, round_dir / "pseudo", sampler=sampler, donor_names=stats.names, seed=cfg.seed + k
    )
    views = ust.WeakStrongViews(cfg.crop_size)
    loss_fn = ust.HIASTLoss(
        smoothing_weight=cfg.smoothing_weight if cfg.regularisation else 0.0,
        entropy_weight=cfg.entropy_weight if cfg.regularisation else 0.0,
        consistency_weight=cfg.consistency_weight if cfg.consistency else 0.0,
    )
    net = wrap_ddp(student, device)
    opt, sched = make_optimizer(
        student, cfg.round_lrs[min(k - 1, len(cfg.round_lrs) - 1)], cfg, total
    )
    amp = Amp(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 100 * k + rank())
    ckpt = round_dir / "ckpt.pt"
    state = load_training_state(
        ckpt,
        device,
        model=student,
        teacher=teacher,
        optimizer=opt,
        scheduler=sched,
        scaler=amp.scaler,
    )
    start = state["iteration"] if state else 0
    # Pixels pasted per class this round (on the device, read once at the end): diagnostics.
    pasted_pixels = torch.zeros(cfg.num_classes, dtype=torch.int64, device=device)
    if state:
        gen.set_state(state["generator"])
        pasted_pixels.copy_(state.get("pasted_pixels", pasted_pixels))
    src_batches = None
    if cfg.source_weight > 0:
        src_batches = iter(
            loader(
                source,
                IterationBatches(len(source), cfg.batch_size, total, start, cfg.seed + 20 * k),
                cfg,
            )
        )
    data.set_epoch(epoch_of(start, cfg.batch_size, len(data)))
    batches = iter(
        loader(
            data, IterationBatches(len(data), cfg.batch_size, total, start, cfg.seed + 10 * k), cfg
        )
    )
    bar = progress(
        total=total, initial=start, desc=f"self-training {round_dir.name}", quiet=cfg.quiet
    )
    net.train()
    for it in range(start, total):
        data.set_epoch(epoch_of(it, cfg.batch_size, len(data)))
        batch = next(batches)
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if sampler is not None:
            v = paste_views(
                images,
                labels,
                batch["donor_images"].to(device),
                batch["donor_labels"].to(device),
                hard_mask,
                batch["donor_valid"].to(device),
                views=views,
                generator=gen,
            )
        else:
            v = views(images, [labels], generator=gen)
        y = v.maps[0].long()
        if sampler is not None:
            pasted_pixels += ust.class_counts(v.maps[1], cfg.num_classes)
        with amp.autocast():
            logits = net(v.strong)
            teacher_logits = None
            if cfg.consistency:
                with torch.no_grad():
                    teacher_logits = teacher(v.weak)
            out = loss_fn(
                logits.float(), y, None if teacher_logits is None else teacher_logits.float()
            )
            total_loss = out.total
            if src_batches is not None:
                xs, ys = source_batch(next(src_batches), cfg, device, gen)
                src_ce = F.cross_entropy(net(xs).float(), ys, ignore_index=255)
                total_loss = total_loss + cfg.source_weight * src_ce
        opt.zero_grad(set_to_none=True)
        amp.step(total_loss, opt)
        sched.step()
        teacher.update(student)
        bar.update()
        if (it + 1) % 20 == 0 or it + 1 == total:
            bar.set_postfix(loss=f"{out.total.item():.3f}")
            log(
                stage=round_dir.name,
                iteration=it + 1,
                loss=float(out.total.detach()),
                ce=float(out.ce.detach()),
                smoothing=float(out.smoothing.detach()),
                entropy=float(out.entropy.detach()),
                consistency=float(out.consistency.detach()),
                lr=sched.get_last_lr()[0],
            )
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < total:
            save_training_state(
                ckpt,
                iteration=it + 1,
                generator=gen.get_state(),
                pasted_pixels=pasted_pixels,
                model=student,
                teacher=teacher,
                optimizer=opt,
                scheduler=sched,
                scaler=amp.scaler,
            )
    bar.close()
    pasted_total = all_reduce_sum(pasted_pixels).tolist()
    if is_main_process():
        atomic_save_json(round_dir / "pasted_pixels.json", pasted_total)
        atomic_torch_save(round_dir / "teacher.pt", teacher.state_dict())
        atomic_torch_save(final, student.state_dict())
        ckpt.unlink(missing_ok=True)
    barrier()
    return teacher


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def stage_eval(
    cfg: Config,
    run_dir: Path,
    name: str,
    model: nn.Module,
    val: Any,
    device: torch.device,
    log: MetricsLog,
) -> dict[str, Any]:
    path = run_dir / name / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = evaluate(
        model,
        val,
        cfg,
        device,
        desc=f"eval {name}",
        save_predictions=run_dir / name / "predictions",
    )
    if is_main_process():
        atomic_save_json(path, scores)
        log(stage=name, event="eval", miou=scores["miou"])
    barrier()
    return scores


def run_pipeline(
    cfg: Config, device: torch.device, *, shared_warmup: Path | None = None
) -> dict[str, dict[str, Any]]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_config(run_dir, config_dict(cfg), config_dict(Config()))
    log = MetricsLog(run_dir / "metrics.jsonl")
    log(event="start", resumed=log.resumed)
    seed_everything(cfg.seed)
    source, target, val, _ = build_data(cfg)
    model = build_model(cfg).to(device)
    results: dict[str, dict[str, Any]] = {}
    warm_path = shared_warmup or (Path(cfg.init_warmup) if cfg.init_warmup else None)
    if warm_path is None:
        if cfg.init_source:
            report = load_checkpoint(model, cfg.init_source)
            log(stage="source_only", event="init", path=cfg.init_source, unused=report.unused)
        else:
            train_source(
                cfg, run_dir / "source_only", model, source, None, device, log, adversarial=False
            )
            results["source_only"] = stage_eval(
                cfg, run_dir, "source_only", model, val, device, log
            )
        train_source(cfg, run_dir / "warmup", model, source, target, device, log, adversarial=True)
        results["warmup"] = stage_eval(cfg, run_dir, "warmup", model, val, device, log)
    else:
        report = load_checkpoint(model, warm_path)
        log(stage="warmup", event="init", path=str(warm_path), unused=report.unused)
    label_model: nn.Module = model
    monitor = ust.CollapseMonitor(source_prior(cfg, run_dir, source), class_names=class_names(cfg))
    for k in range(1, cfg.rounds + 1):
        round_dir = run_dir / f"round{k}"
        round_dir.mkdir(exist_ok=True)
        stats = generate_pseudo_labels(cfg, round_dir, label_model, target, device, log)
        diagnose_round(cfg, run_dir, k, stats, monitor, log)
        teacher = self_train(cfg, round_dir, k, model, target, source, stats, device, log)
        results[f"round{k}"] = stage_eval(
            cfg, run_dir, f"round{k}", teacher.module, val, device, log
        )
        label_model = teacher.module  # the next round's labels come from this round's teacher
    final = {"teacher": label_model.state_dict()}
    if is_main_process():
        atomic_torch_save(run_dir / "final.pt", final["teacher"])
        write_report(run_dir, results, cfg)
    return results


def class_names(cfg: Config) -> list[str]:
    if cfg.label_map == "things":
        return list(THINGS_CLASSES)
    return list(CITYSCAPES_CLASSES if cfg.num_classes == 19 else OXFORD_CLASSES)


def source_prior(cfg: Config, run_dir: Path, source: Dataset) -> torch.Tensor:
    """The source label prior from up to 500 evenly spaced label maps, cached in the run folder."""
    path = run_dir / "source_prior.json"
    if path.is_file():
        return torch.tensor(json.loads(path.read_text()), dtype=torch.float64)
    step = max(1, len(source) // 500)
    prior = ust.class_prior(
        (source[i]["label"] for i in range(0, len(source), step)), cfg.num_classes
    )
    if is_main_process():
        atomic_save_json(path, prior.tolist())
    return prior


def diagnose_round(
    cfg: Config,
    run_dir: Path,
    k: int,
    stats: ClassStatistics,
    monitor: ust.CollapseMonitor,
    log: MetricsLog,
) -> None:
    """Per-class pseudo-label shares against the source prior and the previous round; warns."""
    done = json.loads((run_dir / f"round{k}" / "stats" / "done.json").read_text())
    selected = int(stats.class_pixels.sum())
    total = int(done.get("total_pixels", round(selected / max(done["selected_fraction"], 1e-12))))
    pasted_path = run_dir / f"round{k - 1}" / "pasted_pixels.json"
    pasted = None
    if pasted_path.is_file():
        pasted = torch.tensor(json.loads(pasted_path.read_text()), dtype=torch.float64)
    diag = monitor.update(
        stats.class_pixels, total_pixels=total, thresholds=stats.thresholds, pasted_pixels=pasted
    )
    if is_main_process():
        record = diag.to_dict()
        atomic_save_json(run_dir / f"round{k}" / "diagnostics.json", record)
        log(stage=f"round{k}", event="diagnostics", **record)


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


def ablation(cfg: Config, device: torch.device) -> dict[str, dict[str, Any]]:
    """CT self-training, then add IAS, HPLA, regularisation, consistency, from one warm-up.

    Returns the scores of the source-only and warm-up models and each variant's final model.
    """
    base = Path(cfg.run_dir)
    main = run_pipeline(dataclasses.replace(cfg, rounds=0), device)
    warm = base / "warmup" / "model.pt"
    variants = [
        (
            "CT",
            {"selector": "constant", "hpla": False, "regularisation": False, "consistency": False},
        ),
        ("+IAS", {"selector": "ias", "hpla": False, "regularisation": False, "consistency": False}),
        ("+HPLA", {"selector": "ias", "hpla": True, "regularisation": False, "consistency": False}),
        (
            "+regularisation",
            {"selector": "ias", "hpla": True, "regularisation": True, "consistency": False},
        ),
        (
            "+consistency (HIAST)",
            {"selector": "ias", "hpla": True, "regularisation": True, "consistency": True},
        ),
    ]
    scores = {k: main[k] for k in ("source_only", "warmup") if k in main}
    for name, change in variants:
        slug = name.strip("+").split(" ")[0].lower()
        vcfg = dataclasses.replace(cfg, run_dir=str(base / "ablation" / slug), **change)
        res = run_pipeline(vcfg, device, shared_warmup=warm)
        scores[name] = res[f"round{cfg.rounds}"]
    table = "| variant | mIoU |\n|---|---|\n" + "\n".join(
        f"| {n} | {100 * m['miou']:.1f} |" for n, m in scores.items()
    )
    if is_main_process():
        (base / "ablation.md").write_text(table + "\n")
    print(table)
    return scores


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


def run_seeds(cfg: Config, device: torch.device, seeds: list[int], run_ablation: bool) -> None:
    """Run the pipeline (or the ablation) once per seed in ``run_dir/seed<S>``; write mean ± std.

    The standard deviation is the sample standard deviation over the seeds (ddof = 1).
    """
    base = Path(cfg.run_dir)
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for s in seeds:
        scfg = dataclasses.replace(
            cfg,
            seed=s,
            run_dir=str(base / f"seed{s}"),
            init_source=cfg.init_source.format(seed=s),
            init_warmup=cfg.init_warmup.format(seed=s),
        )
        results = ablation(scfg, device) if run_ablation else run_pipeline(scfg, device)
        for row, scores in results.items():
            per_seed.setdefault(row, []).append(scores)
    if not is_main_process():
        return
    classes = next(iter(per_seed.values()))[0]["classes"]
    names = [class_names(cfg)[c] for c in classes]
    table = seed_table(per_seed, names, seeds)
    name = "ablation" if run_ablation else "results"
    (base / f"{name}_seeds.md").write_text(table)
    atomic_save_json(base / f"{name}_seeds.json", {"seeds": seeds, "results": per_seed})
    print(table)


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool, list[int]]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    if args.preset not in ("synthetic", "things") and "run_dir" not in values:
        values["run_dir"] = f"runs/{args.preset}"
    return Config(preset=args.preset, **values), args.ablation, args.seeds or []


def main(argv: list[str] | None = None) -> int:
    cfg, run_ablation, seeds = parse_args(argv)
    device = init_distributed(cfg.device)
    start = time.perf_counter()
    if seeds:
        run_seeds(cfg, device, seeds, run_ablation)
    elif run_ablation:
        ablation(cfg, device)
    else:
        run_pipeline(cfg, device)
    if is_main_process():
        print(
            f"done in {time.perf_counter() - start:.0f}s; outputs in {cfg.run_dir}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
