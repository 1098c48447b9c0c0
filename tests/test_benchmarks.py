"""Smoke tests of the benchmark scripts at tiny sizes: they run, agree with the reference, and
print their ratios (the timings themselves are recorded in benchmarks/RESULTS.md, never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--device", "cpu", "--repeat", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("scale", ["4", "20"])
def test_bench_selection(scale):
    out = _run("bench_selection.py", "--size", "2", "5", "16", "32", "--scale", scale)
    gap = float(out.split("max |θ_ours − θ_ref| = ")[1].split()[0])
    assert gap < 1e-3  # the reference rounds confidences to float16
    for row in ("update", "per image", "end-to-end"):
        assert f"{row} " in out and "ratio" in out


def test_bench_losses():
    out = _run("bench_losses.py", "--size", "1", "3", "16", "32")
    ours, ref = re.search(r"same value: ours (\S+) reference (\S+)", out).groups()
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    assert "forward+backward" in out and "peak memory" in out


def test_bench_mixing():
    out = _run(
        "bench_mixing.py",
        "--size",
        "2",
        "3",
        "64",
        "128",
        "--out",
        "32",
        "64",
        "--classes",
        "5",
        "--hard",
        "3",
    )
    ms = {
        key: float(re.search(rf"{re.escape(key)}:\s+(\S+) ms", out).group(1))
        for key in ("ours, paste_views (geometry first)", "reference (per-sample numpy/PIL)")
    }
    assert all(v > 0 for v in ms.values())
    ratio = float(re.search(r"speed-up: (\S+)x", out).group(1))
    # Times and ratio are printed to one decimal: at these sizes a time of ~1 ms is only known to
    # +-0.05 ms, so the ratio the printed times imply lies in an interval, not at a point.
    ref, ours = ms["reference (per-sample numpy/PIL)"], ms["ours, paste_views (geometry first)"]
    low = max(ref - 0.05, 0.0) / (ours + 0.05) - 0.05
    high = (ref + 0.05) / max(ours - 0.05, 1e-9) + 0.05
    assert low <= ratio <= high


def test_gpu_check_fails_loudly_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run for minutes")
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--out", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "CUDA is not available" in done.stderr and "FAILED" in done.stderr


def test_estimate_full_run_counts_operations():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "estimate_full_run.py"),
            *("--model", "small", "--crop", "32", "64", "--batch", "2", "--tflops", "1"),
            *("--pl-size", "32", "64", "--eval-size", "32", "64", "--rounds", "1"),
            *("--cpu-seconds-per-iteration", "source=0.5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    source = float(rows["source-only"][0])
    # A training step (forward + backward) is about three forwards; warm-up is two of them plus the
    # discriminator; a round adds the teacher's forward.
    pl = float(rows["pseudo-labels"][0])
    assert 2.5 * 2 * pl < source < 3.5 * 2 * pl  # batch 2, same size
    assert float(rows["warm-up"][0]) > 2.0 * source
    assert float(rows["self-training rounds"][0]) == pytest.approx(source + 2 * pl, rel=1e-3)
    assert "GFLOP/s sustained" in done.stdout


def test_docs_page_is_the_copy_of_results_it_says_it_is():
    # docs/benchmarks.md says it copies benchmarks/RESULTS.md (headings one level down); it had
    # silently fallen two sections behind once.
    results = (BENCH / "RESULTS.md").read_text().splitlines()[1:]
    body = [re.sub(r"^(#+) ", r"#\1 ", line) for line in results]
    page = (BENCH.parent / "docs" / "benchmarks.md").read_text().splitlines()
    assert page[:5] == [
        "# Benchmarks",
        "",
        "The scripts are in `benchmarks/`; this page is a copy of `benchmarks/RESULTS.md`.",
        "",
        "## Results",
    ]
    assert page[5:] == body, "regenerate docs/benchmarks.md from benchmarks/RESULTS.md"
