"""The full HIAST pipeline (method §1), end to end, resumable, on one or many devices.

    python examples/hiast_full.py                      # built-in synthetic city, CPU, ~10 min
    python examples/hiast_full.py --preset large       # the city at 192 × 384 (thin classes), ~14 min
    python examples/hiast_full.py --preset gta5 --source-root data/GTA5 --target-root data/cityscapes \\
        --device cuda --amp
    torchrun --nproc_per_node 4 examples/hiast_full.py --preset gta5 ...   # multi-GPU

Stages: source-only training → adversarial warm-up (AdaptSegNet output space) → for each round:
pseudo-labels with the instance adaptive selector (PNGs + statistics files) → self-training on the
target with hard-aware copy-paste, weak/strong views, the HIAST loss and an EMA teacher →
evaluation. Every stage writes into ``--run-dir``; rerunning the same command resumes from the last
completed step, and a different configuration on an existing run folder is refused. ``--init-*``
start a stage from a given checkpoint (e.g. the public warm-up file) and skip what precedes it;
``--backbone-weights FILE`` starts source-only training with the trunk from torchvision's ImageNet
``resnet101`` file, the MS-COCO DeepLab-v2 initialisation the public pipelines use, or a checkpoint
of ours.

Model selection without target labels: ``--select VALIDATOR`` scores every model of the run on
unlabelled target images after each round and keeps the best as ``final.pt`` (``--patience N``
stops early); ``--collapse-guard keep|student`` relabels a class the diagnostics flag as vanishing
before a round trains on it (see docs/components/validators.md and docs/components/diagnostics.md).

Ablations from the command line: ``--selector {ias,constant,argmax,cbst}``, ``--no-hpla``,
``--no-regularisation``, ``--no-consistency``; ``--ablation`` runs the whole table (CT, +IAS,
+HPLA, +regularisation, +consistency) from one shared warm-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _collapse_guard import GUARDS, guard_round
from _model_selection import SELECT_CHOICES, rounds_since_pick, select_after_round
from _pipeline_utils import (
    Amp,
    Config,
    IterationBatches,
    MetricsLog,
    StageCost,
    StageRun,
    barrier,
    build_data,
    build_model,
    check_run_config,
    class_names,
    config_dict,
    epoch_of,
    evaluate,
    init_distributed,
    load_weights,
    loader,
    make_optimizer,
    micro_batches,
    parse_args,
    progress,
    resume_finished_stage,
    seed_everything,
    seed_table,
    source_batch,
    wrap_ddp,
    write_report,
)
from torch import nn
from torch.utils.data import Dataset

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json, atomic_torch_save
from uda_selftrain.datasets import (
    PseudoLabelDataset,
)
from uda_selftrain.distributed import (
    all_reduce_sum,
    is_main_process,
    rank,
    world_size,
)
from uda_selftrain.mixing import ClassStatistics, DonorSampler, paste_views
from uda_selftrain.models import (
    FCDiscriminator,
    load_backbone,
    load_checkpoint,
)
from uda_selftrain.teacher import unwrap_model

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


def batch_stream(dataset: Any, cfg: Config, total: int, start: int, seed: int) -> Iterator[Any]:
    """A stage's deterministic, resumable batches from iteration ``start`` on."""
    batches = IterationBatches(len(dataset), cfg.batch_size, total, start, seed)
    return iter(loader(dataset, batches, cfg))


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


def generate_pseudo_labels(
    cfg: Config,
    round_dir: Path,
    model: nn.Module,
    target: Any,
    device: torch.device,
    log: MetricsLog,
) -> ClassStatistics:
    """Pseudo-label every target image with the round's selector (the library call), and log."""
    done = (round_dir / "stats" / "done.json").is_file()
    steps = math.ceil(len(target) / (world_size() * cfg.pl_batch))
    bar = progress(total=steps, desc=f"pseudo-labels {round_dir.name}", quiet=cfg.quiet or done)

    def report(step: int, total: int) -> None:
        bar.update(step - bar.n)

    cost = StageCost(log, f"{round_dir.name}/pseudo_labels", device, iterations=steps)
    with cost if not done else contextlib.nullcontext():
        stats = ust.generate_pseudo_labels(
            unwrap_model(model),
            target,
            build_selector(cfg, device),
            round_dir,
            batch_size=cfg.pl_batch,
            device=device,
            progress=report,
        )
    bar.close()
    if not done and is_main_process():
        summary = json.loads((round_dir / "stats" / "done.json").read_text())
        log(
            stage=round_dir.name,
            event="pseudo_labels",
            selected_fraction=summary["selected_fraction"],
            thresholds=stats.thresholds.tolist(),
            class_values=stats.class_values.tolist(),
            class_pixels=stats.class_pixels.tolist(),
        )
    return stats


# ---------------------------------------------------------------------------------------------
# Stage 3b: self-training
# ---------------------------------------------------------------------------------------------


def hiast_step(
    cfg: Config,
    batch: dict[str, Any],
    net: nn.Module,
    teacher: ust.EMATeacher,
    loss_fn: ust.HIASTLoss,
    views: ust.WeakStrongViews,
    hard_mask: torch.Tensor | None,
    gen: torch.Generator,
    device: torch.device,
    ramp: float = 1.0,
) -> tuple[ust.HIASTLossOutput, torch.Tensor | None]:
    """The paper's training step; returns the loss terms and the pasted class per pixel.

    ``ramp`` scales the regularisation and consistency weights (a guard; 1 = the paper).
    """
    images, labels = batch["image"].to(device), batch["label"].to(device)
    if hard_mask is not None:  # hard-aware copy-paste of the donors' hard classes, then the views
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
        view_labels, pasted = v.labels, v.pasted
    else:
        v = views(images, [labels], generator=gen)
        (view_labels,), pasted = v.maps, None
    logits = net(v.strong)  # the student sees the strong view
    teacher_logits = None
    if cfg.consistency:
        with torch.no_grad():
            teacher_logits = teacher(v.weak).float()  # the teacher the weak one
    if ramp == 1.0:
        out = loss_fn(logits.float(), view_labels.long(), teacher_logits)
    else:
        reg = loss_fn.regularisation
        out = ust.hiast_loss(
            logits.float(),
            view_labels.long(),
            teacher_logits,
            ce_weight=loss_fn.ce_weight,
            smoothing_weight=ramp * reg.smoothing_weight,
            entropy_weight=ramp * reg.entropy_weight,
            consistency_weight=ramp * loss_fn.consistency_weight,
            consistency_region=loss_fn.consistency.region,
        )
    return out, pasted


def rampup(it: int, length: int) -> float:
    """Sigmoid ramp-up ``exp(−5 (1 − t)²)``, ``t = it / length`` (Laine & Aila); 1 when off."""
    if length <= 0 or it >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - it / length) ** 2)


def round_components(
    cfg: Config, round_dir: Path, k: int, target: Any, stats: ClassStatistics, log: MetricsLog
) -> tuple[PseudoLabelDataset, torch.Tensor | None, ust.WeakStrongViews, ust.HIASTLoss]:
    """The round's data (with HPLA donors), hard classes, views and loss, as configured."""
    sampler, hard_mask = None, None
    if cfg.hpla:
        sampler = DonorSampler(
            stats,
            num_hard=cfg.num_hard,
            absent_classes=cfg.absent_classes,
            max_donors=cfg.max_donors,
        )
        hard_mask = sampler.hard_mask
        log(
            stage=round_dir.name,
            event="hard_classes",
            hard=sampler.hard_classes.tolist(),
            probabilities=sampler.probabilities[sampler.hard_classes].tolist(),
        )
    data = PseudoLabelDataset(
        target, round_dir / "pseudo", sampler=sampler, donor_names=stats.names, seed=cfg.seed + k
    )
    loss_fn = ust.HIASTLoss(
        smoothing_weight=cfg.smoothing_weight if cfg.regularisation else 0.0,
        entropy_weight=cfg.entropy_weight if cfg.regularisation else 0.0,
        consistency_weight=cfg.consistency_weight if cfg.consistency else 0.0,
    )
    return data, hard_mask, ust.WeakStrongViews(cfg.crop_size), loss_fn


def round_run(
    cfg: Config,
    round_dir: Path,
    k: int,
    student: nn.Module,
    teacher: ust.EMATeacher,
    log: MetricsLog,
    device: torch.device,
) -> tuple[StageRun, Any, Any, Amp, torch.Generator, torch.Tensor]:
    """The round's optimiser, schedule, AMP, generator and pasted-pixel counts, under a resumable
    StageRun (restored from the round's checkpoint when there is one)."""
    total = cfg.round_iters
    opt, sched = make_optimizer(student, cfg.round_lrs[min(k, len(cfg.round_lrs)) - 1], cfg, total)
    amp = Amp(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 100 * k + rank())
    # Pixels pasted per class this round (on the device, read once at the end): diagnostics.
    pasted = torch.zeros(cfg.num_classes, dtype=torch.int64, device=device)
    run = StageRun(
        round_dir,
        round_dir.name,
        total,
        cfg,
        log,
        device,
        gen,
        tensors={"pasted_pixels": pasted},
        model=student,
        teacher=teacher,
        optimizer=opt,
        scheduler=sched,
        scaler=amp.scaler,
    )
    return run, opt, sched, amp, gen, pasted


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
    """One round of self-training on the round's pseudo-labels; returns the EMA teacher."""
    teacher = ust.EMATeacher(student, momentum=cfg.ema_momentum)  # re-initialised from the student
    if (round_dir / "student.pt").is_file():
        student.load_state_dict(load_weights(round_dir / "student.pt", device))
        teacher.load_state_dict(load_weights(round_dir / "teacher.pt", device))
        resume_finished_stage(round_dir)
        return teacher
    total = cfg.round_iters
    data, hard_mask, views, loss_fn = round_components(cfg, round_dir, k, target, stats, log)
    hard_mask = None if hard_mask is None else hard_mask.to(device)
    net = wrap_ddp(student, device)
    run, opt, sched, amp, gen, pasted = round_run(cfg, round_dir, k, student, teacher, log, device)
    # Data iterators before run.iterations(): making them draws from the global RNG.
    if cfg.source_weight > 0:  # guard: keep source supervision during self-training
        src = batch_stream(source, cfg, total, run.start, cfg.seed + 20 * k)
    data.set_epoch(epoch_of(run.start, cfg.batch_size, len(data)))
    batches = batch_stream(data, cfg, total, run.start, cfg.seed + 10 * k)
    net.train()
    a = cfg.accumulate
    for it in run.iterations():
        data.set_epoch(epoch_of(it, cfg.batch_size, len(data)))
        opt.zero_grad(set_to_none=True)
        sources = micro_batches(next(src), a) if cfg.source_weight > 0 else []
        for part, batch in enumerate(micro_batches(next(batches), a)):
            ramp = rampup(it, cfg.rampup_iters)
            with amp.autocast():
                step = (cfg, batch, net, teacher, loss_fn, views, hard_mask, gen, device, ramp)
                out, pasted_map = hiast_step(*step)
                loss = out.total
                if sources:  # guard: keep source supervision
                    loss = loss + cfg.source_weight * source_ce(net, sources[part], cfg, gen)
            amp.backward(loss / a)
            if pasted_map is not None:
                pasted += ust.class_counts(pasted_map, cfg.num_classes)
        amp.step(opt)
        sched.step()
        teacher.update(student)
        terms = out._asdict()
        run.step_done(it, sched.get_last_lr()[0], loss=terms.pop("total"), **terms)
    run.finish(
        {
            "pasted_pixels.json": all_reduce_sum(pasted).tolist(),
            "teacher.pt": teacher.state_dict(),
            "student.pt": student.state_dict(),
        }
    )
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
    with StageCost(log, f"{name}/eval", device, iterations=len(val)):
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
    cfg: Config,
    device: torch.device,
    *,
    shared_warmup: Path | None = None,
    max_rounds: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The stages of one run; ``max_rounds`` stops earlier without changing the run's
    configuration (the ablation's shared stages), and then writes no final model or report."""
    check_options(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_config(run_dir, config_dict(cfg), config_dict(Config()))
    log = MetricsLog(run_dir / "metrics.jsonl")
    log(event="start", resumed=log.resumed)
    seed_everything(cfg.seed)
    source, target, val, _ = build_data(cfg)
    model = build_model(cfg).to(device)
    warm_path = shared_warmup or (Path(cfg.init_warmup) if cfg.init_warmup else None)
    results = start_model(cfg, run_dir, model, warm_path, source, target, val, device, log)
    label_model: nn.Module = model
    monitor = ust.CollapseMonitor(source_prior(cfg, run_dir, source), class_names=class_names(cfg))
    selection: dict[str, Any] = {}
    rounds = cfg.rounds if max_rounds is None else min(max_rounds, cfg.rounds)
    for k in range(1, rounds + 1):
        round_dir = run_dir / f"round{k}"
        round_dir.mkdir(exist_ok=True)
        stats = generate_pseudo_labels(cfg, round_dir, label_model, target, device, log)
        vanishing = diagnose_round(cfg, run_dir, k, stats, monitor, log)
        if cfg.collapse_guard != "off":
            act_on_collapse(cfg, run_dir, k, vanishing, model, target, device, log)
        teacher = self_train(cfg, round_dir, k, model, target, source, stats, device, log)
        results[f"round{k}"] = stage_eval(
            cfg, run_dir, f"round{k}", teacher.module, val, device, log
        )
        label_model = teacher.module  # the next round's labels come from this round's teacher
        if cfg.select != "last" or cfg.patience:
            selection = select_round(cfg, run_dir, k, warm_path, target, device, log)
            if stop_early(cfg, k, selection, log):
                break
    final = label_model
    if selection and cfg.select != "last":
        final, results["selected"] = selected_model(
            cfg, run_dir, selection, results, val, device, log
        )
    if is_main_process() and rounds == cfg.rounds:
        atomic_torch_save(run_dir / "final.pt", final.state_dict())
        write_report(run_dir, results, cfg)
    return results


def check_options(cfg: Config) -> None:
    """The selection and guard options, checked before anything runs."""
    if cfg.select not in SELECT_CHOICES:
        raise SystemExit(f"--select must be one of {', '.join(SELECT_CHOICES)}, got {cfg.select!r}")
    if cfg.collapse_guard not in GUARDS:
        raise SystemExit(f"--collapse-guard must be one of {', '.join(GUARDS)}")
    if cfg.patience and cfg.select == "last":
        raise SystemExit("--patience needs a validator to judge the rounds: pass --select too")


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


def stop_early(cfg: Config, k: int, selection: dict[str, Any], log: MetricsLog) -> bool:
    """``--patience``: stop when the picked model is that many rounds old."""
    if not cfg.patience or rounds_since_pick(selection) < cfg.patience:
        return False
    print(
        f"stopping after round {k}: {selection['picked']} is still the best "
        f"by {cfg.select} ({cfg.patience} round(s) of patience)",
        file=sys.stderr,
    )
    log(stage=f"round{k}", event="early_stop", picked=selection["picked"])
    return True


def select_round(
    cfg: Config,
    run_dir: Path,
    k: int,
    start: Path | None,
    target: Any,
    device: torch.device,
    log: MetricsLog,
) -> dict[str, Any]:
    """Score every model of the run so far on unlabelled target images; pick one; log it."""
    with StageCost(log, f"round{k}/selection", device, iterations=1):
        selection = select_after_round(
            run_dir,
            k,
            start,
            target,
            lambda: build_model(cfg),
            cfg.num_classes,
            validator=cfg.select,
            num_images=cfg.select_images,
            device=device,
        )
    if is_main_process():
        log(
            stage=f"round{k}",
            event="selection",
            validator=cfg.select,
            picked=selection["picked"],
            scores={r["name"]: r["scores"] for r in selection["candidates"]},
        )
        if cfg.select != "last":
            print(f"round {k}: {cfg.select} picks {selection['picked']}", file=sys.stderr)
    return selection


def selected_model(
    cfg: Config,
    run_dir: Path,
    selection: dict[str, Any],
    results: dict[str, dict[str, Any]],
    val: Any,
    device: torch.device,
    log: MetricsLog,
) -> tuple[nn.Module, dict[str, Any]]:
    """The picked model, loaded, and its scores (read from the run's results where it has them)."""
    picked = selection["picked"]
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg).to(device)
    load_checkpoint(model, selection["picked_path"])
    stage = picked.removesuffix("/teacher")  # a round's teacher is that round's evaluated model
    scores = results.get(stage) or stage_eval(cfg, run_dir, picked, model, val, device, log)
    return model, {**scores, "picked": picked}


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
) -> list[int]:
    """Per-class pseudo-label shares against the source prior and the previous round; warns."""
    done = json.loads((run_dir / f"round{k}" / "stats" / "done.json").read_text())
    selected = int(stats.class_pixels.sum())
    total = int(done.get("total_pixels", round(selected / max(done["selected_fraction"], 1e-12))))
    pasted_path = run_dir / f"round{k - 1}" / "pasted_pixels.json"
    pasted = None
    if pasted_path.is_file():
        pasted = torch.tensor(json.loads(pasted_path.read_text()), dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ust.CollapseWarning)
        diag = monitor.update(
            stats.class_pixels,
            total_pixels=total,
            thresholds=stats.thresholds,
            pasted_pixels=pasted,
        )
    for w in caught:  # point at the run's file, not at the library line that noticed it
        path = run_dir / f"round{k}" / "diagnostics.json"
        warnings.warn_explicit(w.message, w.category, str(path), 0)
    if is_main_process():
        record = diag.to_dict()
        atomic_save_json(run_dir / f"round{k}" / "diagnostics.json", record)
        log(stage=f"round{k}", event="diagnostics", **record)
    return list(diag.vanishing)


def act_on_collapse(
    cfg: Config,
    run_dir: Path,
    k: int,
    vanishing: list[int],
    student: nn.Module,
    target: Any,
    device: torch.device,
    log: MetricsLog,
) -> None:
    """The collapse guard: the flagged classes get labels from another source (before training)."""
    record = guard_round(
        cfg.collapse_guard,
        run_dir,
        k,
        vanishing,
        unwrap_model(student),
        target,
        build_selector(cfg, device),
        cfg.num_classes,
        device=device,
    )
    barrier()  # every rank trains on the merged label files
    if record["classes"] and is_main_process():
        names = [class_names(cfg)[c] for c in record["classes"]]
        print(
            f"round {k}: collapse guard '{cfg.collapse_guard}' relabelled {', '.join(names)}",
            file=sys.stderr,
        )
        log(stage=f"round{k}", event="collapse_guard", **record)


def ablation(cfg: Config, device: torch.device) -> dict[str, dict[str, Any]]:
    """CT self-training, then add IAS, HPLA, regularisation, consistency, from one warm-up.

    Returns the scores of the source-only and warm-up models and each variant's final model.
    """
    base = Path(cfg.run_dir)
    # The shared stages run under the run folder's own configuration (rounds included), so that
    # the default run and the ablation share one folder in either order.
    main = run_pipeline(cfg, device, max_rounds=0)
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


def main(argv: list[str] | None = None) -> int:
    cfg, run_ablation, seeds = parse_args(argv, description=__doc__)
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
