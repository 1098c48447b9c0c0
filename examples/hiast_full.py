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
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pipeline import RunError
from pipeline.collapse import act_on_collapse, diagnose_round, source_prior
from pipeline.config import Config, check_options, config_dict, parse_args
from pipeline.data import batch_stream, build_data, class_names, epoch_of
from pipeline.experiments import ablation, run_seeds
from pipeline.progress import progress
from pipeline.report import write_report
from pipeline.runs import MetricsLog, check_run_config, load_weights, resume_finished_stage
from pipeline.selection import select_round, selected_model, stop_early
from pipeline.source import source_ce, start_model
from pipeline.stages import StageCost, StageRun, stage_eval
from pipeline.training import (
    Amp,
    build_model,
    build_selector,
    init_distributed,
    make_optimizer,
    micro_batches,
    seed_everything,
    wrap_ddp,
)
from torch import nn
from torch.utils.data import Dataset

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_torch_save
from uda_selftrain.class_statistics import ClassStatistics
from uda_selftrain.datasets import PseudoLabelDataset
from uda_selftrain.distributed import all_reduce_sum, is_main_process, rank, world_size
from uda_selftrain.teacher import unwrap_model

# Stages 1 and 2 (source-only training, the adversarial warm-up) are pipeline.source.start_model.


# ---------------------------------------------------------------------------------------------
# Stage 3a: pseudo-labels
# ---------------------------------------------------------------------------------------------


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
# Stage 3b: self-training. The loop is hiast_minimal.py's hiast_round (the augmenter with dataset
# donors, the strong view to the student and the weak one to the EMA teacher, the HIAST loss)
# plus hooks: resume, logs and checkpoints (StageRun), AMP and micro-batches, the optional guards
# (ramp-up, source CE) and the pasted-pixel counts that the next round's diagnostics read.
# ---------------------------------------------------------------------------------------------


def hiast_step(
    cfg: Config,
    batch: dict[str, Any],
    net: nn.Module,
    teacher: ust.EMATeacher,
    loss_fn: ust.HIASTLoss,
    augmenter: ust.HardAwareAugmenter,
    gen: torch.Generator,
    device: torch.device,
    ramp: float = 1.0,
) -> tuple[ust.HIASTLossOutput, torch.Tensor | None]:
    """The paper's training step; returns the loss terms and the pasted class per pixel.

    ``ramp`` scales the regularisation and consistency weights (a guard; 1 = the paper).
    """
    images, labels = batch["image"].to(device), batch["label"].to(device)
    if cfg.hpla:  # hard-aware copy-paste of the donors' hard classes, then the views
        v = augmenter(
            images,
            labels,
            batch["donor_images"].to(device),
            batch["donor_labels"].to(device),
            batch["donor_valid"].to(device),
            generator=gen,
        )
        view_labels, pasted = v.labels, v.pasted
    else:  # the views alone (the ablation without HPLA)
        w = augmenter.views(images, [labels], generator=gen)
        v, (view_labels,), pasted = w, w.maps, None
    logits = net(v.strong)  # the student sees the strong view
    teacher_logits = None
    if cfg.consistency:
        with torch.no_grad():
            teacher_logits = teacher(v.weak).float()  # the teacher the weak one
    step_loss = loss_fn if ramp == 1.0 else round_loss(cfg, ramp)
    return step_loss(logits.float(), view_labels.long(), teacher_logits), pasted


def rampup(it: int, length: int) -> float:
    """Sigmoid ramp-up ``exp(−5 (1 − t)²)``, ``t = it / length`` (Laine & Aila); 1 when off."""
    if length <= 0 or it >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - it / length) ** 2)


def round_components(
    cfg: Config, round_dir: Path, k: int, target: Any, stats: ClassStatistics, log: MetricsLog
) -> tuple[PseudoLabelDataset, ust.HardAwareAugmenter, ust.HIASTLoss]:
    """The round's data (with HPLA donors), augmenter (hard classes + views) and loss."""
    augmenter = ust.HardAwareAugmenter(
        cfg.num_classes,
        cfg.crop_size,
        num_hard=cfg.num_hard,
        absent_classes=cfg.absent_classes,
        max_donors=cfg.max_donors,
    )
    sampler = None
    if cfg.hpla:
        augmenter.update(stats)  # class values → the hard classes and their probabilities
        sampler = augmenter.donor_sampler(stats)
        log(
            stage=round_dir.name,
            event="hard_classes",
            hard=sampler.hard_classes.tolist(),
            probabilities=sampler.probabilities[sampler.hard_classes].tolist(),
        )
    data = PseudoLabelDataset(
        target, round_dir / "pseudo", sampler=sampler, donor_names=stats.names, seed=cfg.seed + k
    )
    return data, augmenter, round_loss(cfg)


def round_loss(cfg: Config, ramp: float = 1.0) -> ust.HIASTLoss:
    """The HIAST loss as configured; ``ramp`` scales the regularisation and consistency terms."""
    return ust.HIASTLoss(
        smoothing_weight=ramp * cfg.smoothing_weight if cfg.regularisation else 0.0,
        entropy_weight=ramp * cfg.entropy_weight if cfg.regularisation else 0.0,
        consistency_weight=ramp * cfg.consistency_weight if cfg.consistency else 0.0,
    )


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
    source: Dataset,
    target: Any,
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
    data, augmenter, loss_fn = round_components(cfg, round_dir, k, target, stats, log)
    augmenter.to(device)
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
                step = (cfg, batch, net, teacher, loss_fn, augmenter, gen, device, ramp)
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
        teacher = self_train(cfg, round_dir, k, model, source, target, stats, device, log)
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


def main(argv: list[str] | None = None) -> int:
    cfg, run_ablation, seeds = parse_args(argv, description=__doc__)
    start = time.perf_counter()
    try:
        device = init_distributed(cfg.device)
        if seeds:
            run_seeds(cfg, device, seeds, run_ablation, run_pipeline)
        elif run_ablation:
            ablation(cfg, device, run_pipeline)
        else:
            run_pipeline(cfg, device)
    except RunError as err:
        raise SystemExit(f"error: {err}") from None
    if is_main_process():
        print(
            f"done in {time.perf_counter() - start:.0f}s; outputs in {cfg.run_dir}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
