"""Test-session set-up.

The suite runs in parallel processes (``pytest -n auto``, pytest-xdist: one per core); each
process then uses one torch thread so that the processes do not oversubscribe the cores (tests
that compare thread counts start their own subprocesses with explicit counts).

Scheduling (``--dist loadfile --no-loadscope-reorder`` in pyproject.toml): each file runs on one
worker, and xdist hands the files out in collection order as workers become free. A slow file
handed out last keeps one worker busy while the other idles, so the slowest files (measured with
``--durations`` on the shared 2-core machine) are collected first, in the order below; the other
files follow in their usual order.
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

SLOW_FILES = (
    "test_cli.py", "test_metric.py", "test_leakage.py", "test_ptq.py", "test_scoring_pass.py",
    "test_callback.py", "test_fastpath.py", "test_interval.py", "test_ddp.py", "test_planner.py",
    "test_mpnn.py", "test_estimation_conditions.py", "test_validation.py", "test_loggers.py",
    "test_grids.py", "test_quantization_conditions.py", "test_models.py", "test_assess.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the files of ``SLOW_FILES`` first (a stable sort: each file's tests keep their
    order, and every xdist worker collects the same order)."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)


@pytest.fixture
def one_thread_fresh_guard():
    """One torch thread and a fresh self-check guard (fastpath.GUARD) for the test, restored after."""
    from mis_lightning.functional import fastpath

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    fastpath.GUARD.reset()
    yield
    fastpath.GUARD.reset()
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One torch thread for the test (simulations whose timing on 2 shared cores is better
    single-threaded), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
