"""Test-session set-up.

The suite runs in parallel processes (``pytest -n auto``, pytest-xdist: one per core); each
process then uses one torch thread so that the processes do not oversubscribe the cores (tests
that compare thread counts start their own subprocesses with explicit counts).
"""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
