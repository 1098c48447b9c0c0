"""Automatic model selection for the pipeline, without target labels.

After every round, every model the run has produced so far is scored by the library's label-free
validators (:func:`uda_selftrain.score_candidates`) on evenly spaced target *training* images; the
scores go to ``round<k>/selection.json``. With ``--select VALIDATOR`` the best-scoring model is the
run's result; ``--patience N`` stops self-training when that model is ``N`` rounds old. The true
mIoU on the labelled validation split is logged by the pipeline for research and never read here.

:func:`select_round` runs it inside the pipeline and logs the pick; :func:`stop_early` applies
``--patience``; :func:`selected_model` loads the pick as the run's result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.distributed import is_main_process
from uda_selftrain.models import load_checkpoint

from .config import Config
from .runs import MetricsLog
from .stages import StageCost, stage_eval
from .training import build_model


def run_candidates(run_dir: Path, start: Path | None, rounds: int) -> list[tuple[str, Path]]:
    """Every model a run folder holds, in the order the run made them.

    The source-only model and the warm-up when the run trained them (otherwise ``start``, the
    checkpoint self-training started from), then each finished round's teacher and student.
    """
    out: list[tuple[str, Path]] = [
        (stage, run_dir / stage / "model.pt")
        for stage in ("source_only", "warmup")
        if (run_dir / stage / "model.pt").is_file()
    ]
    if not any(name == "warmup" for name, _ in out) and start is not None:
        out.append(("start", start))
    for k in range(1, rounds + 1):
        for role in ("teacher", "student"):
            path = run_dir / f"round{k}" / f"{role}.pt"
            if path.is_file():
                out.append((f"round{k}/{role}", path))
    return out


def step_candidates(run_dir: Path) -> list[tuple[str, Path]]:
    """The checkpoints an online run keeps (``online_selftraining.py --checkpoint-every``), in
    step order: each ``step<k>/`` folder's teacher, then its student."""
    steps = sorted(
        (int(d.name.removeprefix("step")), d)
        for d in run_dir.glob("step*")
        if d.is_dir() and d.name.removeprefix("step").isdigit()
    )
    return [
        (f"step{k}/{role}", d / f"{role}.pt")
        for k, d in steps
        for role in ("teacher", "student")
        if (d / f"{role}.pt").is_file()
    ]


def evenly_spaced(length: int, num: int) -> np.ndarray:
    """``min(num, length)`` indices spread evenly over ``range(length)``, first and last included."""
    return np.linspace(0, length - 1, min(num, length)).round().astype(int)


def image_batches(target: Any, num_images: int, batch_size: int = 10) -> list[torch.Tensor]:
    """``num_images`` evenly spaced target training images (uint8), in batches; no labels."""
    idx = evenly_spaced(len(target), num_images)
    return [
        torch.stack([target[int(i)]["image"] for i in idx[s : s + batch_size]])
        for s in range(0, len(idx), batch_size)
    ]


def score_run(
    run_dir: Path,
    start: Path | None,
    rounds: int,
    target: Any,
    build_model: Any,
    num_classes: int,
    *,
    num_images: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Validator scores of every candidate of the run: ``[{"name", "path", "scores"}, …]``."""
    names, models = [], []
    # Building a model draws its initial weights from the global RNG: keep the run's stream intact.
    with torch.random.fork_rng(devices=[]):
        for name, path in run_candidates(run_dir, start, rounds):
            model = build_model()
            load_checkpoint(model, path)
            names.append((name, path))
            models.append(model.to(device))
    batches = [b.to(device) for b in image_batches(target, num_images)]
    scores = ust.score_candidates(models, batches, num_classes, seed=0)
    return [
        {"name": n, "path": str(p), "scores": s} for (n, p), s in zip(names, scores, strict=True)
    ]


def select_after_round(
    run_dir: Path,
    k: int,
    start: Path | None,
    target: Any,
    build_model: Any,
    num_classes: int,
    *,
    validator: str,
    num_images: int,
    device: torch.device,
) -> dict[str, Any]:
    """Score every candidate after round ``k`` and pick one; cached in ``round<k>/selection.json``.

    ``validator="last"`` picks the round's teacher (the scores are still written).
    """
    path = run_dir / f"round{k}" / "selection.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("num_images") == num_images:
            return _pick(record, validator, k)
    rows = score_run(
        run_dir, start, k, target, build_model, num_classes, num_images=num_images, device=device
    )
    record = {"round": k, "num_images": num_images, "candidates": rows}
    if is_main_process():
        atomic_save_json(path, record)
    return _pick(record, validator, k)


def _pick(record: dict[str, Any], validator: str, k: int) -> dict[str, Any]:
    rows = record["candidates"]
    names = [r["name"] for r in rows]
    if validator == "last":
        i = names.index(f"round{k}/teacher")
    else:
        i = ust.select_candidate([r["scores"] for r in rows], validator)
    return {**record, "validator": validator, "picked": names[i], "picked_path": rows[i]["path"]}


def rounds_since_pick(selection: dict[str, Any]) -> int:
    """How many rounds ago the picked model was made (0: this round's)."""
    picked, k = selection["picked"], selection["round"]
    if picked.startswith("round"):
        return k - int(picked.split("/")[0][len("round") :])
    return k


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
