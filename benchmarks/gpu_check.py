"""The one-shot GPU check: CUDA tests, the three benchmarks on the GPU, and a paper-preset dry run.

    python benchmarks/gpu_check.py                 # about 5-8 minutes on one current GPU
    python benchmarks/gpu_check.py --skip-dry-run  # tests and benchmarks only

Runs, in order, each as a subprocess with its own time limit:

1. ``pytest -k cuda`` — every test that runs on the GPU: the CUDA-marked ones and every test
   parametrised over the ``device`` fixture, whose ``cuda`` case exists only where CUDA does
   (selector, losses, views, paste, teacher, metrics, histograms; ``-m cuda`` alone would miss them);
2. ``bench_selection.py``, ``bench_losses.py``, ``bench_mixing.py`` with ``--device cuda``;
3. the ``gta5`` preset's dry run (``examples/hiast_full.py --max-iters 3 --device cuda --amp``,
   DeepLabV2-ResNet101 at the paper's sizes) on the synthetic city written at the real datasets'
   resolutions, whose ``cost`` records give seconds per iteration and peak GPU memory per stage.

Prints one summary and writes it to ``--out`` (``gpu_check.md``). Exits non-zero — loudly, never
by skipping — when CUDA is not available or any step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], timeout: int, log: list[str]) -> tuple[bool, str]:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
        ok, out = done.returncode == 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        ok, out = False, f"timed out after {timeout}s\n{err.stdout or ''}{err.stderr or ''}"
    seconds = time.perf_counter() - start
    tail = "\n".join(out.strip().splitlines()[-15:])
    log.append(f"### {name} — {'ok' if ok else 'FAILED'} ({seconds:.0f} s)\n\n```\n{tail}\n```\n")
    print(tail, flush=True)
    return ok, out


def dry_run_costs(run_dir: Path) -> str:
    lines = ["| stage | s | s/iteration | peak GPU MiB | peak RSS MiB |", "|---|---|---|---|---|"]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "cost":
            lines.append(
                f"| {r['stage']} | {r['seconds']:.1f} | {r.get('seconds_per_iteration', '')} | "
                f"{r.get('peak_gpu_mib', '')} | {r['peak_rss_mib']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    p.add_argument("--work", type=Path, default=Path("runs/gpu_check"))
    p.add_argument("--skip-dry-run", action="store_true")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "gpu_check: FAILED — CUDA is not available on this machine (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda}). This check only runs on a "
            "GPU; nothing was skipped silently.",
            file=sys.stderr,
        )
        return 3
    log = [f"# GPU check — {torch.cuda.get_device_name(0)}, torch {torch.__version__}\n"]
    py = sys.executable
    env_ok = []
    ok, _ = step(
        "cuda tests", [py, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider"], 300, log
    )
    env_ok.append(ok)
    for bench in ("bench_selection.py", "bench_losses.py", "bench_mixing.py"):
        ok, _ = step(
            bench, [py, f"benchmarks/{bench}", "--device", "cuda", "--repeat", "5"], 240, log
        )
        env_ok.append(ok)
    if not args.skip_dry_run:
        data = args.work / "real"
        ok, _ = step(
            "real-resolution data",
            [
                py,
                "-m",
                "uda_selftrain.datasets.synthetic",
                "--out",
                str(data),
                "--real-resolution",
                "6",
                "--quiet",
            ],
            300,
            log,
        )
        env_ok.append(ok)
        run_dir = args.work / "gta5_dry_run"
        ok, _ = step(
            "gta5 dry run",
            [
                py, "examples/hiast_full.py", "--preset", "gta5", "--source-root", str(data / "GTA5"),
                "--target-root", str(data / "cityscapes"), "--max-iters", "3", "--device", "cuda",
                "--amp", "--quiet", "--run-dir", str(run_dir),
            ],
            600,
            log,
        )  # fmt: skip
        env_ok.append(ok)
        if ok:
            log.append("### dry-run cost per stage\n\n" + dry_run_costs(ROOT / run_dir) + "\n")
    summary = "\n".join(log)
    (ROOT / args.out).write_text(summary)
    print(summary)
    if not all(env_ok):
        print(f"gpu_check: FAILED ({env_ok.count(False)} step(s)); see {args.out}", file=sys.stderr)
        return 1
    print(f"gpu_check: all steps passed; summary in {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
