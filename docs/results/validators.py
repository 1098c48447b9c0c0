"""The validator benchmark: every label-free validator against the true target mIoU, per regime.

    python docs/results/validators.py \\
        --regime default runs/synthetic runs/synthetic_ct \\
        --regime things runs/things/hiast runs/things/ct \\
        --regime weak runs/weak/hiast runs/weak/ct \\
        --regime large runs/large/hiast \\
        --out docs/results/validators.md

Each regime names the ``--seeds`` folder of an ``examples/hiast_full.py`` run (``seed<S>/`` inside)
and, optionally, the same regime's constant-threshold (CT) run for the comparison. For every seed,
the candidates are every model the run produced, as the pipeline's ``--select`` sees them after the
last round: the source-only model and the warm-up when the run trained them (otherwise the
checkpoint it started from), and each round's EMA teacher and student.
Each candidate is scored

* by every validator of :data:`uda_selftrain.VALIDATORS`, on ``--images`` target *training* images
  (evenly spaced, no labels read), all candidates of a run together (the ensemble validator needs
  them all);
* by its true mIoU on the labelled target validation split (the run's protocol), for the report
  only.

Per validator and regime, over the seeds (mean ± sample std): Kendall's τ between the score and the
true mIoU, the regret (best candidate's mIoU − the pick's), the share of runs whose pick is within
1.0 mIoU of the best and the share where it is the worst; "last round" and "round 1" (the teachers)
as baselines. Scores are cached per seed in ``<seed folder>/validators.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from _model_selection import image_batches, run_candidates
from _pipeline_utils import Config, build_data, build_model

import uda_selftrain as ust
from uda_selftrain.atomic import atomic_save_json
from uda_selftrain.metrics import Protocol
from uda_selftrain.models import load_checkpoint

#: The validator the pipeline's automatic selection uses by default (see the docs page).
BASELINES = ("last round", "round 1")


def run_config(seed_dir: Path) -> Config:
    raw = json.loads((seed_dir / "config.json").read_text())
    fields = {f for f in Config.__dataclass_fields__}
    cfg = Config(**{k: v for k, v in raw.items() if k in fields})
    for name in ("crop_size", "round_lrs", "absent_classes", "source_size", "target_size"):
        value = getattr(cfg, name)
        if isinstance(value, list):
            setattr(cfg, name, tuple(value))
    cfg.quiet = True
    return cfg


def protocol_of(cfg: Config) -> Protocol | str:
    if cfg.protocol == "all":
        return Protocol("all", cfg.num_classes, tuple(range(cfg.num_classes)))
    return cfg.protocol


@torch.no_grad()
def true_scores(model: torch.nn.Module, val: Any, cfg: Config, batch: int = 10) -> dict[str, Any]:
    """mIoU on the labelled validation split (logits at the label size, as the pipeline scores)."""
    model.eval()
    cm = ust.ConfusionMatrix(cfg.num_classes)
    for start in range(0, len(val), batch):
        items = [val[i] for i in range(start, min(start + batch, len(val)))]
        images = torch.stack([it["image"] for it in items])
        labels = torch.stack([it["label"] for it in items]).long()
        probs = ust.predict_probabilities(model, images)
        cm.update(probs.argmax(1), labels)
    return cm.scores(protocol_of(cfg))


def score_seed(seed_dir: Path, images: int) -> dict[str, Any]:
    """Validator scores and true mIoU of every candidate of one seed's run (cached)."""
    cache = seed_dir / "validators.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("images") == images:
            return data
    cfg = run_config(seed_dir)
    _, train, val, _ = build_data(cfg)
    names, models = [], []
    start = cfg.init_warmup or cfg.init_source
    for name, path in run_candidates(seed_dir, Path(start) if start else None, cfg.rounds):
        model = build_model(cfg)
        load_checkpoint(model, path)
        names.append(name)
        models.append(model)
    t0 = time.perf_counter()
    scores = ust.score_candidates(models, image_batches(train, images), cfg.num_classes, seed=0)
    scoring_s = time.perf_counter() - t0
    rows = []
    for name, model, s in zip(names, models, scores, strict=True):
        truth = true_scores(model, val, cfg)
        rows.append({"name": name, "miou": truth["miou"], "iou": truth["iou"], "scores": s})
    data = {"images": images, "scoring_seconds": scoring_s, "candidates": rows}
    atomic_save_json(cache, data)
    return data


# ---------------------------------------------------------------------------------------------
# Per-run measures
# ---------------------------------------------------------------------------------------------


def pick(rows: list[dict[str, Any]], policy: str) -> int:
    teachers = [i for i, r in enumerate(rows) if r["name"].endswith("/teacher")]
    if policy == "last round":
        return teachers[-1]
    if policy == "round 1":
        return teachers[0]
    return ust.select_candidate([r["scores"] for r in rows], policy)


def run_measures(rows: list[dict[str, Any]], policy: str) -> dict[str, float]:
    miou = np.array([100 * r["miou"] for r in rows])
    i = pick(rows, policy)
    regret = float(miou.max() - miou[i])
    tau = math.nan
    if policy in ust.VALIDATORS:
        sign = 1.0 if ust.VALIDATORS[policy] else -1.0
        values = np.array([sign * r["scores"][policy] for r in rows])
        tau = float(kendalltau(values, miou).statistic)
    return {
        "tau": tau,
        "regret": regret,
        "within1": float(regret <= 1.0),
        "worst": float(miou[i] == miou.min()),
        "picked": float(miou[i]),
    }


def ms(values: list[float], digits: int = 1) -> str:
    a = np.asarray(values, dtype=float)
    if np.isnan(a).all():
        return "—"
    if len(a) < 2:
        return f"{a.mean():.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def pct(values: list[float]) -> str:
    return f"{100 * np.mean(values):.0f} %"


def last_round_miou(run_dir: Path, seed: int) -> float:
    """The final teacher's mIoU of a seed's run (from the pipeline's own eval.json)."""
    seed_dir = run_dir / f"seed{seed}"
    cfg = run_config(seed_dir)
    return 100 * json.loads((seed_dir / f"round{cfg.rounds}" / "eval.json").read_text())["miou"]


def regime_section(
    name: str,
    run_dir: Path,
    ct: Path | list[float] | None,
    seeds: list[int],
    images: int,
    default: str,
) -> tuple[str, dict[str, dict[str, list[float]]]]:
    per_seed = {s: score_seed(run_dir / f"seed{s}", images)["candidates"] for s in seeds}
    policies = [*ust.VALIDATORS, *BASELINES]
    table = {p: {k: [] for k in ("tau", "regret", "within1", "worst", "picked")} for p in policies}
    for s in seeds:
        for p in policies:
            for k, v in run_measures(per_seed[s], p).items():
                table[p][k].append(v)
    lines = [
        f"### {name} (`{run_dir}`, seeds {', '.join(map(str, seeds))}, "
        f"{len(per_seed[seeds[0]])} candidates per run)",
        "",
        "| policy | Kendall τ | regret (mIoU) | pick within 1.0 of best | pick is the worst |",
        "|---|---|---|---|---|",
    ]
    for p in policies:
        t = table[p]
        label = f"**{p}**" if p == default else p
        lines.append(
            f"| {label} | {ms(t['tau'], 2)} | {ms(t['regret'])} | {pct(t['within1'])} | "
            f"{pct(t['worst'])} |"
        )
    # The candidates' true mIoU, per seed, for reading the picks.
    names = [r["name"] for r in per_seed[seeds[0]]]
    lines += ["", "| candidate | true mIoU | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|---|" + "---|" * len(seeds))
    for j, n in enumerate(names):
        vals = [100 * per_seed[s][j]["miou"] for s in seeds]
        lines.append(f"| {n} | {ms(vals)} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    lines += ["", goal_lines(per_seed, seeds, default, ct)]
    return "\n".join(lines), table


def goal_lines(
    per_seed: dict[int, list[dict[str, Any]]],
    seeds: list[int],
    default: str,
    ct: Path | list[float] | None,
) -> str:
    """The auto-selected model against the last round, the best candidate, the start and CT."""
    auto, last, best, start, lost = [], [], [], [], []
    ct_miou = list(ct) if isinstance(ct, list) else []
    for s in seeds:
        rows = per_seed[s]
        miou = [100 * r["miou"] for r in rows]
        a = miou[pick(rows, default)]
        auto.append(a)
        last.append(miou[pick(rows, "last round")])
        best.append(max(miou))
        first = next(i for i, r in enumerate(rows) if r["name"] in ("warmup", "start"))
        start.append(miou[first])
        if isinstance(ct, Path):
            ct_miou.append(last_round_miou(ct, s))
        # Classes the self-training start had at >= 10 IoU and the pick has at 0.
        had = np.array(rows[first]["iou"]) >= 0.10
        lost.append(int((had & (np.array(rows[pick(rows, default)]["iou"]) == 0)).sum()))

    def diff(a: list[float], b: list[float]) -> str:
        d = [x - y for x, y in zip(a, b, strict=True)]
        return ", ".join(f"{v:+.1f}" for v in d) + f"; {ms(d)}"

    lines = [
        f"Automatic selection by `{default}` in this regime (true mIoU, paired by seed):",
        "",
        "| | mIoU | auto − it, per seed; mean ± std |",
        "|---|---|---|",
        f"| auto-selected | {ms(auto)} | |",
        f"| last round | {ms(last)} | {diff(auto, last)} |",
        f"| best candidate | {ms(best)} | {diff(auto, best)} |",
        f"| self-training start | {ms(start)} | {diff(auto, start)} |",
    ]
    if ct_miou:
        where = f"`{ct}`" if isinstance(ct, Path) else "the documented per-seed values"
        lines.append(f"| CT, last round ({where}) | {ms(ct_miou)} | {diff(auto, ct_miou)} |")
    lines.append("")
    lines.append(
        "Classes the self-training start had at ≥ 10 IoU that the pick has at 0, per seed: "
        + ", ".join(str(n) for n in lost)
    )
    return "\n".join(lines)


def summary_table(tables: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    regimes = list(tables)
    policies = list(next(iter(tables.values())))
    head = "| policy | " + " | ".join(f"{r}: τ / regret / ≤1.0 / worst" for r in regimes) + " |"
    lines = [head, "|---|" + "---|" * len(regimes)]
    for p in policies:
        cells = []
        for r in regimes:
            t = tables[r][p]
            tau = ms(t["tau"], 2)
            cells.append(f"{tau} / {ms(t['regret'])} / {pct(t['within1'])} / {pct(t['worst'])}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--regime",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME RUN [CT_RUN]",
        help="a regime's name, its --seeds run folder and optionally its CT run folder",
    )
    parser.add_argument(
        "--ct-values",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME MIOU",
        help="a regime's CT final mIoU per seed (in %%), when its CT run folder is not at hand",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=100, help="target training images scored")
    parser.add_argument("--default", default="ensemble_agreement", choices=sorted(ust.VALIDATORS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    sections, tables = [], {}
    ct_values = {v[0]: [float(x) for x in v[1:]] for v in args.ct_values}
    for spec in args.regime:
        if len(spec) not in (2, 3):
            parser.error(f"--regime takes NAME RUN [CT_RUN], got {spec}")
        name, run = spec[0], Path(spec[1])
        ct: Path | list[float] | None = Path(spec[2]) if len(spec) == 3 else ct_values.get(name)
        t0 = time.perf_counter()
        text, tables[name] = regime_section(name, run, ct, args.seeds, args.images, args.default)
        sections.append(text + f"\n\n(scored in {time.perf_counter() - t0:.0f} s)")
        print(sections[-1], file=sys.stderr)
    report = "\n\n".join(
        [
            "## Summary (mean ± std over seeds; τ, regret in mIoU points, shares of runs)",
            summary_table(tables),
            *sections,
            f"Total {time.perf_counter() - start:.0f} s.",
        ]
    )
    if args.out is not None:
        args.out.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
