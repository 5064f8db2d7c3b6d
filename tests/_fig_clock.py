"""pytest plugin: the process CPU seconds spent on figures, for timing the suite's figures.

Sums, over a run, the process CPU (``time.process_time``) inside ``Report.plot`` (building the
report figure), ``PlanResult.figure`` (the planner's), ``Figure.draw_without_rendering`` (the
layout of tests/conftest.py's ``layout_only_figures``) and ``FigureCanvasAgg.draw`` (a real
rasterization: the ``real_figure`` tests, TensorBoard's ``add_figure``, a test's own
``canvas.draw()``); a call inside another of these counts for the outer one only. Written per
xdist worker to ``$FIG_CLOCK_OUT.<worker>.json`` (``{label: seconds}``, with ``total_process``: the
worker's CPU from the session's start); nothing is written without ``FIG_CLOCK_OUT``. Subprocesses
(the CLI's runs, DDP ranks) are not seen. Load it by name::

    FIG_CLOCK_OUT=/tmp/fig PYTHONPATH=tests python -m pytest -p _fig_clock -n 0 tests/test_app_sweeps.py
"""

from __future__ import annotations

import functools
import json
import os
import time

import pytest

_SECONDS: dict[str, float] = {}
_DEPTH = [0]
_START = [0.0]


def _clocked(owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def clocked(*args, **kwargs):
        if _DEPTH[0]:
            return inner(*args, **kwargs)
        _DEPTH[0] += 1
        start = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            _SECONDS[label] = _SECONDS.get(label, 0.0) + time.process_time() - start

    setattr(owner, name, clocked)


def pytest_configure(config: pytest.Config) -> None:
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mis_lightning import planning, report

    _clocked(report.Report, "plot", "Report.plot")
    _clocked(planning.PlanResult, "figure", "PlanResult.figure")
    _clocked(matplotlib.figure.Figure, "draw_without_rendering", "layout_only")
    _clocked(FigureCanvasAgg, "draw", "agg_draw")


def pytest_sessionstart(session: pytest.Session) -> None:
    _START[0] = time.process_time()


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("FIG_CLOCK_OUT")
    if out:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{out}.{worker}.json", "w") as fh:
            json.dump({**_SECONDS, "total_process": time.process_time() - _START[0]}, fh)
