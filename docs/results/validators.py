"""The validator benchmark: every label-free validator against the true target mIoU, per regime.

    python -m docs.results.validators \\
        --regime default runs/synthetic runs/synthetic_ct \\
        --regime things runs/things/hiast runs/things/ct \\
        --regime weak runs/weak/hiast runs/weak/ct \\
        --regime large runs/large/hiast \\
        --out docs/results/validators.md

Each regime names the ``--seeds`` folder of an ``examples/hiast_full.py`` run (``seed<S>/`` inside)
and, optionally, the same regime's constant-threshold (CT) run for the comparison. For every seed,
the candidates are every model the run produced, as the pipeline's ``--select`` sees them after the
last round: the source-only model and the warm-up when the run trained them (otherwise the
checkpoint it started from), and each round's EMA teacher and student. A regime may also name a
variant folder of ``examples/online_selftraining.py --checkpoint-every N``: its candidates are the
teacher and student of every kept step, "last round" is the last step's teacher and "round 1" the
first kept step's.
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
from examples.pipeline.config import Config
from examples.pipeline.data import build_data, class_names
from examples.pipeline.selection import image_batches, run_candidates, step_candidates
from examples.pipeline.training import build_model
from scipy.stats import kendalltau

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


def true_scores(model: torch.nn.Module, val: Any, cfg: Config) -> dict[str, Any]:
    """mIoU on the labelled validation split, with the library's evaluation (as the pipeline)."""
    return ust.evaluate_segmentation(
        model, val, cfg.num_classes, protocol=protocol_of(cfg)
    ).to_dict()


def score_seed(seed_dir: Path, images: int) -> dict[str, Any]:
    """Validator scores and true mIoU of every candidate of one seed's run (cached)."""
    cache = seed_dir / "validators.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("images") == images and "classes" in data["candidates"][0]:
            return data
    cfg = run_config(seed_dir)
    _, train, val, _ = build_data(cfg)
    names, models = [], []
    start = cfg.init_warmup or cfg.init_source
    # An online run's step checkpoints, or a round-based run's stages.
    candidates = step_candidates(seed_dir) or run_candidates(
        seed_dir, Path(start) if start else None, cfg.rounds
    )
    for name, path in candidates:
        model = build_model(cfg)
        load_checkpoint(model, path)
        names.append(name)
        models.append(model)
    t0 = time.perf_counter()
    scores = ust.score_candidates(models, image_batches(train, images), cfg.num_classes, seed=0)
    scoring_s = time.perf_counter() - t0
    rows = []
    for name, model, s in zip(names, models, scores, strict=True):
        # The pipeline already evaluated its stages' models the same way: reuse those files.
        stage = name.removesuffix("/teacher")
        done = seed_dir / stage / "eval.json"
        if name != "start" and "student" not in name and done.is_file():
            truth = json.loads(done.read_text())
        else:
            truth = true_scores(model, val, cfg)
        rows.append(
            {
                "name": name,
                "miou": truth["miou"],
                "iou": truth["iou"],
                "classes": truth["classes"],
                "scores": s,
            }
        )
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
    elif policy in ust.COMBINED:
        values = -np.array(ust.mean_ranks([r["scores"] for r in rows]))
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


def msd(values: list[float], digits: int = 1) -> str:
    """Signed mean ± std of paired differences."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return f"{a.mean():+.{digits}f}"
    return f"{a.mean():+.{digits}f} ± {a.std(ddof=1):.{digits}f}"


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
    per_seed: dict[int, list[dict[str, Any]]],
    ct: Path | list[float] | None,
    seeds: list[int],
    images: int,
    default: str,
) -> tuple[str, dict[str, dict[str, list[float]]]]:
    """A regime's table, candidates and goal lines from its seeds' scored candidates."""
    policies = [*ust.VALIDATORS, *ust.COMBINED, *BASELINES]
    table = {p: {k: [] for k in ("tau", "regret", "within1", "worst", "picked")} for p in policies}
    for s in seeds:
        for p in policies:
            for k, v in run_measures(per_seed[s], p).items():
                table[p][k].append(v)
    lines = [
        f"### {name} (`{run_dir}`, seeds {', '.join(map(str, seeds))}, "
        f"{len(per_seed[seeds[0]])} candidates per run, {images} target images scored)",
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
    lines += [
        "",
        goal_lines(per_seed, seeds, default, ct),
        "",
        alarm_lines(run_dir, per_seed, seeds),
    ]
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
        if isinstance(ct, Path):
            ct_miou.append(last_round_miou(ct, s))
        # An online run trains from scratch: it has no self-training start to compare with.
        first = next((i for i, r in enumerate(rows) if r["name"] in ("warmup", "start")), None)
        if first is None:
            continue
        start.append(miou[first])
        # Classes the self-training start had at >= 10 IoU and the pick has at 0.
        had = np.array(rows[first]["iou"]) >= 0.10
        lost.append(int((had & (np.array(rows[pick(rows, default)]["iou"]) == 0)).sum()))

    def diff(a: list[float], b: list[float]) -> str:
        d = [x - y for x, y in zip(a, b, strict=True)]
        return ", ".join(f"{v:+.1f}" for v in d) + f"; {msd(d)}"

    lines = [
        f"Automatic selection by `{default}` in this regime (true mIoU, paired by seed):",
        "",
        "| | mIoU | auto − it, per seed; mean ± std |",
        "|---|---|---|",
        f"| auto-selected | {ms(auto)} | |",
        f"| last round | {ms(last)} | {diff(auto, last)} |",
        f"| best candidate | {ms(best)} | {diff(auto, best)} |",
    ]
    if start:
        lines.append(f"| self-training start | {ms(start)} | {diff(auto, start)} |")
    if ct_miou:
        where = f"`{ct}`" if isinstance(ct, Path) else "the documented per-seed values"
        lines.append(f"| CT, last round ({where}) | {ms(ct_miou)} | {diff(auto, ct_miou)} |")
    if lost:
        lines.append("")
        lines.append(
            "Classes the self-training start had at ≥ 10 IoU that the pick has at 0, per seed: "
            + ", ".join(str(n) for n in lost)
        )
    return "\n".join(lines)


def alarm_lines(run_dir: Path, per_seed: dict[int, list[dict[str, Any]]], seeds: list[int]) -> str:
    """The collapse monitor's flags from round 2 on (where a guard acts), against what the class
    then did in this run (without a guard): fell, held or rose (a false alarm), or was already 0."""
    fell = held = zero = 0
    if not any(any((run_dir / f"seed{s}").glob("round*/diagnostics.json")) for s in seeds):
        return "The run keeps no pseudo-label diagnostics (an online run): no flags to count."
    for s in seeds:
        iou = {r["name"]: r["iou"] for r in per_seed[s]}
        for path in sorted((run_dir / f"seed{s}").glob("round*/diagnostics.json")):
            k = int(path.parent.name[len("round") :])
            if k < 2 or f"round{k}/teacher" not in iou:
                continue
            for c in json.loads(path.read_text())["vanishing"]:
                before, after = iou[f"round{k - 1}/teacher"][c], iou[f"round{k}/teacher"][c]
                if before == 0 and after == 0:
                    zero += 1
                elif after >= before:
                    held += 1
                else:
                    fell += 1
    total = fell + held + zero
    if total == 0:
        return "The collapse monitor flagged no class from round 2 on (a guard would not act)."
    return (
        f"Collapse flags from round 2 on (where a guard acts), over {len(seeds)} seeds: {total}; "
        f"the class's IoU then fell in {fell}, held or rose in {held} (false alarms), and was "
        f"already 0 before and after in {zero}."
    )


def paired_lines(
    base: str,
    variant: str,
    runs: dict[str, dict[int, list[dict[str, Any]]]],
    seeds: list[int],
    default: str,
    names: list[str],
) -> str:
    """A variant against its base regime, paired by seed: last round and auto pick, per class."""
    lines = [
        f"### {variant} − {base} (paired by seed)",
        "",
        "| model | " + base + " | " + variant + " | difference per seed; mean ± std |",
        "|---|---|---|---|",
    ]
    per_class = {}
    for policy in ("last round", default):
        a = [runs[base][s][pick(runs[base][s], policy)] for s in seeds]
        b = [runs[variant][s][pick(runs[variant][s], policy)] for s in seeds]
        ma, mb = [100 * r["miou"] for r in a], [100 * r["miou"] for r in b]
        d = [y - x for x, y in zip(ma, mb, strict=True)]
        lines.append(
            f"| {policy} | {ms(ma)} | {ms(mb)} | "
            + ", ".join(f"{v:+.1f}" for v in d)
            + f"; {msd(d)} |"
        )
        per_class[policy] = (a, b)
    a, b = per_class["last round"]
    lines += ["", "Last round, per class (IoU %):", ""]
    lines.append("| run | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for label, rows in ((base, a), (variant, b)):
        cells = [ms([100 * r["iou"][c] for r in rows]) for c in range(len(names))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Validators whose score of a model does not depend on the other candidates (every candidate is
#: scored with the same seeds): ``--patience`` is simulated exactly from the finished run's scores.
SET_FREE = [v for v in ust.VALIDATORS if v != "ensemble_agreement"]


def round_of(name: str) -> int:
    """The round (or an online run's step) that made a candidate (0: the self-training start)."""
    head = name.split("/")[0]
    for prefix in ("round", "step"):
        if head.startswith(prefix):
            return int(head.removeprefix(prefix))
    return 0


def with_patience(rows: list[dict[str, Any]], validator: str, patience: int) -> tuple[int, int]:
    """(pick, rounds or steps trained) of ``--select validator --patience N`` on one run: after
    each round (kept step) the pick is among the models made so far, and training stops once the
    pick is N rounds (kept steps) old."""
    stages = sorted({round_of(r["name"]) for r in rows} - {0})
    for j, k in enumerate(stages):
        seen = [i for i, r in enumerate(rows) if round_of(r["name"]) <= k]
        best = seen[ust.select_candidate([rows[i]["scores"] for i in seen], validator)]
        made = round_of(rows[best]["name"])
        if j - (stages.index(made) if made in stages else -1) >= patience:
            return best, k
    return best, stages[-1]


def patience_lines(runs: dict[str, dict[int, list[dict[str, Any]]]], seeds: list[int]) -> str:
    """``--patience 1`` against no patience, per regime and validator (true mIoU of the pick)."""
    lines = [
        "### `--patience 1`, simulated from the finished runs",
        "",
        "After each round (an online run: each kept step) the pick is among the models made so "
        "far, and training stops once the pick is a round (a kept step) old. Exact for the validators whose score does not depend on the other "
        "candidates (not ensemble agreement, not mean_rank). True mIoU of the result; rounds "
        "trained; difference to the same validator without patience, per seed.",
        "",
        "| regime | validator | no patience | `--patience 1` | rounds (steps) trained | difference |",
        "|---|---|---|---|---|---|",
    ]
    for regime, per_seed in runs.items():
        for validator in SET_FREE:
            full, early, rounds = [], [], []
            for s in seeds:
                rows = per_seed[s]
                full.append(100 * rows[pick(rows, validator)]["miou"])
                i, k = with_patience(rows, validator, 1)
                early.append(100 * rows[i]["miou"])
                rounds.append(k)
            diff = [b - a for a, b in zip(full, early, strict=True)]
            lines.append(
                f"| {regime} | {validator} | {ms(full)} | {ms(early)} | "
                f"{', '.join(map(str, rounds))} | {msd(diff)} |"
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


def compact_tables(tables: dict[str, dict[str, dict[str, list[float]]]], regimes: list[str]) -> str:
    """Two tables over the named regimes: regret (share within 1.0, share worst), and τ."""
    policies = list(next(iter(tables.values())))
    head = "| policy | " + " | ".join(regimes) + " |"
    rule = "|---|" + "---|" * len(regimes)
    regret = [head, rule]
    tau = [head, rule]
    for p in policies:
        cells = [
            f"{ms(tables[r][p]['regret'])} ({pct(tables[r][p]['within1'])}, "
            f"{pct(tables[r][p]['worst'])})"
            for r in regimes
        ]
        regret.append(f"| {p} | " + " | ".join(cells) + " |")
        if p not in BASELINES:
            tau.append(f"| {p} | " + " | ".join(ms(tables[r][p]["tau"], 2) for r in regimes) + " |")
    return (
        "Regret in mIoU (share of runs within 1.0 of the best, share picking the worst):\n\n"
        + "\n".join(regret)
        + "\n\nKendall's τ between the score and the true mIoU over each run's candidates:\n\n"
        + "\n".join(tau)
    )


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
    parser.add_argument(
        "--paired",
        nargs=2,
        action="append",
        default=[],
        metavar=("BASE", "VARIANT"),
        help="also compare two regimes' runs seed by seed (e.g. a guard against no guard)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=100, help="target training images scored")
    parser.add_argument(
        "--regime-images",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "N"),
        help="another number of scored images for one regime (e.g. a larger image size)",
    )
    parser.add_argument(
        "--default", default="mean_rank", choices=[*sorted(ust.VALIDATORS), *ust.COMBINED]
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--compact", nargs="+", default=None, metavar="NAME", help="regimes of the compact tables"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    sections, tables, runs = [], {}, {}
    ct_values = {v[0]: [float(x) for x in v[1:]] for v in args.ct_values}
    images = {name: int(n) for name, n in args.regime_images}
    for spec in args.regime:
        if len(spec) not in (2, 3):
            parser.error(f"--regime takes NAME RUN [CT_RUN], got {spec}")
        name, run = spec[0], Path(spec[1])
        ct: Path | list[float] | None = Path(spec[2]) if len(spec) == 3 else ct_values.get(name)
        t0 = time.perf_counter()
        n = images.get(name, args.images)
        scored = {s: score_seed(run / f"seed{s}", n) for s in args.seeds}
        runs[name] = {s: d["candidates"] for s, d in scored.items()}
        text, tables[name] = regime_section(name, run, runs[name], ct, args.seeds, n, args.default)
        # The cost of scoring, as measured when each seed was first scored (later runs read it).
        cost = [d["scoring_seconds"] for d in scored.values()]
        sections.append(
            text + f"\n\n(validators on all candidates: {ms(cost, 0)} s per seed when first "
            f"scored; this report {time.perf_counter() - t0:.0f} s)"
        )
        print(sections[-1], file=sys.stderr)
    for base, variant in args.paired:
        cfg = run_config(
            Path(next(sp[1] for sp in args.regime if sp[0] == base)) / f"seed{args.seeds[0]}"
        )
        names = [class_names(cfg)[c] for c in runs[base][args.seeds[0]][0]["classes"]]
        sections.append(paired_lines(base, variant, runs, args.seeds, args.default, names))
    sections.append(patience_lines(runs, args.seeds))
    report = "\n\n".join(
        [
            "## Summary (mean ± std over seeds; τ, regret in mIoU points, shares of runs)",
            *([compact_tables(tables, args.compact)] if args.compact else []),
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
