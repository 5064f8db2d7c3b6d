"""pytest plugin: the CPU seconds the cyclic garbage collector takes, per generation (t55).

Prints ``GC_CLOCK {...}`` at the session's end (per xdist worker: ``{worker, gc: {generation:
[collections, CPU s]}, cpu}``) and writes it to ``$GC_CLOCK_OUT.<worker>.json`` where that is set.
``GC_THRESHOLD=a,b,c`` sets ``gc.set_threshold(a, b, c)`` when the plugin loads (after
tests/conftest.py, whose own setting it overrides): an A/B of the collector's schedule. Load it
by name, from the repository root::

    PYTHONPATH=$PWD:$PWD/tests python -m pytest -p _gc_clock -p no:warnings -q -n 0 tests/test_callback.py
"""

from __future__ import annotations

import gc
import json
import os
import time

_TIMES: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_START = [0.0]


def _clock(phase: str, info: dict) -> None:
    if phase == "start":
        _START[0] = time.process_time()
    else:
        entry = _TIMES[info["generation"]]
        entry[0] += 1
        entry[1] += time.process_time() - _START[0]


gc.callbacks.append(_clock)


def pytest_configure(config) -> None:
    if os.environ.get("GC_THRESHOLD"):
        gc.set_threshold(*(int(v) for v in os.environ["GC_THRESHOLD"].split(",")))


def pytest_sessionfinish(session) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    msg = {"worker": worker, "gc": _TIMES, "threshold": gc.get_threshold(), "cpu": time.process_time()}
    out = os.environ.get("GC_CLOCK_OUT")
    if out:
        with open(f"{out}.{worker}.json", "w") as fh:
            json.dump(msg, fh)
    print("\nGC_CLOCK", json.dumps(msg))
