"""Stages 1 and 2: source-only training and the adversarial (AdaptSegNet) warm-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from uda_selftrain.distributed import rank
from uda_selftrain.models import FCDiscriminator, load_backbone, load_checkpoint
from uda_selftrain.teacher import unwrap_model

from .config import Config
from .data import batch_stream, source_batch
from .runs import MetricsLog, load_weights, resume_finished_stage
from .stages import StageRun, stage_eval
from .training import Amp, make_optimizer, micro_batches, wrap_ddp


def start_model(
    cfg: Config,
    run_dir: Path,
    model: nn.Module,
    warm_path: Path | None,
    source: Dataset,
    target: Any,
    val: Any,
    device: torch.device,
    log: MetricsLog,
) -> dict[str, dict[str, Any]]:
    """Stages 1–2 (source-only, warm-up), or the given checkpoint; the stages' scores."""
    results: dict[str, dict[str, Any]] = {}
    if warm_path is not None:
        report = load_checkpoint(model, warm_path)
        log(stage="warmup", event="init", path=str(warm_path), unused=report.unused)
        return results
    if cfg.init_source:
        report = load_checkpoint(model, cfg.init_source)
        log(stage="source_only", event="init", path=cfg.init_source, unused=report.unused)
    else:
        if cfg.backbone_weights:  # ImageNet / MS-COCO DeepLab / our checkpoint: the trunk only
            report = load_backbone(model, cfg.backbone_weights)
            log(
                stage="source_only",
                event="init_backbone",
                path=cfg.backbone_weights,
                unused=report.unused,
            )
        train_source(
            cfg, run_dir / "source_only", model, source, None, device, log, adversarial=False
        )
        results["source_only"] = stage_eval(cfg, run_dir, "source_only", model, val, device, log)
    train_source(cfg, run_dir / "warmup", model, source, target, device, log, adversarial=True)
    results["warmup"] = stage_eval(cfg, run_dir, "warmup", model, val, device, log)
    return results


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
    if (stage_dir / "model.pt").is_file():
        unwrap_model(model).load_state_dict(load_weights(stage_dir / "model.pt", device))
        resume_finished_stage(stage_dir)
        return
    name = "warmup" if adversarial else "source_only"
    total = cfg.warmup_iters if adversarial else cfg.source_iters
    net = wrap_ddp(model, device)
    opt, sched = make_optimizer(model, cfg.warmup_lr if adversarial else cfg.source_lr, cfg, total)
    amp = Amp(cfg, device)
    parts: dict[str, Any] = {"model": model, "optimizer": opt, "scheduler": sched}
    if adversarial:
        disc = wrap_ddp(FCDiscriminator(cfg.num_classes, ndf=cfg.disc_width).to(device), device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.9, 0.99))
        parts.update(disc=unwrap_model(disc), disc_optimizer=disc_opt)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + (2 if adversarial else 1) * 1000 + rank())
    run = StageRun(stage_dir, name, total, cfg, log, device, gen, scaler=amp.scaler, **parts)
    src_iter = batch_stream(source, cfg, total, run.start, cfg.seed + 1)
    if adversarial:
        tgt_iter = batch_stream(target, cfg, total, run.start, cfg.seed + 2)
    net.train()
    a = cfg.accumulate
    for it in run.iterations():
        opt.zero_grad(set_to_none=True)
        if adversarial:
            disc_opt.zero_grad(set_to_none=True)
            targets = micro_batches(next(tgt_iter), a)
        for part, batch in enumerate(micro_batches(next(src_iter), a)):
            x, y = source_batch(batch, cfg, device, gen)
            with amp.autocast():
                out = net(x)
                loss = F.cross_entropy(out.float(), y, ignore_index=255)
                adv = torch.zeros((), device=device)
                if adversarial:
                    adv, pt = _fool_disc(net, disc, targets[part], cfg, device, gen)
                    loss = loss + cfg.adv_weight * adv
            amp.backward(loss / a)
            if adversarial:  # D learns source 0, target 1
                ps = F.softmax(out.detach().float(), dim=1)
                d_loss = _adv_loss(disc(ps), 0.0, cfg) + _adv_loss(disc(pt.detach()), 1.0, cfg)
                (0.5 * d_loss / a).backward()
        amp.step(opt)
        sched.step()
        if adversarial:
            disc_opt.step()
        run.step_done(it, sched.get_last_lr()[0], loss=loss, adv=adv)
    run.finish({"model.pt": unwrap_model(model).state_dict()})


def source_ce(
    net: nn.Module, batch: dict[str, Any], cfg: Config, gen: torch.Generator
) -> torch.Tensor:
    """Cross-entropy on a labelled source batch (weak geometry, normalised)."""
    device = next(net.parameters()).device
    xs, ys = source_batch(batch, cfg, device, gen)
    return F.cross_entropy(net(xs).float(), ys, ignore_index=255)


def _fool_disc(
    net: nn.Module,
    disc: nn.Module,
    batch: dict[str, Any],
    cfg: Config,
    device: torch.device,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segmenter's adversarial term (target outputs should look like source ones, label 0)
    and the target probabilities; the discriminator is not trained by it."""
    xt, _ = source_batch(batch, cfg, device, gen)
    pt = F.softmax(net(xt).float(), dim=1)
    disc.requires_grad_(False)
    adv = _adv_loss(disc(pt), 0.0, cfg)
    disc.requires_grad_(True)
    return adv, pt


def _adv_loss(d_out: torch.Tensor, label: float, cfg: Config) -> torch.Tensor:
    target = torch.full_like(d_out, label)
    if cfg.adv_loss == "bce":
        return F.binary_cross_entropy_with_logits(d_out, target)
    return F.mse_loss(d_out, target)
