"""Every docstring example in the package runs, as a doctest, module by module."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import aon_func

# ``aon_func.__main__`` runs the command line when imported: it has no docstring examples.
SKIP = {"aon_func.__main__"}
MODULES = [
    "aon_func",
    *sorted(
        m.name for m in pkgutil.walk_packages(aon_func.__path__, "aon_func.") if m.name not in SKIP
    ),
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests(module: ModuleType) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in _tests(module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"
    )


def test_public_kernel_and_reference_functions_have_examples() -> None:
    """The kernel and its references, at least, each show an example that runs."""
    for name in ["aon", "singular_value_map", "certified_error", "polar", "orthogonality_error"]:
        doc = getattr(aon_func, name).__doc__ or ""
        assert ">>> " in doc, f"aon_func.{name} has no docstring example"


def test_the_package_has_examples() -> None:
    assert sum(len(_tests(importlib.import_module(n))) for n in MODULES) >= 5
