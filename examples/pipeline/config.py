"""The pipeline's configuration: every option with its default, the presets, the command line."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import uda_selftrain as ust
from uda_selftrain.datasets import SYNTHIA_ABSENT_CLASSES

from . import RunError

#: ``--select`` values: the paper's behaviour (the last round's teacher) or a validator's pick.
SELECT_CHOICES = ("last", *ust.VALIDATORS, *ust.COMBINED)

#: ``--collapse-guard`` values.
GUARDS = ("off", "keep", "student")


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
    collapse_guard: str = "off"  # off | keep | student: relabel a flagged class (pipeline.collapse)
    # label-free model selection (pipeline.selection)
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


SYNTHETIC_PRESETS = ("synthetic", "large", "tiny", "things")


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


def config_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def check_options(cfg: Config) -> None:
    """The selection and guard options, checked before anything runs."""
    if cfg.select not in SELECT_CHOICES:
        raise RunError(f"--select must be one of {', '.join(SELECT_CHOICES)}, got {cfg.select!r}")
    if cfg.collapse_guard not in GUARDS:
        raise RunError(f"--collapse-guard must be one of {', '.join(GUARDS)}")
    if cfg.patience and cfg.select == "last":
        raise RunError("--patience needs a validator to judge the rounds: pass --select too")
