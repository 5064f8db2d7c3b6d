"""The library's RNG isolation (:mod:`mis_lightning._rng`) keeps the caller's global streams
(torch, numpy, random) without importing lightning_fabric: that import (with torchmetrics) was
~1 s CPU of a first call in a process that had not imported Lightning (pf29)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mis_lightning._rng import isolated_rng


@pytest.mark.parametrize("raises", [False, True])
def test_isolated_rng_restores_torch_numpy_and_random(raises):
    """After the block (returned or raised) the next draws of torch, numpy and random are the
    ones they would have been without it."""
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    try:
        with isolated_rng():
            torch.rand(100), np.random.rand(100), random.random()
            if raises:
                raise KeyError("inside")
    except KeyError:
        assert raises
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


# that an assessment in a fresh process leaves lightning_fabric and torchmetrics unimported:
# tests/test_fresh_process.py
