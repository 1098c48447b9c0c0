"""Model, selector, optimiser and schedule, AMP, micro-batches, DDP and seeding."""

from __future__ import annotations

import math
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import uda_selftrain as ust
from uda_selftrain.distributed import is_distributed
from uda_selftrain.models import deeplabv2_resnet101, deeplabv2_small
from uda_selftrain.teacher import unwrap_model

from . import RunError
from .config import Config


def build_model(cfg: Config) -> nn.Module:
    if cfg.model == "resnet101":
        return deeplabv2_resnet101(cfg.num_classes, bn_mode=cfg.bn_mode)
    return deeplabv2_small(cfg.num_classes, bn_mode=cfg.bn_mode, width=cfg.width)


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
    raise RunError(f"unknown --selector {cfg.selector!r}")


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
        raise RunError(f"--accumulate {n} must divide the per-process batch size {size}")
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
        raise RunError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the global state
    torch.manual_seed(seed)
