"""Evaluation with saved predictions, the results table and plots, mean ± std over seeds."""

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
from uda_selftrain.datasets import CITYSCAPES_CLASSES, OXFORD_CLASSES, colorize
from uda_selftrain.datasets.image_io import write_rgb
from uda_selftrain.distributed import is_main_process, rank, world_size
from uda_selftrain.teacher import unwrap_model

from .config import Config
from .data import class_names
from .progress import progress


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
    a = 100 * np.asarray(values, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1):.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def seed_table(rows: dict[str, list[dict[str, Any]]], names: list[str], seeds: list[int]) -> str:
    """Markdown table: per row (stage or variant), mIoU and per-class IoU as mean ± std."""
    head = f"| (seeds {', '.join(map(str, seeds))}) | mIoU | " + " | ".join(names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    for row, scores in rows.items():
        per_class = [mean_std([s["iou"][c] for s in scores]) for c in range(len(names))]
        lines.append(
            f"| {row} | {mean_std([s['miou'] for s in scores])} | " + " | ".join(per_class) + " |"
        )
    return "\n".join(lines) + "\n"
