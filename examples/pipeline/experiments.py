"""Several runs of the pipeline: the ablation table from one warm-up, and seeds with mean ± std."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.distributed import is_main_process

from .config import Config
from .data import class_names
from .report import seed_table

#: ``run_pipeline(cfg, device, *, shared_warmup=None, max_rounds=None)`` of the example.
Pipeline = Callable[..., dict[str, dict[str, Any]]]


def ablation(
    cfg: Config, device: torch.device, run_pipeline: Pipeline
) -> dict[str, dict[str, Any]]:
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


def run_seeds(
    cfg: Config,
    device: torch.device,
    seeds: list[int],
    run_ablation: bool,
    run_pipeline: Pipeline,
) -> None:
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
        results = (
            ablation(scfg, device, run_pipeline) if run_ablation else run_pipeline(scfg, device)
        )
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
