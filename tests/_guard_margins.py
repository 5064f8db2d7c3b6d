"""pytest plugin: what the suite does to the optimised cell-moment paths' self-checks
(``mis_lightning.functional.fastpath``), to tell a deliberate fault injection from a real
disagreement and to see how close real inputs come to each check's tolerance.

Per xdist worker, to ``$GUARD_MARGINS_OUT.<worker>.json`` (nothing without it):

* ``fails``: ``[nodeid, path, problem]`` for every self-check that disabled a path;
* ``margins``: ``[path, nodeid, margin, where]`` for every path and test, ``margin`` the largest
  ``|fast - reference| / allowed`` over the test's passed checks of that path (1 would fail);
* ``left``: the paths disabled when the session ended.

Load it by name::

    GUARD_MARGINS_OUT=/tmp/guard PYTHONPATH=tests python -m pytest -p _guard_margins -n 0 tests
"""

from __future__ import annotations

import json
import os

import pytest
import torch

_NODE: dict[str, str | None] = {"id": None}
_LAST: dict[str, tuple[float, str] | None] = {"margin": None}
_FAILS: list[tuple[str | None, str, str]] = []
_MARGINS: dict[tuple[str, str | None], tuple[float, str]] = {}


def _margin(fast, ref, h, tol) -> tuple[float, str]:
    from mis_lightning.functional import fastpath

    worst = (0.0, "")
    for name, f, r in zip(fastpath.MOMENTS, fast, ref):
        f64, r64 = f.to(torch.float64), r.to(torch.float64)
        if not f64.numel():
            continue
        same = (f64 == r64) | (torch.isnan(f64) & torch.isnan(r64))
        q = torch.where(same, torch.zeros_like(f64), (f64 - r64).abs() / fastpath.allowed(name, r64, h, tol))
        q = q.nan_to_num(nan=0.0)  # NaN in one only: compare() fails it, and fails are listed
        j = int(q.argmax())
        if float(q[j]) > worst[0]:
            worst = (float(q[j]), f"{name} at step {float(h[j]):.4g} sd")
    return worst


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get("GUARD_MARGINS_OUT"):
        return
    from mis_lightning.functional import affine, bounds, fastpath

    compare, passed, fail = fastpath.compare, fastpath.PathGuard.passed, fastpath.PathGuard.fail

    def compare_noting(fast, ref, h, tol, *args, **kwargs):
        _LAST["margin"] = _margin(fast, ref, h, tol)
        return compare(fast, ref, h, tol, *args, **kwargs)

    def passed_noting(self, path, c, *args, **kwargs):
        m, _LAST["margin"] = _LAST["margin"], None
        key = (path, _NODE["id"])
        if m is not None and m[0] >= _MARGINS.get(key, (-1.0, ""))[0]:
            _MARGINS[key] = m
        return passed(self, path, c, *args, **kwargs)

    def fail_noting(self, path, problem, fallback):
        _FAILS.append((_NODE["id"], path, problem))
        return fail(self, path, problem, fallback)

    for module in (fastpath, affine, bounds):  # the modules that imported compare by name
        module.compare = compare_noting
    fastpath.PathGuard.passed, fastpath.PathGuard.fail = passed_noting, fail_noting


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _NODE["id"] = item.nodeid
    yield
    _NODE["id"] = None


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("GUARD_MARGINS_OUT")
    if not out:
        return
    from mis_lightning.functional import fastpath

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{out}.{worker}.json", "w") as fh:
        json.dump({"fails": _FAILS, "margins": [[p, n, *m] for (p, n), m in _MARGINS.items()],
                   "left": sorted(fastpath.GUARD.disabled)}, fh)
