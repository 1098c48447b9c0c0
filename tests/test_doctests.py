"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import uda_selftrain

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(uda_selftrain.__path__, prefix="uda_selftrain.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["uda_selftrain", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
