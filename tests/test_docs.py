"""The documentation builds with --strict, and its complete minimal loop runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    if shutil.which("mkdocs") is None:
        pytest.skip("mkdocs command not on PATH")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_own_loop_guide_runs():
    from uda_selftrain.models import deeplabv2_small

    text = (ROOT / "docs" / "guides" / "own-loop.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "model = ..." in b)  # the complete round
    # The guide's placeholders, made small enough for a test.
    code = code.replace("model = ...", "model = deeplabv2_small(width=8)")
    code = code.replace(
        "target_images = ...",
        "target_images = torch.randint(0, 256, (6, 3, 32, 64), dtype=torch.uint8)",
    )
    code = code.replace("(512, 1024)", "(16, 32)").replace("range(1000)", "range(2)")
    namespace: dict[str, object] = {"deeplabv2_small": deeplabv2_small}
    exec(compile(code, "own-loop.md", "exec"), namespace)
    assert torch.isfinite(namespace["out"].total)
    assert namespace["pseudo"].shape == (6, 32, 64)


def test_readme_example_runs_as_written():
    """The README's own-loop example runs verbatim: no placeholders, no names from nowhere."""
    text = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    losses, pseudo = namespace["losses"], namespace["pseudo"]
    assert torch.isfinite(losses.total)
    assert pseudo.shape == (4, 64, 128)
    model, teacher = namespace["model"], namespace["teacher"]
    # The step trained the student and moved the teacher towards it.
    student_w = next(model.parameters())
    teacher_w = next(teacher.module.parameters())
    assert not torch.equal(student_w, teacher_w)


#: Where a number on a summary page must come from: the detailed results and benchmark pages.
_SOURCES = [
    *sorted(p for p in (ROOT / "docs" / "results").glob("*.md") if p.name != "index.md"),
    *sorted((ROOT / "docs" / "components").glob("*.md")),
    ROOT / "benchmarks" / "RESULTS.md",
]
_NUMBER = re.compile(r"[−+-]?\d+(?:\.\d+)? ± \d+(?:\.\d+)?|\d+(?:\.\d+)?×")


def _numbers(text: str) -> set[str]:
    return {m.replace("−", "").replace("+", "").replace("-", "") for m in _NUMBER.findall(text)}


@pytest.mark.parametrize("page", ["README.md", "docs/results/index.md"])
def test_summary_numbers_come_from_results_pages(page):
    """Every mean ± std and speed-up a summary page quotes appears on a detailed results page."""
    quoted = _numbers((ROOT / page).read_text())
    assert quoted, f"{page} quotes no results"
    known = _numbers("\n".join(p.read_text() for p in _SOURCES))
    missing = sorted(quoted - known)
    assert not missing, f"{page} quotes numbers no results page has: {missing}"
