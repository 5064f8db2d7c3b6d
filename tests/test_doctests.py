"""The docstring examples of the front ends and the functional core run (and stay true)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# module -> the examples it must hold (a module that loses its example fails here)
MODULES = {"mis_lightning.assess": ["assess"], "mis_lightning.metric": ["MISIndicator"],
           "mis_lightning.config": ["mis_lightning.config"]}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_doctests(module):
    torch.set_num_threads(1)
    mod = importlib.import_module(module)
    tests = [t for t in doctest.DocTestFinder().find(mod) if t.examples]
    names = {t.name.rsplit(".", 1)[-1] if t.name != module else module for t in tests}
    assert set(MODULES[module]) <= names, f"{module}: examples missing for {set(MODULES[module]) - names}"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


def test_architecture_doc_example_of_the_functional_core():
    res = doctest.testfile(str(ROOT / "docs" / "architecture.md"), module_relative=False, optionflags=FLAGS)
    assert res.attempted >= 4 and res.failed == 0
