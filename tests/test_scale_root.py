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


def test_uncached_modules_names_those_compiled_in_the_timed_calls(tmp_path, monkeypatch):
    # p48c: a module of the library without bytecode cached before the timed region was compiled
    # from source inside it; one with bytecode from before is not named; other packages never are
    import importlib.util
    import os
    import time
    import types

    scale = pytest.importorskip("benchmarks.scale")
    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    pyc = tmp_path / "m.pyc"
    monkeypatch.setattr(importlib.util, "cache_from_source", lambda f: str(pyc))
    for name in ("mis_lightning._p48c_probe", "torch._p48c_probe"):
        mod = types.ModuleType(name)
        mod.__file__ = str(src)
        monkeypatch.setitem(sys.modules, name, mod)
    names = {"mis_lightning._p48c_probe", "torch._p48c_probe"}
    assert scale._uncached_modules(names, time.time()) == ["mis_lightning._p48c_probe"]  # no bytecode
    pyc.write_bytes(b"")
    t = time.time()
    os.utime(src, (t - 20, t - 20))
    os.utime(pyc, (t - 10, t - 10))
    assert scale._uncached_modules(names, t) == []  # cached before the region
    assert scale._uncached_modules(names, t - 15) == ["mis_lightning._p48c_probe"]  # written inside it
    os.utime(src, (t - 5, t - 5))
    assert scale._uncached_modules(names, t) == ["mis_lightning._p48c_probe"]  # older than its source
