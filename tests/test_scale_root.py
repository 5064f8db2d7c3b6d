"""``benchmarks/scale.py --root OLD`` measures OLD's ``mis_lightning`` (sm42: the child imported
``benchmarks.first_call``, which puts the working directory first on ``sys.path``, after it had put
the root first, so every ``--root`` child ran the working directory's checkout)."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

import pytest


def _fake_package(where: Path) -> Path:
    pkg = where / "mis_lightning"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    return pkg


def test_root_stays_first_after_the_childs_imports(tmp_path, monkeypatch):
    scale = pytest.importorskip("benchmarks.scale")
    root, cwd = tmp_path / "old", tmp_path / "cwd"
    _fake_package(root)
    _fake_package(cwd)
    monkeypatch.chdir(cwd)  # first_call inserts os.getcwd(): a checkout other than the root
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "benchmarks.first_call", raising=False)
    scale.use_root(root)
    from benchmarks.first_call import switch_off  # noqa: F401 - what run_one imports

    spec = importlib.machinery.PathFinder.find_spec("mis_lightning", sys.path)
    assert spec is not None and Path(spec.origin).parent == root / "mis_lightning"
