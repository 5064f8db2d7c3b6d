"""pytest plugin: each test's CPU seconds, for timing the suite on a shared machine.

Wall-clock durations (``--durations``) swell with the machine's load; CPU seconds much less.
Each test's user + system time of its process and of the children it reaped (subprocesses,
spawned DDP ranks) is written per xdist worker to ``$CPU_CLOCK_OUT.<worker>.json`` as
``[[nodeid, seconds], ...]``; nothing is written without ``CPU_CLOCK_OUT``. Load it by name::

    CPU_CLOCK_OUT=/tmp/cpu PYTHONPATH=tests python -m pytest -p _cpu_clock -n 1 tests/test_grids.py
"""

from __future__ import annotations

import json
import os
import resource

import pytest

_ROWS: list[tuple[str, float]] = []


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Set-up, call and teardown of one test (a module fixture's cost falls on its first test)."""
    start = _cpu()
    yield
    _ROWS.append((item.nodeid, _cpu() - start))


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("CPU_CLOCK_OUT")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{out}.{worker}.json", "w") as fh:
            json.dump(_ROWS, fh)
