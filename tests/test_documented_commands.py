"""Every command the README and the docs show parses with the real argument parser.

Each fenced shell block (and each inline ``python examples/...`` span) of README.md and docs/ is
split into commands (backslash continuations joined, comments dropped, ``NAME="..."`` assignments
of the block expanded, ``...`` placeholders removed). Every command that runs one of the project's
scripts is parsed by that script's own ``argparse`` parser — the script's ``main`` is called and
stopped right after its ``parse_args`` — so a renamed or removed flag fails here. Running them is
the other tests' job (the tiny pipeline, the ablation sequence, evaluate.py, the dry runs).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:python|torchrun) [^`]+)`")
ASSIGN = re.compile(r'^([A-Z][A-Z0-9_]*)="([^"]*)"\s*$')


def _expand(text: str, env: dict[str, str]) -> str:
    """``$NAME`` replaced by the block's assignment (left as is when the block has none)."""
    return re.sub(r"\$(\w+)", lambda v: env.get(v.group(1), v.group(0)), text)


def _commands(text: str) -> list[str]:
    out = []
    for block in FENCE.findall(text):
        env: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            m = ASSIGN.match(line)
            if m:
                env[m.group(1)] = _expand(m.group(2), env)
                continue
            out += [_expand(part, env).strip() for part in line.split("&&")]
    out += [_synopsis(span) for span in INLINE.findall(text)]
    return out


def _synopsis(span: str) -> str:
    """A usage line as a command: ``[--flag a|b]`` becomes ``--flag a``, ``[flags]`` goes."""

    def option(m: re.Match[str]) -> str:
        words = [w.split("|")[0] for w in m.group(1).split()]
        return "" if words in (["flags"], ["options"]) else " ".join(words)

    return re.sub(r"\[([^\]]*)\]", option, span)


def _script(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(what runs, its arguments) for the project's scripts; None for anything else."""
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # GLIBC_TUNABLES=... python ...
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "torchrun":
        tokens = ["python", *[t for t in tokens[1:] if not t.startswith("--nproc")]]
        tokens = [
            t for i, t in enumerate(tokens) if not (i > 0 and tokens[i - 1] == "--nproc_per_node")
        ]
    if tokens[0] != "python" or len(tokens) < 2:
        return None
    if tokens[1] == "-m":
        if tokens[2].startswith(("uda_selftrain", "docs.results.")):
            return tokens[2], tokens[3:]
        return None
    path = tokens[1]
    if path.startswith(("examples/", "benchmarks/", "docs/")) and path.endswith(".py"):
        return path, tokens[2:]
    return None


def documented() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for command in _commands(page.read_text()):
            try:
                tokens = shlex.split(command, comments=True)
            except ValueError:
                continue
            tokens = [t for t in tokens if t != "..."]
            hit = _script(tokens)
            if hit is not None:
                found.append((str(page.relative_to(ROOT)), hit[0], hit[1]))
    return found


class _Parsed(Exception):
    pass


def _load(target: str):
    """The script's module: examples/ and benchmarks/ are on the tests' import path (pytest's
    ``pythonpath``), as their own folder is when they run as scripts; docs/ scripts import from
    the repository root."""
    if target.startswith("docs/"):
        target = target.removesuffix(".py").replace("/", ".")
    elif target.endswith(".py"):
        target = Path(target).stem
    return importlib.import_module(target)


COMMANDS = documented()


def test_the_docs_show_commands():
    scripts = {t for _, t, _ in COMMANDS}
    assert {"examples/hiast_full.py", "examples/evaluate.py"} <= scripts
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize(
    ("page", "target", "argv"),
    COMMANDS,
    ids=[f"{p}:{t}:{i}" for i, (p, t, _) in enumerate(COMMANDS)],
)
def test_documented_command_parses(page, target, argv, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits with status 2 on an unknown or malformed flag
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = _load(target)
    takes_argv = bool(inspect.signature(module.main).parameters)
    if not takes_argv:
        monkeypatch.setattr(sys, "argv", [target, *argv])
    with pytest.raises(_Parsed):
        try:
            module.main(argv) if takes_argv else module.main()
        except SystemExit as stop:
            pytest.fail(f"{page}: `{target} {' '.join(argv)}` does not parse (exit {stop.code})")
