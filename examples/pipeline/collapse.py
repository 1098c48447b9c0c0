"""A collapse guard that acts, one class at a time.

When the diagnostics flag a class as vanishing in round ``k``'s pseudo-labels (before any training
on them), the guard gives that class — and only that class — labels from another source, in the
label files the round trains on:

* ``keep``: the pixels round ``k − 1``'s pseudo-labels gave to the class (the previous labeller's
  selection);
* ``student``: the pixels the round ``k − 1`` *student* labels as the class with the same selector,
  instead of the EMA teacher that labelled the round (the teacher lags the student by the EMA).

Other classes' labels are untouched, except where a restored pixel overwrites them. Round 1 has no
previous round and is left alone. The round's statistics files (class values, hard classes, donor
lists) are those of the teacher's selection. What was done is written to ``round<k>/guard.json``;
a rerun after a kill repeats the merge (it is idempotent) and then reads that file.

:func:`diagnose_round` writes each round's diagnostics (shares against the source prior and the
previous round) and returns the classes flagged as vanishing; :func:`act_on_collapse` runs the
guard on them.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.class_statistics import ClassStatistics
from uda_selftrain.datasets.image_io import read_label, write_label
from uda_selftrain.distributed import barrier, is_main_process
from uda_selftrain.teacher import unwrap_model

from .config import Config
from .data import class_names
from .runs import MetricsLog
from .training import build_selector


def merge_class_labels(labels: np.ndarray, other: np.ndarray, classes: list[int]) -> np.ndarray:
    """``labels`` with the pixels ``other`` assigns to ``classes`` set to those classes.

    >>> merge_class_labels(np.array([0, 255, 0, 2]), np.array([1, 1, 255, 1]), [1]).tolist()
    [1, 1, 0, 1]
    """
    take = np.isin(other, classes)
    return np.where(take, other, labels)


def merge_round(
    pseudo_dir: Path, other_dir: Path, classes: list[int], num_classes: int
) -> list[int]:
    """Merge ``classes`` from ``other_dir``'s label files into ``pseudo_dir``'s, file by file.

    Returns the pixels given to each class by the merge (``num_classes`` counts).
    """
    restored = np.zeros(num_classes, dtype=np.int64)
    for path in sorted(pseudo_dir.rglob("*.png")):
        other = read_label(other_dir / path.relative_to(pseudo_dir))
        labels = read_label(path)
        merged = merge_class_labels(labels, other, classes)
        changed = merged != labels
        if changed.any():
            restored += np.bincount(merged[changed].astype(np.int64), minlength=256)[:num_classes]
            write_label(path, merged)
    return restored.tolist()


def guard_round(
    guard: str,
    run_dir: Path,
    k: int,
    vanishing: list[int],
    student: nn.Module,
    target: Any,
    selector: nn.Module,
    num_classes: int,
    *,
    device: torch.device,
) -> dict[str, Any]:
    """Act on round ``k``'s flagged classes as ``guard`` says; returns (and stores) the record."""
    round_dir = run_dir / f"round{k}"
    path = round_dir / "guard.json"
    if path.is_file():
        return json.loads(path.read_text())
    record: dict[str, Any] = {"guard": guard, "round": k, "classes": [], "restored_pixels": []}
    if guard != "off" and k > 1 and vanishing:
        if guard == "keep":
            other = run_dir / f"round{k - 1}" / "pseudo"
        else:  # label the round again with the student, for the flagged classes only
            out = round_dir / "guard_student"
            ust.generate_pseudo_labels(student, target, selector, out, device=device)
            other = out / "pseudo"
        record["classes"] = sorted(vanishing)
        if is_main_process():
            record["restored_pixels"] = merge_round(
                round_dir / "pseudo", other, record["classes"], num_classes
            )
    if is_main_process():
        atomic_save_json(path, record)
    return record


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
