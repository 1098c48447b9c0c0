"""Tables of the seeded runs in docs/results/, from the run folders of examples/hiast_full.py.

    python -m docs.results.collect --runs runs --out docs/results/tables.md

Reads every ``<run>/results_seeds.json`` (``--seeds``) and ``<run>/ablation_seeds.json``
(``--ablation --seeds``), and for the pseudo-labels of every round it compares the labels written
(``round<k>/pseudo``) with the target training labels: the share of the pixels each class takes
and its precision. Prints nothing it did not read; mean ± std is over seeds (sample std).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from uda_selftrain.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_TO_THINGS,
    THINGS_CLASSES,
    Cityscapes,
    lookup_table,
)
from uda_selftrain.datasets.image_io import read_label
from uda_selftrain.datasets.pseudo import pseudo_label_path


def ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    a = scale * np.asarray(values, dtype=float)
    if len(a) < 2:
        return f"{a.mean():.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def seeded(path: Path) -> tuple[list[int], dict[str, list[dict]]]:
    data = json.loads(path.read_text())
    return data["seeds"], data["results"]


def miou_table(rows: dict[str, dict[str, list[dict]]], columns: list[str]) -> str:
    """rows: label → {column: [scores per seed]}; mIoU mean ± std per column."""
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, cols in rows.items():
        cells = [ms([s["miou"] for s in cols[c]]) if c in cols else "" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def class_table(rows: dict[str, list[dict]], names: list[str]) -> str:
    lines = ["| variant | mIoU | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for label, scores in rows.items():
        cells = [ms([s["iou"][c] for s in scores]) for c in range(len(names))]
        lines.append(f"| {label} | {ms([s['miou'] for s in scores])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(finals: dict[str, list[dict]]) -> str:
    """Each variant's final mIoU minus the source-only model's, CT's and HIAST's, seed by seed."""
    refs = [r for r in ("source-only", "CT", "HIAST") if r in finals]
    lines = [
        "| variant | " + " | ".join(f"− {r}: per seed; mean ± std" for r in refs) + " |",
        "|---|" + "---|" * len(refs),
    ]
    for label, scores in finals.items():
        cells = []
        for r in refs:
            if r == label:
                cells.append("")
                continue
            d = [100 * (a["miou"] - b["miou"]) for a, b in zip(scores, finals[r], strict=True)]
            cells.append(", ".join(f"{v:+.1f}" for v in d) + f"; {ms(d, 1.0)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_label_quality(
    round_dir: Path, target: Cityscapes, table: np.ndarray | None, c: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: share of all pixels pseudo-labelled as it, precision, and its true share."""
    selected = np.zeros(c)
    correct = np.zeros(c)
    truth = np.zeros(c)
    total = 0
    for i in range(len(target)):
        gt = np.asarray(target[i]["label"])
        if table is not None:
            gt = table[np.minimum(gt, len(table) - 1)]
        pl = np.asarray(read_label(pseudo_label_path(round_dir / "pseudo", target.name(i))))
        keep = pl < c
        selected += np.bincount(pl[keep], minlength=c)[:c]
        correct += np.bincount(pl[keep & (pl == gt)], minlength=c)[:c]
        valid = gt < c
        truth += np.bincount(gt[valid], minlength=c)[:c]
        total += gt.size
    precision = np.divide(correct, selected, out=np.full(c, np.nan), where=selected > 0)
    return selected / total, precision, truth / total


def _group(share: np.ndarray, prec: np.ndarray, mask: np.ndarray) -> str:
    """Selected % of all pixels and precision % of a group of classes, mean ± std over seeds."""
    sel = share[:, mask].sum(1)
    ok = (np.nan_to_num(prec[:, mask]) * share[:, mask]).sum(1)
    return f"{ms(sel)} ({ms(ok / np.maximum(sel, 1e-12))})"


def quality_table(runs: dict[str, Path], seeds: list[int], rounds: list[int], target, table, names):
    """Minority-class pseudo-labels per variant and round: share of pixels and precision."""
    c = len(names)
    lines = [
        "| variant | round | all classes: selected % (precision %) | minority classes: selected % "
        "(precision %) | majority classes: selected % (precision %) | threshold, minority "
        "(mean) | threshold, majority (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    details = []
    for label, run in runs.items():
        for k in rounds:
            per_seed, thresholds = [], []
            for s in seeds:
                d = run / f"seed{s}" / f"round{k}"
                if (d / "stats" / "done.json").is_file():
                    per_seed.append(pseudo_label_quality(d, target, table, c))
                    thresholds.append(np.load(d / "stats" / "class_threshold.npy"))
            if not per_seed:
                continue
            share = np.stack([p[0] for p in per_seed])
            prec = np.stack([p[1] for p in per_seed])
            truth = per_seed[0][2]
            minority = truth < 0.05  # the classes under 5 % of the target pixels
            sel_all = share.sum(1)
            ok_all = (np.nan_to_num(prec) * share).sum(1)

            th = np.stack(thresholds)
            lines.append(
                f"| {label} | {k} | {ms(sel_all)} ({ms(ok_all / np.maximum(sel_all, 1e-12))}) | "
                f"{_group(share, prec, minority)} | {_group(share, prec, ~minority)} | "
                f"{ms(th[:, minority].mean(1), 1, 3)} | {ms(th[:, ~minority].mean(1), 1, 3)} |"
            )
            details.append((label, k, share.mean(0), np.nanmean(prec, 0), truth))
    head = "| variant | round | " + " | ".join(names) + " |"
    rows = [head, "|---|---|" + "---|" * c]
    rows.append("| ground truth | | " + " | ".join(f"{100 * t:.2f}" for t in details[0][4]) + " |")
    for label, k, share, prec, _ in details:
        cells = [
            f"{100 * sh:.2f} ({'–' if np.isnan(p) else f'{100 * p:.0f}'})"
            for sh, p in zip(share, prec, strict=True)
        ]
        rows.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines), "\n".join(rows)


#: The large preset's ablation rows and their run folders under runs/large.
LARGE_ABLATION = (
    ("CT", "ct"),
    ("IAS + CE", "ias"),
    ("+ HPLA", "hpla"),
    ("+ regularisation", "reg"),
    ("HIAST", "hiast"),
)


def large_section(runs: Path, data: Path, city: list[str]) -> list[str]:
    """The large preset (192 × 384): the target oracle, source-only, warm-up, and the ablation's
    rows from the same warm-ups (CT, IAS + CE, + HPLA, + regularisation, HIAST)."""
    oracle, hiast = (runs / n / "results_seeds.json" for n in ("oracle", "hiast"))
    if not hiast.is_file():
        return []
    seeds, res = seeded(hiast)
    rows: dict[str, dict[str, list[dict]]] = {}
    finals: dict[str, list[dict]] = {}
    if oracle.is_file():
        rows["target oracle"] = seeded(oracle)[1]
        finals["target oracle"] = rows["target oracle"]["source_only"]
    finals["source-only"], finals["warm-up"] = res["source_only"], res["warmup"]
    # The ablation's rows from the same warm-ups: CT, then each HIAST component added in turn.
    for label, name in LARGE_ABLATION[:-1]:
        path = runs / name / "results_seeds.json"
        if path.is_file():
            rows[label] = seeded(path)[1]
            finals[label] = rows[label]["round3"]
    rows["HIAST"] = res
    finals["HIAST"] = res["round3"]
    columns = ["source_only", "warmup", "round1", "round2", "round3"]
    out = [f"## Large preset, 192 × 384 (seeds {seeds})", "", miou_table(rows, columns), ""]
    out += ["Final model, per class:", "", class_table(finals, city), ""]
    out += ["Final mIoU, paired by seed:", "", paired_table(finals), ""]
    trained = {
        k: runs / n for k, n in LARGE_ABLATION if (runs / n / "results_seeds.json").is_file()
    }
    if (data / "target").is_dir():
        target = Cityscapes(data / "target", "train")
        summary, detail = quality_table(trained, seeds, [1, 2, 3], target, None, city)
        out += ["Pseudo-labels against the target training labels (mean over seeds):", ""]
        out += [summary, "", "Per class, % of all pixels (precision %):", "", detail, ""]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--data", type=Path, default=Path("data/synthetic_city"))
    p.add_argument("--data-large", type=Path, default=Path("data/synthetic_city_large"))
    p.add_argument("--out", type=Path, default=Path("docs/results/tables.md"))
    args = p.parse_args()
    out: list[str] = []
    target = Cityscapes(args.data / "target", "train")
    city = list(CITYSCAPES_CLASSES)

    abl = args.runs / "synthetic" / "ablation_seeds.json"
    if abl.is_file():
        seeds, res = seeded(abl)
        out += [f"## Ablation (seeds {seeds})", "", class_table(res, city), ""]

    things = {
        "source-only": args.runs / "things" / "source",
        "CT": args.runs / "things" / "ct",
        "IAS + CE": args.runs / "things" / "ias",
        "HIAST": args.runs / "things" / "hiast",
        "HIAST without HPLA": args.runs / "things" / "hiast_nohpla",
        "HIAST without regularisation": args.runs / "things" / "hiast_noreg",
        "HIAST without consistency": args.runs / "things" / "hiast_nocons",
        "HIAST + source CE": args.runs / "things" / "hiast_source",
        "HIAST + threshold floor 0.9": args.runs / "things" / "hiast_floor",
        "HIAST + ramp-up 250": args.runs / "things" / "hiast_rampup",
        "HIAST, EMA momentum 0.99": args.runs / "things" / "hiast_ema99",
    }
    weak = {
        "CT": args.runs / "weak" / "ct",
        "HIAST": args.runs / "weak" / "hiast",
        "HIAST without regularisation": args.runs / "weak" / "hiast_noreg",
        "HIAST + source CE": args.runs / "weak" / "hiast_source",
        "HIAST + threshold floor 0.9": args.runs / "weak" / "hiast_floor",
        "HIAST + ramp-up 250": args.runs / "weak" / "hiast_rampup",
        "HIAST, EMA momentum 0.99": args.runs / "weak" / "hiast_ema99",
    }
    large = args.runs / "large"
    large_weak = {
        "CT": large / "weak_ct",
        "HIAST": large / "weak_hiast",
        "HIAST without regularisation": large / "weak_hiast_noreg",
    }
    lt = args.runs / "large_things"
    large_things = {
        "source-only": lt / "source",
        "CT": lt / "ct",
        "IAS + CE": lt / "ias",
        "HIAST": lt / "hiast",
        "HIAST without regularisation": lt / "hiast_noreg",
    }
    # The weak starts begin from the source-only models of the seeded ablation (default preset)
    # and of the default pipeline (large preset).
    weak_source = seeded(abl)[1]["source_only"] if abl.is_file() else None
    large_runs = large / "hiast" / "results_seeds.json"
    large_source = seeded(large_runs)[1]["source_only"] if large_runs.is_file() else None
    target_large = (
        Cityscapes(args.data_large / "target", "train")
        if (args.data_large / "target").is_dir()
        else None
    )
    things_classes, things_table = list(THINGS_CLASSES), lookup_table(CITYSCAPES_TO_THINGS)
    regimes = (
        ("Collapse regime ('things')", things, things_classes, things_table, [1, 2], None, target),
        ("Weak start (19 classes)", weak, city, None, [1, 2, 3], weak_source, target),
        (
            "Large preset: collapse regime ('things' at 192 × 384)",
            large_things,
            things_classes,
            things_table,
            [1, 2],
            None,
            target_large,
        ),
        ("Large preset: weak start", large_weak, city, None, [1, 2, 3], large_source, target_large),
    )
    regime_out: list[tuple[bool, str]] = []  # (large preset?, section)
    for title, group, names, table, rounds, start, tgt in regimes:
        rows, finals, seeds = {}, {}, []
        for label, run in group.items():
            path = run / "results_seeds.json"
            if not path.is_file():
                continue
            seeds, res = seeded(path)
            rows[label] = res
            last = [r for r in res if r.startswith("round")] or ["source_only"]
            finals[label] = res[sorted(last)[-1]]
        if not rows:
            continue
        columns = ["source_only", *[f"round{k}" for k in rounds]]
        sec = [f"## {title} (seeds {seeds})", "", miou_table(rows, columns), ""]
        sec += ["Final model, per class:", "", class_table(finals, names), ""]
        if start is not None:
            finals = {"source-only": start, **finals}
        sec += ["Final mIoU, paired by seed:", "", paired_table(finals), ""]
        trained = {
            k: v
            for k, v in group.items()
            if k != "source-only" and (v / "results_seeds.json").is_file()
        }
        if tgt is not None and trained:
            summary, detail = quality_table(trained, seeds, rounds, tgt, table, names)
            sec += ["Pseudo-labels against the target training labels (mean over seeds):", ""]
            sec += [summary, "", "Per class, % of all pixels (precision %):", "", detail, ""]
        regime_out.append((tgt is not target, "\n".join(sec)))
    out += [text for is_large, text in regime_out if not is_large]
    out += large_section(large, args.data_large, city)
    out += [text for is_large, text in regime_out if is_large]
    args.out.write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
